"""`distdpo ablate distill`: the paper's distillation ablations at small scale, one table."""

from __future__ import annotations

import argparse
from pathlib import Path

from distdpo_training.evaluation.ablate import VARIANTS, run_ablation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = (
        'Train every distillation variant of the paper\'s ablations from the same teacher and '
        'seed (Table 2 steps, Table 3 lambda, Table 5 CD vs JSD, Table 6 score distillation, and '
        'the sign of Eq. 18 incl. the released zero-gradient variant), evaluate them with the '
        'teacher at 8 and 50 steps, and write OUT/ablation.md. Resumable: run it again after an '
        'interruption. Variants: ' + ', '.join(v.name for v in VARIANTS) + '.')
    parser.add_argument('--teacher', required=True, type=Path,
                        help='teacher model checkpoint directory (our format)')
    parser.add_argument('--data', required=True, type=Path,
                        help='dataset root with ground-truth maps (distdpo build-maps)')
    parser.add_argument('--out', required=True, type=Path, help='output folder')
    parser.add_argument('--config', default='distill_small', help='distillation config')
    parser.add_argument('--max-steps', type=int, default=300, help='training steps per variant')
    parser.add_argument('--variants', default=None,
                        help='comma-separated subset of the variants (the main one always runs)')
    parser.add_argument('--sequences', default='03', help='evaluation sequences (comma-separated)')
    parser.add_argument('--limit', type=int, default=20, help='evaluated scans per model (0: all)')
    parser.add_argument('--renders', type=int, default=1, help='Fig.-1 renders per model')
    parser.add_argument('--emd-points', type=int, default=2048,
                        help='points per cloud for the exact-assignment EMD')
    parser.add_argument('--refine', action='store_true', help='also score refined outputs')
    parser.add_argument('--seed', type=int, default=0, help='seed of training and evaluation')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                        help='config override applied to every variant (repeatable)')


def run(args: argparse.Namespace) -> int:
    path = run_ablation(args)
    print(path.read_text())
    print(f'ablation table written to {path}')
    return 0
