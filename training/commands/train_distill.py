"""`distdpo train distill`: distill a few-step student from a teacher with Distillation-DPO."""

from __future__ import annotations

import argparse

from distdpo_training.distill import DistillConfig, DistillTask, load_teacher
from distdpo_training.engine.runner import (
    add_train_arguments,
    completion_datasets,
    config_from_args,
    run_task,
)

DESCRIPTION = (
    'Distillation-DPO (paper Eq. 18): the student makes two one-step samples of each scan (noise '
    'scales 1 and lambda), the one closer to the ground truth (CD) wins, two teaching assistants '
    'learn the winners and losers, and the student follows the teacher-assistant score '
    'differences. The sign convention is configurable (sign: paper | reversed | released; '
    'released reproduces the reference code, whose student gets no gradient). Writes '
    'RUN/model/{last,best} (an 8-step student with guidance 3.5 by default); --resume continues.')


def add_distill_arguments(parser: argparse.ArgumentParser, description: str,
                          default_config: str) -> None:
    """The options of both distillation commands."""
    parser.description = description
    add_train_arguments(parser, default_config)
    parser.add_argument('--teacher', default=None,
                        help='teacher model checkpoint directory (our format, e.g. a '
                             '`distdpo train teacher` RUN/model/best or `distdpo import-ckpt` '
                             'output), or `default-teacher`; overrides the config field teacher')


def run_distill(args: argparse.Namespace, method: str) -> int:
    """Load the teacher, build the task and run it on the engine."""
    if args.teacher:
        args.set = [*args.set, f'teacher={args.teacher}']
    args.set = [*args.set, f'method={method}']
    cfg = config_from_args(DistillConfig, args)
    task = DistillTask(cfg, load_teacher(cfg.teacher), str(args.config))
    train_set, val_set = completion_datasets(args.data, cfg.data, task.model, cfg.train.seed)
    return run_task(task, cfg, args, train_set, val_set)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_distill_arguments(parser, DESCRIPTION, 'distill_small')


def run(args: argparse.Namespace) -> int:
    return run_distill(args, 'dpo')
