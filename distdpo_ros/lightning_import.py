"""Import of the published LiDiff / Distillation-DPO PyTorch-Lightning checkpoints.

Those checkpoints are pickles. They are read with a restricted unpickler: it rebuilds tensors and
plain containers, turns every name of the Lightning packages into an inert stand-in (Lightning
need not be installed and none of its code runs) and refuses any other global, so a crafted file
cannot execute code. The weights are renamed onto our layout and checked against the networks'
expected shapes before anything is written (:mod:`distdpo_ros.checkpoint`).
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import os
import pickle
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy
import torch

from distdpo_ros import __version__
from distdpo_ros.checkpoint import DIFFUSION_PREFIXES, REFINE_PREFIX, check_fit
from distdpo_ros.config import ModelConfig, preset
from distdpo_ros.errors import UserError

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

_LIGHTNING_PACKAGES = frozenset({'pytorch_lightning', 'lightning', 'lightning_fabric'})


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asks for something the restricted unpickler does not allow (``what`` says it)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class LightningStandIn(dict):
    """Inert stand-in for a class of the Lightning packages named in a checkpoint.

    It keeps what the pickle hands it (items, constructor arguments, state) as plain data and runs
    none of the original class's code. ``AttributeDict`` hyper-parameters thus load as a dict.
    """

    origin = 'pytorch_lightning'
    pickled_args: tuple[Any, ...] = ()
    pickled_state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> LightningStandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.pickled_args = args

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state


@cache
def _stand_in_class(module: str, name: str) -> type[LightningStandIn]:
    """One stand-in class per Lightning name (distinct classes stay distinct as dict keys)."""
    return type(name, (LightningStandIn,), {'origin': f'{module}.{name}', '__module__': __name__})


@lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a checkpoint of tensors and plain containers needs; nothing that runs code."""
    import codecs

    try:
        from numpy._core.multiarray import scalar as numpy_scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar as numpy_scalar
    allowed: dict[tuple[str, str], Any] = {
        ('collections', 'OrderedDict'): OrderedDict,
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('builtins', 'complex'): complex,
        ('_codecs', 'encode'): codecs.encode,  # how protocol 2 stores bytes
        ('torch', 'Size'): torch.Size,
        ('torch', 'device'): torch.device,
        ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
        ('numpy', 'dtype'): numpy.dtype,
        ('numpy.core.multiarray', 'scalar'): numpy_scalar,
        ('numpy._core.multiarray', 'scalar'): numpy_scalar,
    }
    for name in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3',
                 '_rebuild_parameter', '_rebuild_parameter_with_state'):
        allowed['torch._utils', name] = getattr(torch._utils, name)
    return allowed


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only allowed globals (Lightning names become stand-ins) and sets state (BUILD) only
    on stand-ins, tensors and numpy dtypes, never on a class or function: anything else raises.
    The pure-Python unpickler is used because its opcode table can be restricted; checkpoint
    pickles are small (the tensor bytes are read by torch, outside the pickle)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 writes Python 2 names (`__builtin__.set`); map them as pickle itself does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module.split('.', 1)[0] in _LIGHTNING_PACKAGES:
            return _stand_in_class(module, name)
        found = _allowed_globals().get((module, name))
        if found is None and module == 'torch' and isinstance(getattr(torch, name, None),
                                                              torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise UnsafePickle(f'{module}.{name}')
        return found

    def _load_build(self) -> None:
        target = self.stack[-2]  # the state is on top, the object below it
        if not isinstance(target, (LightningStandIn, torch.Tensor, numpy.dtype)):
            kind = type(target).__name__
            raise UnsafePickle(f'a state change of the {kind} {getattr(target, "__name__", kind)}')
        super().load_build()

    dispatch[pickle.BUILD[0]] = _load_build


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# Passed to torch.load as `pickle_module`: torch wraps this Unpickler for its zip/legacy formats.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__='distdpo_restricted_pickle', Unpickler=_RestrictedUnpickler, load=_restricted_load)


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a Lightning ``.ckpt`` safely (see the module docstring) into a dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: no such checkpoint file')
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f'{path}: a damaged zip archive ({exc})') from None
        if any(n.rsplit('/', 1)[-1] == 'constants.pkl' for n in names):
            raise UserError(f'{path}: a TorchScript archive, not a Lightning checkpoint; refusing '
                            'to run its code')
    try:
        # mmap (zip format only): the optimizer states, most of the file, are never read.
        data = torch.load(path, map_location='cpu', weights_only=False, mmap=is_zip,
                          pickle_module=_RESTRICTED_PICKLE)
    except UnsafePickle as exc:
        raise UserError(f'{path}: refusing to unpickle {exc.what}: only tensors, plain '
                        'containers and Lightning classes are allowed, so this file could run '
                        'code') from None
    except Exception as exc:  # corrupt input surfaces as many types (zip, pickle, EOF, value)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f'{path}: not a readable PyTorch checkpoint ({reason})') from None
    if not isinstance(data, dict):
        raise UserError(f'{path}: holds a {type(data).__name__}, not a checkpoint dict')
    return data


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
    for key in ('epoch', 'global_step', 'pytorch-lightning_version', 'hyper_parameters'):
        if key in checkpoint:
            info[key] = _json_plain(checkpoint[key])
    return info


def _json_plain(value: Any) -> Any:
    """A JSON-serialisable copy of checkpoint bookkeeping (stand-ins become plain dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, 'item'):  # numpy scalars
        return _json_plain(value.item())
    return repr(value)


def _config_from_hparams(hparams: Any, role: str, path: Path) -> ModelConfig:
    """Full-scale defaults for the role, overridden by LiDiff-style hyper-parameters if present."""
    config = preset('full', role)
    if not isinstance(hparams, Mapping):
        return config

    def field(section: str, key: str, cast: Callable[[Any], Any]) -> Any:
        part = hparams.get(section)
        if not isinstance(part, Mapping) or key not in part:
            return None
        try:
            return cast(part[key])
        except (TypeError, ValueError):
            raise UserError(f'{path}: hyper_parameters.{section}.{key} is {part[key]!r}, '
                            f'not a {cast.__name__}') from None

    beta_func = field('diff', 'beta_func', str)
    if beta_func not in (None, 'linear'):
        raise UserError(f'{path}: hyper_parameters.diff.beta_func is {beta_func!r}; only the '
                        'linear schedule of LiDiff is supported')
    num_points = field('data', 'num_points', int)
    changes = {
        'resolution': field('data', 'resolution', float),
        'max_range': field('data', 'max_range', float),
        'scan_points': None if num_points is None else num_points // config.replication,
        'guidance': field('train', 'uncond_w', float),
        'beta_start': field('diff', 'beta_start', float),
        'beta_end': field('diff', 'beta_end', float),
        'num_train_timesteps': field('diff', 't_steps', int),
        'steps': field('diff', 's_steps', int),
    }
    try:
        return config.replace(**{k: v for k, v in changes.items() if v is not None})
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
