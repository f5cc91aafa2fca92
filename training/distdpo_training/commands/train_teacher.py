"""`distdpo train teacher`: train the LiDiff teacher on a dataset with ground-truth maps.

One process: `distdpo train teacher --data DATA --out RUN`; several GPUs or processes:
`torchrun --nproc_per_node N $(which distdpo) train teacher ...` (same global batch).
"""

from __future__ import annotations

import argparse

from distdpo_training.engine.runner import (
    add_train_arguments,
    completion_datasets,
    config_from_args,
    run_task,
)
from distdpo_training.loops.teacher import TeacherConfig, TeacherTask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Train the LiDiff teacher (eps-MSE + 5 (mean^2 + (std - 1)^2), condition dropped with '
        'p = 0.1 per sample, Adam 1e-4 halved every 5 epochs). Writes RUN/model/{last,best} in '
        'the model format the Completer loads; resume after a stop with --resume. Scale to '
        'several processes/GPUs with torchrun --nproc_per_node N.')
    add_train_arguments(parser, 'teacher_small')


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(TeacherConfig, args)
    task = TeacherTask(cfg)
    train_set, val_set = completion_datasets(args.data, cfg.data, task.model, cfg.train.seed)
    return run_task(task, cfg, args, train_set, val_set)
