"""Import of the published LiDiff / Distillation-DPO PyTorch-Lightning checkpoints.

Those checkpoints are pickles, read without running their code by :mod:`distdpo_ros.safe_pickle`.
Here the kind of checkpoint is recognised from its state-dict prefixes, the weights are renamed
onto our layout, the hyper-parameters become a checked :class:`~distdpo_ros.config.ModelConfig`,
and everything is checked against the networks' expected shapes before anything is written
(:mod:`distdpo_ros.checkpoint`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

from distdpo_ros import __version__
from distdpo_ros.checkpoint import DIFFUSION_PREFIXES, REFINE_PREFIX, check_finite, check_fit
from distdpo_ros.config import FIELD_RULES, ModelConfig, field_problem, preset
from distdpo_ros.errors import UserError
from distdpo_ros.safe_pickle import read_lightning_checkpoint

_STEM_WIDTH = 32  # output channels of `stem.0` at channel ratio 1.0 (reference Appendix A)


@dataclass(frozen=True)
class LightningKind:
    """One family of published checkpoints: how its state-dict prefixes map onto ours."""

    name: str
    description: str
    role: str
    prefixes: tuple[tuple[str, str], ...]  # (theirs, ours)
    ignored: tuple[str, ...] = ()  # prefixes of modules that are not needed for inference


_LIDIFF_REFINE = ('model_refine.', REFINE_PREFIX)
# Checked in this order: the first kind whose prefixes all occur wins.
LIGHTNING_KINDS = (
    LightningKind('ddpo-student', 'Distillation-DPO student', 'student',
                  (('generator.', 'denoiser.'), ('partial_enc.', 'encoder.')),
                  ignored=('teacher.', 'auxDiff')),
    LightningKind('ddpo-teacher', 'Distillation-DPO teacher', 'teacher',
                  (('DiffModel.', 'denoiser.'), ('DM_encoder.', 'encoder.'))),
    LightningKind('lidiff', 'LiDiff diffusion', 'teacher',
                  (('model.', 'denoiser.'), ('partial_enc.', 'encoder.'))),
    LightningKind('lidiff-refine', 'LiDiff refinement', 'refine', (_LIDIFF_REFINE,)),
)

MAX_PLAIN_VALUES = 100_000  # values of the bookkeeping (hyper-parameters, epochs) kept as notes
MAX_PLAIN_DEPTH = 32


def import_lightning_checkpoint(
        path: str | os.PathLike, refine: str | os.PathLike | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Convert a published checkpoint (plus, optionally, a LiDiff refinement checkpoint) into our
    (config, tensors). The kind is detected from the state-dict prefixes; the config comes from the
    checkpoint's hyper-parameters when it has them, else from the full-scale defaults."""
    path = Path(path)
    checkpoint = read_lightning_checkpoint(path)
    kind, tensors, ignored = _convert_state_dict(_state_dict_of(checkpoint, path), path)
    hparams = checkpoint.get('hyper_parameters') if kind.role != 'refine' else None
    config = _config_from_hparams(hparams, kind.role, path)
    notes: dict[str, Any] = {'imported_by': f'distdpo import-ckpt {__version__}',
                             'source': _provenance(path, checkpoint, kind, ignored)}
    if refine is not None:
        if kind.role == 'refine':
            raise UserError(f'{path}: is itself a refinement checkpoint; give the diffusion '
                            'checkpoint first and the refinement one with --refine')
        if any(k.startswith(REFINE_PREFIX) for k in tensors):
            raise UserError(f'{path}: already carries refinement weights; drop --refine')
        refine = Path(refine)
        refine_checkpoint = read_lightning_checkpoint(refine)
        refine_kind, refine_tensors, refine_ignored = _convert_state_dict(
            _state_dict_of(refine_checkpoint, refine), refine)
        if refine_kind.role != 'refine':
            raise UserError(f'{refine}: a {refine_kind.description} checkpoint, not a '
                            'refinement one (expected "model_refine.*" weights)')
        tensors.update(refine_tensors)
        notes['refine_source'] = _provenance(refine, refine_checkpoint, refine_kind,
                                             refine_ignored)
    config = config.replace(
        channel_ratio=_infer_channel_ratio(tensors, path),
        refine_up_factor=_infer_refine_up_factor(tensors, refine or path, config),
        has_refine=any(k.startswith(REFINE_PREFIX) for k in tensors),
        notes=notes)
    check_fit(config, tensors, path)
    check_finite(tensors, path)
    return config, tensors


def _state_dict_of(checkpoint: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, Mapping) or not state:
        raise UserError(f'{path}: has no "state_dict" with weights')
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        what = 'state_dict entry' if 'state_dict' in checkpoint else 'entry'
        raise UserError(f'{path}: {what} {not_tensors[0]!r} is not a tensor; not a weights '
                        'checkpoint')
    return {str(k): v for k, v in state.items()}


def _convert_state_dict(state: Mapping[str, torch.Tensor], path: Path,
                        ) -> tuple[LightningKind, dict[str, torch.Tensor], list[str]]:
    """Detect the kind, rename the tensors to our prefixes; also return the ignored top names."""
    tops = {key.split('.', 1)[0] + '.' for key in state}
    kind = next((k for k in LIGHTNING_KINDS if all(p in tops for p, _ in k.prefixes)), None)
    if kind is None:
        raise UserError(f'{path}: not a LiDiff or Distillation-DPO checkpoint (its state_dict '
                        f'holds {", ".join(sorted(t + "*" for t in tops)[:6])})')
    renames = dict(kind.prefixes)
    renames.setdefault(*_LIDIFF_REFINE)  # a diffusion checkpoint may carry the refinement net
    tensors: dict[str, torch.Tensor] = {}
    ignored: set[str] = set()
    for key, value in state.items():
        top = key.split('.', 1)[0] + '.'
        if top in renames:
            tensors[renames[top] + key[len(top):]] = value
        else:
            ignored.add(top + '*')
    return kind, tensors, sorted(ignored)


def _provenance(path: Path, checkpoint: Mapping[str, Any], kind: LightningKind,
                ignored: Iterable[str]) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    info: dict[str, Any] = {'file': path.name, 'sha256': digest.hexdigest(), 'kind': kind.name,
                            'description': kind.description, 'ignored': list(ignored)}
    budget = [MAX_PLAIN_VALUES]
    for key in ('epoch', 'global_step', 'pytorch-lightning_version', 'hyper_parameters'):
        if key in checkpoint:
            try:
                info[key] = _json_plain(checkpoint[key], budget)
            except _TooLarge as exc:
                raise UserError(f'{path}: its {key!r} {exc}; not the bookkeeping of a '
                                'checkpoint') from None
    return info


class _TooLarge(Exception):
    pass


def _json_plain(value: Any, budget: list[int], depth: int = 0) -> Any:
    """A JSON-serialisable copy of checkpoint bookkeeping (stand-ins become plain dicts), at most
    MAX_PLAIN_DEPTH deep and `budget[0]` values big: a pickle can share one list many times over,
    so a small file may describe an exponentially large structure."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(f'holds more than {MAX_PLAIN_VALUES:,} values')
    if depth > MAX_PLAIN_DEPTH:
        raise _TooLarge(f'nests deeper than {MAX_PLAIN_DEPTH} levels')
    if isinstance(value, Mapping):
        return {str(k)[:1000]: _json_plain(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_plain(v, budget, depth + 1) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, str):
        return value[:10_000]
    if value is None or isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, numpy.generic):  # the plain numeric scalars the unpickler builds
        return value.item()
    return repr(value)[:1000]


# LiDiff hyper-parameters (section, key) -> the ModelConfig field they set.
_HPARAM_FIELDS = {
    ('data', 'resolution'): 'resolution',
    ('data', 'max_range'): 'max_range',
    ('data', 'num_points'): 'scan_points',  # N = K * M: divided by the replication K
    ('train', 'uncond_w'): 'guidance',
    ('diff', 'beta_start'): 'beta_start',
    ('diff', 'beta_end'): 'beta_end',
    ('diff', 't_steps'): 'num_train_timesteps',
    ('diff', 's_steps'): 'steps',
}


def _config_from_hparams(hparams: Any, role: str, path: Path) -> ModelConfig:
    """Full-scale defaults for the role, overridden by LiDiff-style hyper-parameters if present.

    Each value is checked by the rule of the config field it sets (type and range, see
    :data:`distdpo_ros.config.FIELD_RULES`), and refused naming the hyper-parameter."""
    config = preset('full', role)
    if not isinstance(hparams, Mapping):
        return config
    diff = hparams.get('diff')
    beta_func = diff.get('beta_func') if isinstance(diff, Mapping) else None
    if beta_func not in (None, 'linear'):
        raise UserError(f'{path}: hyper_parameters.diff.beta_func is {beta_func!r:.60}; only the '
                        'linear schedule of LiDiff is supported')
    changes: dict[str, Any] = {}
    for (section, key), name in _HPARAM_FIELDS.items():
        part = hparams.get(section)
        if not isinstance(part, Mapping) or key not in part:
            continue
        value = part[key]
        if isinstance(value, float) and FIELD_RULES[name].kind is int and value.is_integer():
            value = int(value)  # YAML writes 1.8e5 as a float
        if name == 'scan_points' and isinstance(value, int) and not isinstance(value, bool):
            value //= config.replication
        problem = field_problem(name, value)
        if problem is not None:
            shown = f' (/ {config.replication} = {name})' if name == 'scan_points' else ''
            raise UserError(f'{path}: hyper_parameters.{section}.{key}{shown} {problem}'[:300])
        changes[name] = value
    try:
        return config.replace(**changes)
    except UserError as exc:
        raise UserError(f'{path}: hyper_parameters give an invalid config: {exc}') from None


def _infer_channel_ratio(tensors: Mapping[str, torch.Tensor], path: Path) -> float:
    for prefix in (*DIFFUSION_PREFIXES, REFINE_PREFIX):
        stem = tensors.get(prefix + 'stem.0.kernel')
        if stem is not None and stem.dim() == 3:
            return stem.shape[-1] / _STEM_WIDTH
    raise UserError(f'{path}: no "stem.0.kernel" of shape (27, 3, C) among the weights; '
                    'not a LiDiff network')


def _infer_refine_up_factor(tensors: Mapping[str, torch.Tensor], path: Path | str,
                            config: ModelConfig) -> int:
    last = tensors.get(REFINE_PREFIX + 'last.2.weight')
    if last is None:
        return config.refine_up_factor
    if last.dim() != 2 or last.shape[0] % 3:
        raise UserError(f'{path}: model_refine.last.2.weight has shape {tuple(last.shape)}; '
                        'expected (3 * up_factor, C)')
    return last.shape[0] // 3
