"""`distdpo train diffusion-dpo`: fine-tune a teacher with Diffusion-DPO (paper Eq. 10)."""

from __future__ import annotations

import argparse

from distdpo_training.engine.runner import add_train_arguments, config_from_args, run_task
from distdpo_training.loops.diffusion_dpo import (
    DiffusionDPOConfig,
    DiffusionDPOTask,
    PreferencePairs,
    collate_pairs,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Fine-tune a teacher with Diffusion-DPO: the frozen teacher completes every training scan '
        'twice (pairs cached in RUN/pairs), the completion with the lower Chamfer distance to the '
        'ground truth is preferred, and the policy (a copy of the teacher) minimises Eq. 10 '
        'against the frozen reference. Writes RUN/model/{last,best}.')
    add_train_arguments(parser, 'diffusion_dpo_small')
    parser.add_argument('--teacher', default=None,
                        help='model directory of the teacher to fine-tune (our format, e.g. '
                             'RUN/model/best of `distdpo train teacher` or `distdpo import-ckpt`; '
                             'default: the config field "teacher")')


def run(args: argparse.Namespace) -> int:
    from distdpo_training.data.dataset import CompletionDataset

    if args.teacher:
        args.set.append(f'teacher={args.teacher}')
    cfg = config_from_args(DiffusionDPOConfig, args)
    model = cfg.model.build()
    base = CompletionDataset(args.data, cfg.data.train, model, augment=False,
                             seed=cfg.train.seed, stride=cfg.data.stride)
    val = CompletionDataset(args.data, cfg.data.val, model, augment=False, seed=cfg.train.seed,
                            stride=cfg.data.val_stride)
    pairs = PreferencePairs(base, args.out / 'pairs')
    return run_task(DiffusionDPOTask(cfg, pairs), cfg, args, pairs, val, collate_pairs)
