#!/usr/bin/env bash
# The small-scale reproduction on simulated drives, end to end, resumable at every stage:
#   simulate -> build-maps -> train teacher -> train refine -> distill (Distillation-DPO, with
#   score distillation and the released variant as baselines, evaluated with the teacher at 8 and
#   50 steps on a held-out sequence) -> Fig.-1 render of a real KITTI scan -> package the default
#   models -> MODEL_CARD tables.
# Usage: training/recipes/small_sim.sh [RUN_DIR]   (default: runs/small_sim)
# Budgets (steps) are environment variables; the defaults fit about 2 hours on a 2-core CPU.
# Interrupt it at any time and run it again: finished stages are skipped, training resumes.
set -euo pipefail
RUN=${1:-runs/small_sim}
DATA=${DATA:-$RUN/data}
SEED=${SEED:-0}
TEACHER_STEPS=${TEACHER_STEPS:-2500}
REFINE_STEPS=${REFINE_STEPS:-800}
DISTILL_STEPS=${DISTILL_STEPS:-150}
EVAL_SCANS=${EVAL_SCANS:-10}
VARIANTS=${VARIANTS:-score,released}   # add lambda_1.05,lambda_1.2,jsd,reversed,... for all
SHIP=${SHIP:-0}                        # 1: copy the result into distdpo_ros/default_models
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REAL_SCAN=${REAL_SCAN:-$ROOT/../shared/data/real_scans/semantickitti_000123.ply}  # any scan file
DISTDPO=${DISTDPO:-distdpo}
mkdir -p "$RUN"
stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
resume_flag() { [ -f "$1/state/last.safetensors" ] && echo --resume || true; }

stage "1/7 simulate: sequences 00-03 (train 00-02, validate 03) and held-out 04"
[ -d "$DATA/sequences/03/velodyne" ] || $DISTDPO simulate "$DATA" --sequences 4 --frames 200 --seed "$SEED" --overwrite
[ -d "$DATA/sequences/04/velodyne" ] || $DISTDPO simulate "$DATA" --sequences 1 --first 4 --frames 100 --seed "$SEED" --overwrite

stage "2/7 ground-truth maps"
$DISTDPO build-maps "$DATA"

stage "3/7 teacher ($TEACHER_STEPS steps)"
$DISTDPO train teacher --config teacher_small --data "$DATA" --out "$RUN/teacher" \
  --max-steps "$TEACHER_STEPS" --seed "$SEED" $(resume_flag "$RUN/teacher") \
  --set train.val_every=500 --set train.val_scans=3 --set lr_decay_steps=1000

stage "4/7 refinement net ($REFINE_STEPS steps), exported together with the teacher"
# The teacher at the end of its budget: 3 validation scans are too few to pick a checkpoint by.
$DISTDPO train refine --config refine_small --data "$DATA" --out "$RUN/refine" \
  --teacher "$RUN/teacher/model/last" --max-steps "$REFINE_STEPS" --seed "$SEED" \
  $(resume_flag "$RUN/refine") --set train.val_every=400 --set train.val_at_start=false

stage "5/7 distillation + baselines ($DISTILL_STEPS steps each), evaluated on held-out 04"
$DISTDPO ablate distill --teacher "$RUN/refine/model/last" --data "$DATA" --out "$RUN/ablate" \
  --config distill_small --max-steps "$DISTILL_STEPS" --variants "$VARIANTS" --sequences 04 \
  --limit "$EVAL_SCANS" --refine --seed "$SEED"

stage "6/7 Fig.-1 render of a real scan: teacher at 50 steps, student at 8 (no ground truth)"
if [ -f "$REAL_SCAN" ]; then
  $DISTDPO render --scan "$REAL_SCAN" --teacher "$RUN/refine/model/last" \
    --model "$RUN/ablate/runs/dpo/model/last" --teacher-name 'Teacher' \
    --name 'Student (Distillation-DPO)' --extent 30 --seed "$SEED" \
    --title "real scan $(basename "$REAL_SCAN"), models trained on simulated drives only" \
    --out "$RUN/figures/real_scan.png"
else
  echo "no real scan at $REAL_SCAN (set REAL_SCAN=FILE): skipped"
fi

stage "7/7 package"
if [ "$SHIP" = 1 ]; then
  python - "$RUN" <<'PY'
import json, shutil, sys
from pathlib import Path
run = Path(sys.argv[1])
dest = Path('distdpo_ros/default_models')
for name, src in (('student', run / 'ablate/runs/dpo/model/last'),
                  ('teacher', run / 'refine/model/last')):
    target = dest / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(src, target)
    config = target / 'config.json'  # the student names its teacher by its shipped name
    data = json.loads(config.read_text())
    if 'teacher' in data.get('notes', {}):
        data['notes']['teacher'] = 'default-teacher'
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + '\n')
    print(f'shipped {src} -> {target}')
PY
fi
cp "$RUN/ablate/ablation.md" "$RUN/model_card_tables.md"
echo "tables: $RUN/model_card_tables.md"
