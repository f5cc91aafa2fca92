"""`distdpo train score-distill`: the score-distillation baseline (one assistant, no pairs)."""

from __future__ import annotations

import argparse

from distdpo_training.commands.train_distill import add_distill_arguments
from distdpo_training.loops.distill import run_distillation

DESCRIPTION = (
    'Score distillation (paper Table 6 baseline): the student makes one one-step sample per scan, '
    'one assistant learns the student\'s samples, and the student follows the teacher-assistant '
    'score difference (no preference pairs). Same engine, options and outputs as '
    '`distdpo train distill`.')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_distill_arguments(parser, DESCRIPTION, 'distill_small')


def run(args: argparse.Namespace) -> int:
    return run_distillation(args, 'score')
