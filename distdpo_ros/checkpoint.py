"""Checkpoints: our directory format (published Lightning checkpoints: :mod:`.lightning_import`).

Our format is a directory holding

- ``config.json``: a :class:`~distdpo_ros.config.ModelConfig` (scale, channel ratio, resolution, K,
  point counts, diffusion constants, default steps and guidance, role, provenance notes);
- ``weights.safetensors``: the tensors, keys prefixed ``encoder.`` (MinkGlobalEnc), ``denoiser.``
  (MinkUNetDiff) and, when the config says ``has_refine``, ``refine.`` (refinement MinkUNet). Its
  header records a SHA-256 of the tensors, so damaged weights are refused instead of used.

A checkpoint is written into a temporary sibling directory, fsynced, and renamed into place, so a
crash never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import safetensors.torch
import torch
from torch import nn

from distdpo_ros.atomic import clear_stale_temporaries, fsync_path, temporary_name, writer_is_gone
from distdpo_ros.config import ModelConfig, preset
from distdpo_ros.errors import UserError
from distdpo_ros.validation import loads_json

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
MAX_CONFIG_BYTES = 16 * 2**20  # config.json: a few kB, with provenance notes


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
        fsync_path(directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(config_text, encoding='utf-8')
        fsync_path(directory / CONFIG_FILE)

    _write_directory_atomically(out_dir, write, overwrite)
    return out_dir


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint directory (or default model name): (config, CPU tensors)."""
    directory = resolve_model(path)
    config = load_config(directory)
    weights_path = directory / WEIGHTS_FILE
    tensors = _read_weights(weights_path)
    check_fit(config, tensors, weights_path)
    check_finite(tensors, weights_path)
    return config, tensors


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read only the ``config.json`` of a checkpoint directory (or a default model name)."""
    config_path = resolve_model(path) / CONFIG_FILE
    try:
        text = config_path.read_bytes()
    except FileNotFoundError:
        raise UserError(f'{config_path}: missing; not a checkpoint directory') from None
    except OSError as exc:
        raise UserError(f'{config_path}: cannot read ({exc.strerror or exc})') from None
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(f'{config_path}: {len(text)} bytes; a config is at most '
                        f'{MAX_CONFIG_BYTES}')
    try:
        text = text.decode('utf-8')
    except UnicodeDecodeError:
        raise UserError(f'{config_path}: not UTF-8 text; the file is corrupt') from None
    data = loads_json(text, str(config_path))
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


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise UserError (naming ``source`` and the tensor) if a weight is NaN or infinite: such a
    network completes every scan into nothing, which must not pass for a result."""
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f'{source}: tensor {key!r} holds {bad} NaN or infinite value(s); '
                            'the weights are unusable (a diverged training or a damaged file)')


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a checkpoint of this config holds (prefixed as on disk)."""
    return dict(_expected_shapes(config.role, config.channel_ratio, config.refine_up_factor,
                                 config.has_refine, config.norm))


@lru_cache(maxsize=16)
def _expected_shapes(role: str, channel_ratio: float, refine_up_factor: int,
                     has_refine: bool, norm: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from distdpo_ros.models import DiffusionNet, RefineNet

    config = preset('full', role).replace(channel_ratio=channel_ratio, has_refine=has_refine,
                                          refine_up_factor=refine_up_factor, norm=norm)
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
    _recover_moved_aside(out_dir)
    clear_stale_temporaries(out_dir.parent)
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
        partial = Path(tempfile.mkdtemp(prefix=temporary_name(out_dir.name, 'partial-'),
                                        dir=out_dir.parent))
    except OSError as exc:
        raise UserError(f'{out_dir}: cannot write the checkpoint here ({exc.strerror})') from None
    try:
        os.chmod(partial, 0o755)
        write(partial)
        fsync_path(partial)
        if occupied:
            # Two renames: the good checkpoint is only moved aside once the new one is complete.
            old = Path(tempfile.mkdtemp(prefix=temporary_name(out_dir.name, 'old-'),
                                        dir=out_dir.parent))
            os.replace(out_dir, old)
            try:
                os.replace(partial, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out_dir)  # rename() also replaces an empty directory
        fsync_path(out_dir.parent)
    except OSError as exc:
        raise UserError(f'{out_dir}: writing the checkpoint failed ({exc}); '
                        'any previous checkpoint there is unchanged') from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _recover_moved_aside(out_dir: Path) -> None:
    """Undo what a writer killed between its two renames left: the previous checkpoint moved
    aside (``.NAME.old-*``) is put back when NAME is missing, and removed when NAME is whole."""
    prefix = f'.{out_dir.name}.old-'
    try:
        aside = sorted(p for p in out_dir.parent.iterdir()
                       if p.name.startswith(prefix) and writer_is_gone(p.name))
    except OSError:
        return
    for path in aside:
        if not out_dir.exists() and (path / CONFIG_FILE).is_file():
            os.replace(path, out_dir)
            print(f'distdpo: restored {out_dir} from {path.name}, where an interrupted write '
                  'had moved it', file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f'distdpo: removed {path.name}, a previous checkpoint left beside {out_dir} by '
                  'an interrupted write', file=sys.stderr)


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
    """Build the networks of a checkpoint directory (or default model name) with its weights.

    Loaded on one torch thread: a parallel region in the loading thread gives it an OpenMP team,
    whose threads then compete with the team of the thread that runs the model (the node's
    worker): measured 4-6x slower completions on 2 cores when a model loaded in the main thread
    ran in another one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _load_model(path, device)
    finally:
        torch.set_num_threads(previous)


def _load_model(path: str | os.PathLike, device: str | torch.device) -> ModelBundle:
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
