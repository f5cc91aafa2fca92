"""`distdpo evaluate`: score models on a dataset split; tables, plots and Fig.-1 renders.

Examples::

    distdpo evaluate --model runs/student --teacher runs/teacher --data data/sim --split val \\
        --out eval/
    torchrun --nproc_per_node 4 -m distdpo_ros.cli evaluate --model M --data D --out eval/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdpo_ros.config import SAMPLERS
from distdpo_ros.errors import UserError

DAY_MINUTES = 24 * 60.0


def _steps(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(',') if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated step counts, got {text!r}'
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'step counts must be >= 1, got {text!r}')
    return tuple(dict.fromkeys(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Complete every scan of a SemanticKITTI-layout dataset split (real or simulated) with '
        'one or two models and score it (CD, JSD, EMD, P/R/F, IoU). Writes results.json, '
        'results.csv, results.md (the paper\'s Tables 1-2), quality/time-vs-steps plots and '
        'Fig.-1 renders into --out. Per-scan results are cached in OUT/cache: a killed run '
        'continues where it stopped. Under torchrun the scans are split over the processes.')
    parser.add_argument('--model', required=True,
                        help='checkpoint directory (or "default") of the model to evaluate')
    parser.add_argument('--name', help='its name in the tables (default: the folder name)')
    parser.add_argument('--teacher', help='a second model, e.g. the LiDiff teacher')
    parser.add_argument('--teacher-name', help='its name in the tables (default: folder name)')
    parser.add_argument('--data', required=True, type=Path,
                        help='dataset root (ROOT/sequences/SS or ROOT/dataset/sequences/SS) with '
                             'built ground-truth maps (distdpo build-maps)')
    parser.add_argument('--split', default='val',
                        help='SemanticKITTI split: val (08) or train (00-07, 09, 10) '
                             '(default: val)')
    parser.add_argument('--sequences', help='comma-separated sequence names instead of --split')
    parser.add_argument('--steps', type=_steps,
                        help='sampler step counts (NFE) for --model, e.g. 1,2,4,8 '
                             '(default: the model\'s own, 8 for a student)')
    parser.add_argument('--teacher-steps', type=_steps,
                        help='step counts for --teacher (default: the teacher\'s own, 50)')
    parser.add_argument('--refine', action='store_true',
                        help='also score the refined (x6 up-sampled) output of each run')
    parser.add_argument('--limit', type=int,
                        help='evaluate only this many scans, spread evenly over the split')
    parser.add_argument('--out', required=True, type=Path, help='output folder')
    parser.add_argument('--device', default='auto',
                        help='auto, cpu, cuda or cuda:N (default: auto)')
    parser.add_argument('--guidance', type=float,
                        help='classifier-free guidance weight (default: each model\'s own)')
    parser.add_argument('--sampler', choices=SAMPLERS,
                        help="sampler of every model (default: each model's own, config field "
                             "'sampler'; dpm-solver++ is LiDiff's)")
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of scan k is SEED + k, independent of sharding (default: 0)')
    parser.add_argument('--max-range', type=float,
                        help='ground-truth range in metres (default: the largest max_range of '
                             'the models, 50 m at full scale)')
    parser.add_argument('--emd-points', type=int, default=2048,
                        help='points per cloud for the exact-assignment EMD (default: 2048)')
    parser.add_argument('--renders', type=int, default=3,
                        help='number of scans drawn as Fig.-1-style PNGs (default: 3)')
    parser.add_argument('--no-inputs', dest='baselines', action='store_false',
                        help='leave out the input baseline rows (raw scan, conditioning points, '
                             'jittered conditioning points, raw scan subsampled to the output '
                             'size) that every table otherwise starts with')
    parser.add_argument('--no-warmup', dest='warmup', action='store_false',
                        help='skip the untimed warm-up completion per model, step count and '
                             'process (the first scan\'s time then includes start-up costs)')


def run(args: argparse.Namespace) -> int:
    from distdpo_training.engine import distributed
    from distdpo_training.engine.runlock import lock_run_folder
    from distdpo_training.evaluation import evaluate as ev

    if args.limit is not None and args.limit < 1:
        raise UserError(f'--limit must be >= 1, got {args.limit}')
    if args.emd_points < 1:
        raise UserError(f'--emd-points must be >= 1, got {args.emd_points}')
    evaluation = ev.plan_evaluation(
        [(args.name, args.model, args.steps)]
        + ([(args.teacher_name, args.teacher, args.teacher_steps)] if args.teacher else []),
        args.data, args.out, split=args.split,
        sequences=args.sequences.split(',') if args.sequences else None, limit=args.limit,
        refine=args.refine, max_range=args.max_range, renders=args.renders, warmup=args.warmup,
        baselines=args.baselines,
        settings=ev.Settings(guidance=args.guidance, sampler=args.sampler, seed=args.seed,
                             emd_points=args.emd_points))
    group = distributed.setup(args.device, timeout_minutes=DAY_MINUTES)
    evaluation.device = str(group.device)
    try:
        with lock_run_folder(args.out, 'distdpo evaluate', group):
            rows = ev.run_evaluation(evaluation, group.rank, group.world_size,
                                     barrier=lambda: distributed.barrier(group))
    finally:
        distributed.teardown()
    if rows is not None:
        print((args.out / 'results.md').read_text(encoding='utf-8'))
        print(f'wrote {args.out}/results.json, results.csv, results.md, plots and renders',
              file=sys.stderr)
    return 0
