"""Training configuration: YAML files in distdpo_training/configs/ mapped onto dataclasses.

A loop's config is a dataclass whose fields are numbers/strings or nested dataclasses; its YAML
has the same shape. Unknown keys are refused (a typo must not be silently ignored) with the file
and the dotted field name. The model part is a :class:`ModelSpec`: a `distdpo_ros.config`
preset plus overrides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distdpo_ros.config import ModelConfig, preset
from distdpo_ros.errors import UserError
from distdpo_ros.validation import check_seed

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
T = TypeVar('T')


@dataclass
class ModelSpec:
    """Which networks to build: a named scale and role, with per-field overrides."""

    scale: str = 'small'
    role: str = 'teacher'
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> ModelConfig:
        base = preset(self.scale, self.role)
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - names)
        if unknown:
            raise UserError(f'config field "model.overrides" has unknown ModelConfig field(s) '
                            f'{unknown}')
        return base.replace(**self.overrides)


@dataclass
class EngineConfig:
    """What every loop shares: batch, steps, precision, logging, validation and checkpoints."""

    batch_size: int = 2  # global batch: split evenly over the torchrun processes
    max_steps: int = 1000
    seed: int = 42
    device: str = 'auto'  # auto | cpu | cuda | cuda:N (torchrun: each rank takes cuda:LOCAL_RANK)
    precision: str = 'auto'  # auto (bf16 autocast on GPUs, fp32 on CPU) | fp32 | bf16
    num_workers: int = -1  # data loader workers per process; -1: 2 on GPUs, 0 on CPU
    threads: int = 0  # torch CPU threads per process; 0: torch's default (torchrun: 1)
    log_every: int = 10  # steps between log lines (losses averaged over the interval and ranks)
    ckpt_every: int = 200  # steps between training-state checkpoints (and the `last` model)
    val_every: int = 500  # steps between validations; 0 disables them
    val_at_start: bool = True  # validate before the first step (curve start; never model/best)
    val_scans: int = 4  # validation scans, shared out over the ranks
    tensorboard: bool = True  # also log to OUT/tensorboard when tensorboard is installed

    def validate(self, source: str) -> EngineConfig:
        for name in ('batch_size', 'max_steps', 'log_every', 'ckpt_every'):
            if getattr(self, name) < 1:
                raise UserError(f'{source}: field "train.{name}" must be >= 1')
        if self.precision not in ('auto', 'fp32', 'bf16'):
            raise UserError(f'{source}: field "train.precision" must be auto, fp32 or bf16')
        if self.val_every < 0 or self.val_scans < 0 or self.threads < 0:
            raise UserError(f'{source}: fields "train.val_every/val_scans/threads" must be >= 0')
        try:
            check_seed(self.seed, 'field "train.seed"')
        except UserError as exc:
            raise UserError(f'{source}: {exc}') from None
        return self


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: dict[str, Any], source: str, prefix: str = '') -> T:
    """Build dataclass `cls` from a nested dict, refusing unknown or mistyped fields."""
    if not isinstance(data, dict):
        raise UserError(f'{source}: field "{prefix or "<root>"}" must be a mapping')
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f'"{prefix}" ' if prefix else ''
        raise UserError(f'{source}: unknown field(s) {where}{unknown}; known: {sorted(fields)}')
    values = {}
    for name, value in data.items():
        tp, dotted = hints[name], f'{prefix}.{name}' if prefix else name
        if _is_dataclass_type(tp):
            values[name] = from_dict(tp, value or {}, source, dotted)
        else:
            values[name] = _coerce(value, tp, source, dotted)
    return cls(**values)


def _coerce(value: Any, tp: Any, source: str, dotted: str) -> Any:
    """value checked against (and, for floats, converted to) the annotated type tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            if member is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, member, source, dotted)
            except UserError:
                pass
        raise UserError(f'{source}: field "{dotted}" must be {tp}, got {value!r}')
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, source, f'{dotted}[{i}]') for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return value
    expected = origin or tp
    if expected is Any or isinstance(value, expected) and not (
            expected is int and isinstance(value, bool)):
        return value
    raise UserError(f'{source}: field "{dotted}" must be {getattr(expected, "__name__", tp)}, '
                    f'got {value!r}')


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a file in distdpo_training/configs (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f'{name}.yaml'):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))
    raise UserError(f'--config {name}: no such file (shipped configs: {", ".join(shipped)})')


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition('=')
        if not sep or not key:
            raise UserError(f'--set {item!r}: expected FIELD=VALUE, e.g. train.batch_size=4')
        node = data
        parts = key.split('.')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f'--set {item!r}: "{part}" is not a section of {source}')
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], name: str, overrides: list[str] | None = None) -> tuple[T, Path]:
    """Read a YAML config into dataclass `cls`; returns (config, resolved path)."""
    path = resolve_config_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    except yaml.YAMLError as exc:
        raise UserError(f'{path}: not valid YAML ({exc})') from exc
    data = apply_overrides(data, overrides or [], str(path))
    return from_dict(cls, data, str(path)), path


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain dicts (for config.yaml in the run folder and the state file)."""
    return dataclasses.asdict(config)
