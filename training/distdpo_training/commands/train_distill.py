"""`distdpo train distill`: distill a few-step student from a teacher with Distillation-DPO."""

from __future__ import annotations

import argparse

from distdpo_training.engine.runner import add_train_arguments
from distdpo_training.loops.distill import run_distillation

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_distill_arguments(parser, DESCRIPTION, 'distill_small')


def run(args: argparse.Namespace) -> int:
    return run_distillation(args, 'dpo')
