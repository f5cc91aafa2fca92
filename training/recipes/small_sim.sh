#!/usr/bin/env bash
# The small-scale models on simulated drives, end to end, resumable at every stage:
#   simulate -> build-maps -> train teacher -> train refine -> distill (Distillation-DPO, with
#   score distillation as the baseline, evaluated beside the teacher at 8 and 50 steps and the
#   input baselines on a held-out drive) -> the same models on real KITTI frames (when
#   ../shared/data is there) -> Fig.-1 render of a real scan -> package the default models.
# Usage: training/recipes/small_sim.sh [RUN_DIR]   (default: runs/small_sim)
# Budgets (steps) are environment variables; the defaults fit about 2 hours on a 2-core CPU shared
# with nothing else (one data-loading worker prepares the next batch while the two cores train).
# Interrupt it at any time and run it again: finished stages are skipped, training resumes.
set -euo pipefail
RUN=${1:-runs/small_sim}
DATA=${DATA:-$RUN/data}
SEED=${SEED:-0}
TEACHER_STEPS=${TEACHER_STEPS:-1500}
REFINE_STEPS=${REFINE_STEPS:-400}
DISTILL_STEPS=${DISTILL_STEPS:-100}
EVAL_SCANS=${EVAL_SCANS:-10}
VARIANTS=${VARIANTS:-score}            # add released,lambda_1.05,lambda_1.2,jsd,reversed,...
SHIP=${SHIP:-0}                        # 1: copy the result into distdpo_ros/default_models
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/data}  # real KITTI frames for the real-data table (optional)
REAL_SCAN=${REAL_SCAN:-$SHARED/real_scans/semantickitti_000123.ply}  # any scan file
DISTDPO=${DISTDPO:-distdpo}
TEACHER="$RUN/refine/model/last"       # the teacher at the end of its budget + refinement net
STUDENT="$RUN/ablate/runs/dpo/model/last"
mkdir -p "$RUN"
stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
resume_flag() { [ -f "$1/state/last.safetensors" ] && echo --resume || true; }

stage "1/8 simulate: sequences 00-03 (train 00-02, validate 03) and held-out 04"
[ -d "$DATA/sequences/03/velodyne" ] || $DISTDPO simulate "$DATA" --sequences 4 --frames 200 --seed "$SEED" --overwrite
[ -d "$DATA/sequences/04/velodyne" ] || $DISTDPO simulate "$DATA" --sequences 1 --first 4 --frames 100 --seed "$((SEED + 1000))" --overwrite

stage "2/8 ground-truth maps"
$DISTDPO build-maps "$DATA"

stage "3/8 teacher ($TEACHER_STEPS steps)"
$DISTDPO train teacher --config teacher_small --data "$DATA" --out "$RUN/teacher" \
  --max-steps "$TEACHER_STEPS" --seed "$SEED" $(resume_flag "$RUN/teacher") \
  --set train.val_every=500 --set train.val_scans=3 --set train.num_workers=1

stage "4/8 refinement net ($REFINE_STEPS steps), exported together with the teacher"
# The teacher at the end of its budget: 3 validation scans are too few to pick a checkpoint by.
$DISTDPO train refine --config refine_small --data "$DATA" --out "$RUN/refine" \
  --teacher "$RUN/teacher/model/last" --max-steps "$REFINE_STEPS" --seed "$SEED" \
  $(resume_flag "$RUN/refine") --set train.val_every=400 --set train.val_at_start=false \
  --set train.num_workers=1

stage "5/8 distillation + baselines ($DISTILL_STEPS steps each), evaluated on held-out 04"
$DISTDPO ablate distill --teacher "$TEACHER" --data "$DATA" --out "$RUN/ablate" \
  --config distill_small --max-steps "$DISTILL_STEPS" --variants "$VARIANTS" --sequences 04 \
  --limit "$EVAL_SCANS" --refine --seed "$SEED"

stage "6/8 the same models on real KITTI frames (sequence 00, 4 frames, map of the 4 scans)"
REAL="$RUN/real_kitti/sequences/00"
if [ -d "$SHARED/kitti_seq00_subset/velodyne" ]; then
  if [ ! -f "$REAL/poses.txt" ]; then
    mkdir -p "$REAL/velodyne"
    cp "$SHARED"/kitti_seq00_subset/velodyne/*.bin "$REAL/velodyne/"
    cp "$SHARED/kitti_seq00_subset/poses_all_frames.txt" "$REAL/poses.txt"
    cp "$SHARED/kitti_seq00_subset/times_all_frames.txt" "$REAL/times.txt"
    cp "$SHARED/kitti_seq00_subset/calib.txt" "$REAL/calib.txt"
  fi
  $DISTDPO build-maps "$RUN/real_kitti"
  $DISTDPO evaluate --model "$STUDENT" --name student --steps 1,2,4,8 \
    --teacher "$TEACHER" --teacher-name teacher --teacher-steps 8,50 \
    --data "$RUN/real_kitti" --sequences 00 --out "$RUN/real_kitti/eval" --seed "$SEED" \
    --renders 1
else
  echo "no real KITTI frames at $SHARED/kitti_seq00_subset (set SHARED=DIR): skipped"
fi

stage "7/8 Fig.-1 render of a real scan: teacher at 50 steps, student at 8 (no ground truth)"
if [ -f "$REAL_SCAN" ]; then
  $DISTDPO render --scan "$REAL_SCAN" --teacher "$TEACHER" --model "$STUDENT" \
    --teacher-name 'Teacher' --name 'Student (Distillation-DPO)' --extent 30 --seed "$SEED" \
    --title "real scan $(basename "$REAL_SCAN"), models trained on simulated drives only" \
    --out "$RUN/figures/real_scan.png"
else
  echo "no real scan at $REAL_SCAN (set REAL_SCAN=FILE): skipped"
fi

stage "8/8 package"
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
  # the pictures of the model card: training curves (with the input baselines) and the real scan
  python - "$RUN" <<'PY'
import sys
from pathlib import Path
from distdpo_training.engine.runlog import plot_log
run = Path(sys.argv[1])
plot_log(run / 'teacher/log.jsonl', Path('docs/default_teacher_training.png'))
plot_log(run / 'ablate/runs/dpo/log.jsonl', Path('docs/default_student_training.png'))
PY
  if [ -f "$RUN/figures/real_scan.png" ]; then cp "$RUN/figures/real_scan.png" docs/real_scan_completion.png; fi
fi
cp "$RUN/ablate/ablation.md" "$RUN/model_card_tables.md"
[ -f "$RUN/real_kitti/eval/results.md" ] && cat "$RUN/real_kitti/eval/results.md" >> "$RUN/model_card_tables.md"
echo "tables: $RUN/model_card_tables.md"
