"""Checkpoints: our directory format, and the import of the published Lightning checkpoints.

Our format is a directory holding

- ``config.json``: a :class:`~distdpo_ros.config.ModelConfig` (scale, channel ratio, resolution, K,
  point counts, diffusion constants, default steps and guidance, role, provenance notes);
- ``weights.safetensors``: the tensors, keys prefixed ``encoder.`` (MinkGlobalEnc), ``denoiser.``
  (MinkUNetDiff) and, when the config says ``has_refine``, ``refine.`` (refinement MinkUNet). Its
  header records a SHA-256 of the tensors, so damaged weights are refused instead of used.

A checkpoint is written into a temporary sibling directory, fsynced, and renamed into place, so a
crash never leaves a half-written checkpoint where a good one was.

LiDiff and Distillation-DPO publish PyTorch-Lightning checkpoints, which are pickles. They are read
with a restricted unpickler: it rebuilds tensors and plain containers, turns every name of the
Lightning packages into an inert stand-in (Lightning need not be installed and none of its code
runs) and refuses any other global, so a crafted file cannot execute code.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy
import safetensors
import safetensors.torch
import torch
from torch import nn

from distdpo_ros import __version__
from distdpo_ros.config import ModelConfig, preset
from distdpo_ros.errors import UserError

if TYPE_CHECKING:
    from distdpo_ros.models import DiffusionNet, RefineNet

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'weights.safetensors'
DIFFUSION_PREFIXES = ('encoder.', 'denoiser.')
REFINE_PREFIX = 'refine.'
# Model names that resolve to directories shipped inside the package.
DEFAULT_MODELS = {'default': 'student', 'default-teacher': 'teacher'}
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent / 'default_models'

_DIGEST_KEY = 'distdpo_sha256'
_STEM_WIDTH = 32  # output channels of `stem.0` at channel ratio 1.0 (reference Appendix A)


# -------------------------------------------------------------------------------------------------
# Our format
# -------------------------------------------------------------------------------------------------

def save_checkpoint(out_dir: str | os.PathLike, config: ModelConfig,
                    tensors: Mapping[str, torch.Tensor], *, overwrite: bool = False) -> Path:
    """Write ``config`` and ``tensors`` as a checkpoint directory, atomically; return its path.

    ``config.has_refine`` is set from the tensors. The tensors must fit the networks the config
    describes (same check as loading). An existing checkpoint at ``out_dir`` is replaced only with
    ``overwrite``; a non-empty directory that is not a checkpoint is never replaced.
    """
    out_dir = Path(out_dir)
    config = config.replace(has_refine=any(k.startswith(REFINE_PREFIX) for k in tensors))
    weights = _standalone_cpu_tensors(tensors)
    check_fit(config, weights, out_dir / WEIGHTS_FILE)
    metadata = {'format': 'pt', _DIGEST_KEY: tensor_digest(weights)}
    config_text = config.to_json() + '\n'

    def write(directory: Path) -> None:
        safetensors.torch.save_file(weights, directory / WEIGHTS_FILE, metadata=metadata)
        _fsync(directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(config_text, encoding='utf-8')
        _fsync(directory / CONFIG_FILE)

    _write_directory_atomically(out_dir, write, overwrite)
    return out_dir


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint directory (or default model name): (config, CPU tensors)."""
    directory = resolve_model(path)
    config = load_config(directory)
    weights_path = directory / WEIGHTS_FILE
    tensors = _read_weights(weights_path)
    check_fit(config, tensors, weights_path)
    return config, tensors


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read only the ``config.json`` of a checkpoint directory (or a default model name)."""
    config_path = resolve_model(path) / CONFIG_FILE
    try:
        data = json.loads(config_path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise UserError(f'{config_path}: missing; not a checkpoint directory') from None
    except UnicodeDecodeError:
        raise UserError(f'{config_path}: not UTF-8 text; the file is corrupt') from None
    except json.JSONDecodeError as exc:
        raise UserError(f'{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})'
                        ) from None
    if not isinstance(data, dict):
        raise UserError(f'{config_path}: must hold a JSON object of config fields')
    try:
        return ModelConfig.from_dict(data, source=str(config_path))
    except UserError as exc:
        message = str(exc)
        raise UserError(message if str(config_path) in message
                        else f'{config_path}: {message}') from None
    except TypeError as exc:  # a field of the wrong type, caught by the dataclass or validate()
        raise UserError(f'{config_path}: bad field value ({exc})') from None


def resolve_model(name: str | os.PathLike) -> Path:
    """Turn a model name into a checkpoint directory: a path, or `default` / `default-teacher`."""
    if isinstance(name, str) and name in DEFAULT_MODELS:
        directory = DEFAULT_MODELS_DIR / DEFAULT_MODELS[name]
        if not (directory / CONFIG_FILE).is_file():
            raise UserError(f'model {name!r} is not shipped with this installation yet '
                            f'({directory} does not exist); pass a checkpoint directory instead, '
                            'e.g. one written by `distdpo import-ckpt`')
        return directory
    path = Path(name)
    if path.is_file():
        hint = (f'convert it first: distdpo import-ckpt {path} OUT_DIR' if path.suffix == '.ckpt'
                else f'a checkpoint is a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}')
        raise UserError(f'{path}: is a file, not a checkpoint directory; {hint}')
    if not path.is_dir():
        raise UserError(f'{path}: no such checkpoint directory (give a directory holding '
                        f'{CONFIG_FILE} and {WEIGHTS_FILE}, or the name "default" or '
                        '"default-teacher")')
    return path


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to('cpu').contiguous()
        digest.update(f'{key}|{tensor.dtype}|{tuple(tensor.shape)}\n'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_fit(config: ModelConfig, tensors: Mapping[str, torch.Tensor],
              source: str | os.PathLike) -> None:
    """Raise UserError (naming ``source``) unless the tensors are exactly what the networks of the
    config hold: the same names and shapes, so that a strict ``load_state_dict`` cannot fail."""
    has_refine = any(k.startswith(REFINE_PREFIX) for k in tensors)
    if config.has_refine != has_refine:
        state = 'has no' if config.has_refine else 'has'
        raise UserError(f'{source}: the config says has_refine={config.has_refine} but the '
                        f'weights {state} "{REFINE_PREFIX}" tensors')
    if config.role == 'refine' and (not has_refine
                                    or any(k.startswith(DIFFUSION_PREFIXES) for k in tensors)):
        raise UserError(f'{source}: role "refine" must hold only "{REFINE_PREFIX}" tensors')
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise UserError(f'{source}: {len(missing)} tensor(s) of the networks are missing, '
                        f'first {missing[0]!r}')
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UserError(f'{source}: {len(unexpected)} tensor(s) that the networks do not have, '
                        f'first {unexpected[0]!r}')
    wrong = [k for k, shape in expected.items() if tuple(tensors[k].shape) != shape]
    if wrong:
        key = wrong[0]
        more = f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''
        raise UserError(f'{source}: the weights do not fit the config (channel_ratio='
                        f'{config.channel_ratio}): {key} has shape {tuple(tensors[key].shape)}, '
                        f'the network expects {expected[key]}{more}')


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a checkpoint of this config holds (prefixed as on disk)."""
    return dict(_expected_shapes(config.role, config.channel_ratio, config.refine_up_factor,
                                 config.has_refine))


@lru_cache(maxsize=16)
def _expected_shapes(role: str, channel_ratio: float, refine_up_factor: int,
                     has_refine: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from distdpo_ros.models import DiffusionNet, RefineNet

    config = preset('full', role).replace(channel_ratio=channel_ratio, has_refine=has_refine,
                                          refine_up_factor=refine_up_factor)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    with torch.device('meta'):  # shapes only: no memory, no initialisation work
        if role != 'refine':
            shapes += [(k, tuple(v.shape)) for k, v in DiffusionNet(config).state_dict().items()]
        if has_refine:
            refine = RefineNet(config).state_dict()
            shapes += [(_refine_key(k), tuple(v.shape)) for k, v in refine.items()]
    return tuple(shapes)


def _refine_key(module_key: str) -> str:
    """RefineNet state-dict key (``model.*``) -> checkpoint key (``refine.*``)."""
    return REFINE_PREFIX + module_key.removeprefix('model.')


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f'{path}: missing; the checkpoint has no weights')
    try:
        with safetensors.safe_open(str(path), framework='pt') as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f'{path}: not a readable safetensors file, truncated or corrupt '
                        f'({reason})') from None
    recorded = metadata.get(_DIGEST_KEY)
    if recorded is not None and recorded != tensor_digest(tensors):
        raise UserError(f'{path}: the tensors do not match the checksum in the file header; '
                        'the file is corrupt')
    return tensors


def _standalone_cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no memory (safetensors refuses shared ones)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f'checkpoint entry {key!r} is a {type(value).__name__}, not a tensor')
        tensor = value.detach().to('cpu').contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _write_directory_atomically(out_dir: Path, write: Callable[[Path], None],
                                overwrite: bool) -> None:
    """Fill a temporary sibling directory with ``write`` and rename it to ``out_dir``."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f'{out_dir}: exists and is not a directory')
    occupied = out_dir.is_dir() and any(out_dir.iterdir())
    if occupied and not (out_dir / CONFIG_FILE).is_file():
        raise UserError(f'{out_dir}: a non-empty directory that is not a checkpoint; '
                        'refusing to replace it')
    if occupied and not overwrite:
        raise UserError(f'{out_dir}: already holds a checkpoint; replace it explicitly '
                        '(--force on the command line)')
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.partial-', dir=out_dir.parent))
    except OSError as exc:
        raise UserError(f'{out_dir}: cannot write the checkpoint here ({exc.strerror})') from None
    try:
        os.chmod(partial, 0o755)
        write(partial)
        _fsync(partial)
        if occupied:
            # Two renames: the good checkpoint is only moved aside once the new one is complete.
            old = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.old-', dir=out_dir.parent))
            os.replace(out_dir, old)
            try:
                os.replace(partial, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out_dir)  # rename() also replaces an empty directory
        _fsync(out_dir.parent)
    except OSError as exc:
        raise UserError(f'{out_dir}: writing the checkpoint failed ({exc}); '
                        'any previous checkpoint there is unchanged') from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -------------------------------------------------------------------------------------------------
# Networks
# -------------------------------------------------------------------------------------------------

@dataclass
class ModelBundle:
    """A loaded checkpoint: its config, the diffusion net and, when present, the refinement net.
    Both nets are in eval mode on the device they were loaded to."""

    config: ModelConfig
    diffusion: DiffusionNet
    refine: RefineNet | None = None


def load_model(path: str | os.PathLike, device: str | torch.device = 'cpu') -> ModelBundle:
    """Build the networks of a checkpoint directory (or default model name) with its weights."""
    from distdpo_ros.models import DiffusionNet, RefineNet

    config, tensors = load_checkpoint(path)
    if config.role == 'refine':
        raise UserError(f'{resolve_model(path)}: holds only refinement weights; import them '
                        'together with a diffusion checkpoint: distdpo import-ckpt DIFF.ckpt '
                        'OUT_DIR --refine REFINE.ckpt')
    diffusion = _adopt_weights(DiffusionNet, config, {
        k: v for k, v in tensors.items() if not k.startswith(REFINE_PREFIX)}).to(device).eval()
    refine = None
    if config.has_refine:
        refine = _adopt_weights(RefineNet, config, {
            'model.' + k.removeprefix(REFINE_PREFIX): v
            for k, v in tensors.items() if k.startswith(REFINE_PREFIX)}).to(device).eval()
    return ModelBundle(config=config, diffusion=diffusion, refine=refine)


def _adopt_weights(factory: Callable[[ModelConfig], nn.Module], config: ModelConfig,
                   state: dict[str, torch.Tensor]) -> nn.Module:
    """Build a net on the meta device (no initialisation work) and adopt the checkpoint tensors,
    cast to the dtypes the net declares, as its parameters and buffers (strict)."""
    with torch.device('meta'):
        net = factory(config)
    declared = net.state_dict()
    net.load_state_dict({k: v.to(declared[k].dtype) if k in declared else v
                         for k, v in state.items()}, strict=True, assign=True)
    for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
        if tensor.is_meta:  # a tensor the net does not save: it would have no value
            raise RuntimeError(f'{type(net).__name__}.{name} is not part of its state_dict')
    return net


def save_model(out_dir: str | os.PathLike, bundle: ModelBundle, *,
               overwrite: bool = False) -> Path:
    """Save the networks of a bundle as a checkpoint directory (see :func:`save_checkpoint`)."""
    tensors = dict(bundle.diffusion.state_dict())
    if bundle.refine is not None:
        tensors.update({_refine_key(k): v for k, v in bundle.refine.state_dict().items()})
    return save_checkpoint(out_dir, bundle.config, tensors, overwrite=overwrite)


# -------------------------------------------------------------------------------------------------
# Lightning checkpoints (LiDiff, Distillation-DPO)
# -------------------------------------------------------------------------------------------------

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
