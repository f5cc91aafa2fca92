"""Training-state files without pickle: tensors in safetensors, the rest as JSON in its header.

A training state is a nested structure of dicts, lists, tuples, numbers, strings, torch tensors
and numpy arrays (model/optimiser/scheduler state dicts, RNG states, counters). :func:`flatten`
splits it into a flat ``{key: tensor}`` dict and a JSON skeleton that names those keys;
:func:`unflatten` puts it back. :func:`save_state` writes one ``.safetensors`` file atomically
(temp file in the same folder, fsync, rename, fsync of the folder) whose header metadata holds
the skeleton, a SHA-256 of all tensor bytes and one of the skeleton; :func:`load_state` refuses a
truncated, corrupted or edited file with one clear line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from distdpo_ros.atomic import write_bytes_atomic
from distdpo_ros.errors import UserError
from distdpo_ros.validation import loads_json, plain_dtype

FORMAT = 'distdpo-train-state'
VERSION = 1


def flatten(obj: Any, prefix: str = 's') -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (JSON-able skeleton, tensors) for a nested state; tensors are cloned to CPU."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if path in tensors:  # a key with dots that collides with a nested one
            path = f'{path}#{len(tensors)}'
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to('cpu', copy=True).contiguous()
            return {'__tensor__': path}
        if isinstance(value, np.ndarray):  # stored widened (uint32 RNG keys) and cast back on load
            wide = value.astype(np.float64 if value.dtype.kind == 'f' else np.int64)
            tensors[path] = torch.from_numpy(np.ascontiguousarray(wide))
            return {'__ndarray__': path, 'dtype': value.dtype.str}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith('__') for k in value):
                return {k: walk(v, f'{path}.{k}') for k, v in value.items()}
            return {'__items__': [[walk(k, f'{path}.k{i}'), walk(v, f'{path}.{i}')]
                                  for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, tuple):
            return {'__tuple__': [walk(v, f'{path}.{i}') for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f'{path}.{i}') for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f'cannot store a {type(value).__name__} at {path} in a training state')

    return walk(obj, prefix), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if '__tensor__' in skeleton:
        return tensors[skeleton['__tensor__']]
    if '__ndarray__' in skeleton:
        dtype = plain_dtype(skeleton.get('dtype'), 'training state array')
        return tensors[skeleton['__ndarray__']].numpy().astype(dtype)
    if '__tuple__' in skeleton:
        return tuple(unflatten(v, tensors) for v in skeleton['__tuple__'])
    if '__items__' in skeleton:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in skeleton['__items__']}
    return {k: unflatten(v, tensors) for k, v in skeleton.items()}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of all tensors, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f'{key}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state to one safetensors file, atomically."""
    skeleton, tensors = flatten(state)
    text = json.dumps(skeleton)
    metadata = {'format': FORMAT, 'version': str(VERSION), 'sha256': _digest(tensors),
                'state': text, 'state_sha256': hashlib.sha256(text.encode()).hexdigest()}
    write_bytes_atomic(Path(path), safetensors_bytes(tensors, metadata=metadata))


def load_state(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_state`; UserError if missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: training state not found')
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f'{path}: unreadable training state (truncated or not a safetensors file: '
                        f'{exc})') from exc
    if metadata.get('format') != FORMAT:
        raise UserError(f'{path}: not a distdpo training state '
                        f'(format {metadata.get("format")!r})')
    if metadata.get('version') != str(VERSION):
        raise UserError(f'{path}: training state version {metadata.get("version")!r} is not '
                        f'supported (expected {VERSION})')
    if _digest(tensors) != metadata.get('sha256'):
        raise UserError(f'{path}: training state is corrupted (SHA-256 of its tensors does not '
                        'match the one recorded when it was written)')
    text = metadata.get('state')
    if not isinstance(text, str):
        raise UserError(f'{path}: training state header has no "state" entry; the file is '
                        'corrupt')
    recorded = metadata.get('state_sha256')  # absent in states written before it was added
    if recorded is not None and recorded != hashlib.sha256(text.encode()).hexdigest():
        raise UserError(f'{path}: the training state header was changed after it was written '
                        '(its SHA-256 does not match); the file is corrupt or was edited')
    skeleton = loads_json(text, f'{path}: training state header')
    try:
        state = unflatten(skeleton, tensors)
    except UserError as exc:
        raise UserError(f'{path}: {exc}') from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f'{path}: training state header is corrupted ({type(exc).__name__}: '
                        f'{exc})') from None
    if not isinstance(state, dict):
        raise UserError(f'{path}: training state header holds a {type(state).__name__}, not a '
                        'state')
    return state
