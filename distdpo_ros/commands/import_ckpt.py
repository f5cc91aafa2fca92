"""`distdpo import-ckpt IN.ckpt OUT_DIR`: convert a published Lightning checkpoint to our format.

Reads LiDiff `diff_net.ckpt` / `refine_net.ckpt` and the Distillation-DPO teacher and student
without Lightning and without running pickled code (see :mod:`distdpo_ros.checkpoint`), and writes
OUT_DIR with `config.json` + `weights.safetensors`, ready for `distdpo complete --model OUT_DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distdpo_ros.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_checkpoint
from distdpo_ros.lightning_import import import_lightning_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Convert a LiDiff / Distillation-DPO Lightning checkpoint into a checkpoint directory '
        f'({CONFIG_FILE} + {WEIGHTS_FILE}). The kind is detected from the weights: LiDiff '
        'diff_net.ckpt (model.*, partial_enc.*), refine_net.ckpt (model_refine.*), the '
        'Distillation-DPO teacher (DiffModel.*, DM_encoder.*) or student (generator.*, '
        'partial_enc.*; its teacher/auxDiff copies are dropped). The pickle is read without '
        'Lightning and without running any of its code.')
    parser.add_argument('ckpt', type=Path, metavar='IN.ckpt',
                        help='the Lightning checkpoint to convert')
    parser.add_argument('out_dir', type=Path, metavar='OUT_DIR',
                        help='checkpoint directory to write (created; written atomically)')
    parser.add_argument('--refine', type=Path, metavar='REFINE.ckpt', default=None,
                        help='also import the refinement net of this LiDiff refine_net.ckpt into '
                             'OUT_DIR (default: none; completions are then not up-sampled)')
    parser.add_argument('--steps', type=int, default=None,
                        help='default number of sampler steps stored in the config (default: the '
                             "checkpoint's hyper-parameters, else 50 for a teacher, 8 for a "
                             'student)')
    parser.add_argument('--guidance', type=float, default=None,
                        help='default classifier-free guidance weight stored in the config '
                             "(default: the checkpoint's hyper-parameters, else 6.0 for a "
                             'teacher, 3.5 for a student)')
    parser.add_argument('--force', action='store_true',
                        help='replace OUT_DIR if it already holds a checkpoint (default: refuse)')


def run(args: argparse.Namespace) -> int:
    config, tensors = import_lightning_checkpoint(args.ckpt, refine=args.refine)
    overrides = {name: value for name, value in (('steps', args.steps),
                                                 ('guidance', args.guidance))
                 if value is not None}
    if overrides:
        config = config.replace(**overrides)
    save_checkpoint(args.out_dir, config, tensors, overwrite=args.force)
    source = config.notes['source']
    values = sum(t.numel() for t in tensors.values())
    parts = sorted({key.split('.', 1)[0] for key in tensors})
    print(f'{args.ckpt}: {source["description"]} checkpoint -> {args.out_dir} '
          f'(role {config.role}, {", ".join(parts)}: {len(tensors)} tensors, {values:,} values, '
          f'channel ratio {config.channel_ratio:g}, {config.steps} steps, '
          f'guidance {config.guidance:g})')
    if source['ignored']:
        print(f'  not imported (not needed for inference): {", ".join(source["ignored"])}')
    return 0
