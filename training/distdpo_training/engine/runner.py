"""What every `distdpo train ...` command shares: its options and the start of a run.

Every loop takes `--config C --data DATASET --out DIR [--max-steps N] [--resume [STATE]]
[--seed S] [--device D] [--set FIELD=VALUE ...]`; this module adds them to a parser and turns them
into a loop config (the YAML file with the command-line overrides applied).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TypeVar

from torch.utils.data import Dataset

from distdpo_ros.config import ModelConfig
from distdpo_ros.errors import UserError
from distdpo_training.engine.config import load_config, to_dict
from distdpo_training.engine.loop import Engine

T = TypeVar('T')


def add_train_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    """The options of every training loop (see the module docstring)."""
    parser.add_argument('--config', default=default_config,
                        help='YAML config: a path or the name of a shipped one in '
                             f'training/distdpo_training/configs (default: {default_config})')
    parser.add_argument('--data', required=True, type=Path,
                        help='dataset root in the SemanticKITTI layout (sequences/SS/...) with '
                             'ground-truth maps (distdpo build-maps)')
    parser.add_argument('--out', required=True, type=Path,
                        help='run folder: config.yaml, log.jsonl, tensorboard/, state/ '
                             '(training states), model/last and model/best (our model format)')
    parser.add_argument('--max-steps', type=int, default=None,
                        help='total optimisation steps of the run (default: train.max_steps of '
                             'the config); a resumed run continues up to this step')
    parser.add_argument('--resume', nargs='?', const='last', default=None, metavar='STATE',
                        help='continue the run in --out from OUT/state/last.safetensors, or from '
                             'the given state file (e.g. OUT/state/previous.safetensors)')
    parser.add_argument('--seed', type=int, default=None,
                        help='seed of weights, data order, augmentation and noise '
                             '(default: train.seed of the config)')
    parser.add_argument('--device', default=None,
                        help='auto | cpu | cuda | cuda:N (default: train.device of the config, '
                             'auto = the GPU of this torchrun rank when there is one)')
    parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                        help='override one config field, e.g. --set train.batch_size=4 '
                             '(repeatable; VALUE is read as YAML)')


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The loop config of `cls` from --config and the overriding options."""
    overrides = list(args.set)
    for option, field in (('max_steps', 'train.max_steps'), ('seed', 'train.seed'),
                          ('device', 'train.device')):
        value = getattr(args, option)
        if value is not None:
            overrides.append(f'{field}={value}')
    config, path = load_config(cls, args.config, overrides)
    validate = getattr(config, 'validate', None)
    if validate is not None:
        validate(str(path))
    return config


def describe(config: Any) -> str:
    """One line for the log: the scale and the key sizes of a loop config."""
    model = config.model.build()
    train = config.train
    return (f'scale {model.scale}: {model.scan_points} scan points x K={model.replication}, '
            f'voxel {model.resolution} m, channel ratio {model.channel_ratio}; '
            f'global batch {train.batch_size}, {train.max_steps} steps')


def completion_datasets(root: Path, data: Any, model: ModelConfig, seed: int
                        ) -> tuple[Dataset, Dataset]:
    """(augmented training set, validation set) of (scan, ground truth) items of --data."""
    from distdpo_training.data.dataset import CompletionDataset

    train = CompletionDataset(root, data.train, model, augment=True, seed=seed,
                              stride=data.stride)
    val = CompletionDataset(root, data.val, model, augment=False, seed=seed,
                            stride=data.val_stride)
    if len(val) == 0:
        raise UserError(f'--data {root}: the validation sequences {data.val} have no scans')
    return train, val


def run_task(task: Any, config: Any, args: argparse.Namespace, train_set: Dataset,
             val_set: Dataset | None, collate: Any = None) -> int:
    """Run a loop's Task on the engine (one process or a torchrun rank); returns the exit code."""
    from distdpo_training.data.dataset import collate as completion_collate

    engine = Engine(config.train, args.out, to_dict(config), args.resume, task.loop)
    try:
        if engine.is_main:
            print(f'distdpo train {task.loop}: {describe(config)}; {len(train_set)} training '
                  f'items, {engine.dist.world_size} process(es) on {engine.device}',
                  file=sys.stderr)
        return engine.fit(task, train_set, collate or completion_collate, val_set)
    finally:
        engine.close()
