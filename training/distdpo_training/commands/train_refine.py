"""`distdpo train refine`: train LiDiff's x6 refinement / up-sampling net."""

from __future__ import annotations

import argparse

from distdpo_training.engine.runner import add_train_arguments, config_from_args, run_task
from distdpo_training.loops.refine import RefineConfig, RefineTask, collate, refine_datasets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Train the refinement net (reference §1.5/§2.6): windows of consecutive scans aggregated '
        'in the centre frame, jittered (0.2 m, clipped 0.3 m) as input, voxel-downsampled clean '
        'aggregate as target, 6 offsets per point, squared Chamfer loss. With --teacher the '
        'exported model holds the teacher and the refinement net (the Completer then refines).')
    add_train_arguments(parser, 'refine_small')
    parser.add_argument('--teacher', default=None,
                        help='diffusion checkpoint to bundle with the refinement net in the '
                             'exported model (default: the config field "teacher"; empty: '
                             'export the refinement weights alone)')


def run(args: argparse.Namespace) -> int:
    if args.teacher:
        args.set.append(f'teacher={args.teacher}')
    cfg = config_from_args(RefineConfig, args)
    task = RefineTask(cfg)
    train_set, val_set = refine_datasets(args.data, cfg, task.model, cfg.train.seed)
    return run_task(task, cfg, args, train_set, val_set, collate)
