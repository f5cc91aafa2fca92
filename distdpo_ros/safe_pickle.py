"""Reading a PyTorch checkpoint pickle without running its code: the restricted unpickler.

LiDiff and Distillation-DPO publish PyTorch-Lightning checkpoints, which are pickles. This reader
rebuilds tensors and plain containers, turns every name of the Lightning packages into an inert
stand-in (Lightning need not be installed and none of its code runs) and refuses any other
global. numpy scalars are rebuilt from a whitelist of plain numeric dtypes (never from pickled
dtype state). A zip archive's directory is checked before anything is decompressed (entry
count, sizes, compression ratio), and every tensor storage the pickle names is checked against
the archive's real record sizes before torch reads it. :mod:`distdpo_ros.lightning_import`
turns what it reads into our checkpoint format.
"""

from __future__ import annotations

import _compat_pickle
import contextvars
import math
import os
import pickle
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy
import torch

from distdpo_ros.errors import UserError
from distdpo_ros.validation import PLAIN_DTYPE_CODES

_LIGHTNING_PACKAGES = frozenset({'pytorch_lightning', 'lightning', 'lightning_fabric'})

# Limits of what a checkpoint archive may declare, checked before anything is decompressed or
# read. The published checkpoints: data.pkl < 1 MB, ~130 MB of weights (full scale), with the
# optimiser states and the Distillation-DPO copies ~1.5 GB in all.
MAX_PICKLE_BYTES = 256 * 2**20
MAX_ARCHIVE_BYTES = 32 * 2**30
MAX_COMPRESSION_RATIO = 100
MAX_ARCHIVE_ENTRIES = 1_000_000
MAX_TENSOR_DIMS = 32


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asks for something the restricted unpickler does not allow (``what`` says it)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class DamagedCheckpoint(pickle.UnpicklingError):
    """The pickle or the archive is inconsistent (``what`` says how); nothing unsafe was run."""

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


# -------------------------------------------------------------------------------------------------
# numpy: scalars of plain numeric kinds, rebuilt from a whitelist, never from numpy's pickled state
# -------------------------------------------------------------------------------------------------

class PickledDtype:
    """What ``numpy.dtype(code, align, copy)`` in a checkpoint becomes: a whitelisted numeric code
    and, once the pickle's state is checked, its byte order. numpy's own ``__setstate__`` never
    sees the pickled state (it trusts field offsets and object flags it is given)."""

    __slots__ = ('code', 'byteorder')

    def __init__(self, code: str) -> None:
        self.code, self.byteorder = code, '='

    def set_state(self, state: Any) -> None:
        """Accept only the state numpy writes for a plain numeric dtype (no fields, no
        sub-array, no flags), whose one fact is the byte order."""
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and state[1] in ('<', '>', '|', '=') and state[2:5] == (None, None, None)
                and state[7] == 0 and (len(state) == 8 or state[8] is None)):
            raise UnsafePickle(f'a numpy dtype {self.code!r} with the state {state!r:.80}')
        self.byteorder = state[1]

    def dtype(self) -> numpy.dtype:
        dtype = numpy.dtype(self.code)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in '<>' else dtype

    def __repr__(self) -> str:
        return repr(self.dtype())


def _numpy_dtype(code: Any, align: Any = False, copy: Any = True) -> PickledDtype:
    if not isinstance(code, str) or code not in PLAIN_DTYPE_CODES or align not in (False, 0):
        raise UnsafePickle(f'numpy.dtype({code!r:.40}, align={align!r:.20}) (not a plain '
                           'numeric dtype)')
    return PickledDtype(code)


def _numpy_scalar(dtype: Any, data: Any = None) -> numpy.generic:
    if not isinstance(dtype, PickledDtype):
        raise UnsafePickle(f'a numpy scalar of {type(dtype).__name__}')
    real = dtype.dtype()
    if not isinstance(data, bytes) or len(data) != real.itemsize:
        raise DamagedCheckpoint(f'a numpy {real} scalar needs {real.itemsize} bytes')
    return numpy.frombuffer(data, dtype=real)[0].copy()


# -------------------------------------------------------------------------------------------------
# torch: tensors whose views lie inside their storages; the storages checked against the archive
# -------------------------------------------------------------------------------------------------

def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_view(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype
                  ) -> None:
    """Raise DamagedCheckpoint unless size/stride/offset describe a view inside `storage`."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickle(f'a tensor over a {type(storage).__name__}, not a storage')
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and len(size) <= MAX_TENSOR_DIMS and _whole(offset) and offset >= 0
            and all(_whole(v) and v >= 0 for v in (*size, *stride))):
        raise DamagedCheckpoint(f'a tensor with size {size!r:.60}, stride {stride!r:.60} and '
                                f'offset {offset!r:.20}')
    elements = storage._untyped_storage.nbytes() // torch._utils._element_size(dtype)
    numel = math.prod(size)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1 \
        if numel else offset
    if extent > elements or numel > max(elements, 1):
        raise DamagedCheckpoint(f'a tensor of shape {tuple(size)} reaching past its storage of '
                                f'{elements} values')


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    _checked_view(storage, storage_offset, size, stride, getattr(storage, 'dtype', torch.uint8))
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any = None, metadata: Any = None,
                       ) -> torch.Tensor:
    if metadata:  # conj/neg bits: never in a checkpoint of network weights
        raise UnsafePickle(f'tensor metadata {metadata!r:.60}')
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    tensor.requires_grad = bool(requires_grad)  # hooks are dropped: nothing of ours runs them
    return tensor


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any, metadata: Any = None,
                       ) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype) or metadata:
        raise UnsafePickle(f'a tensor of dtype {dtype!r:.40} with metadata {metadata!r:.40}')
    _checked_view(storage, storage_offset, size, stride, dtype)
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride,
                                           bool(requires_grad), OrderedDict(), dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any = None
                       ) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickle(f'a Parameter of a {type(data).__name__}')
    return torch.nn.Parameter(data, bool(requires_grad))


def _latin1_bytes(text: Any, encoding: Any = 'utf-8') -> bytes:
    """`_codecs.encode` as protocol 2 uses it for bytes: str -> latin-1 bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise UnsafePickle(f'_codecs.encode(..., {encoding!r:.20})')
    return text.encode('latin-1')


@lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a checkpoint of tensors and plain containers needs; nothing that runs code."""
    allowed: dict[tuple[str, str], Any] = {
        ('collections', 'OrderedDict'): OrderedDict,
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('builtins', 'complex'): complex,
        ('_codecs', 'encode'): _latin1_bytes,
        ('torch', 'Size'): torch.Size,
        ('torch', 'device'): torch.device,
        ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
        ('numpy', 'dtype'): _numpy_dtype,
        ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
        ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    }
    for function in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
                     _rebuild_parameter):  # torch's names, checked versions
        allowed['torch._utils', function.__name__] = function
    return allowed


@dataclass(frozen=True)
class _ArchiveLimits:
    records: dict[str, int] | None  # zip format: tensor record key -> its size in bytes
    file_bytes: int  # legacy format: no storage can be larger than the file


# The archive being read (zip record sizes, or the file size of a legacy file), for the
# persistent ids of the pickle: set by read_lightning_checkpoint around torch.load.
_ARCHIVE: contextvars.ContextVar[_ArchiveLimits | None] = contextvars.ContextVar(
    'distdpo_lightning_archive', default=None)


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only allowed globals (Lightning names become stand-ins), sets state (BUILD) only
    on stand-ins, numpy dtype codes and the ``_metadata`` of state dicts, and checks every
    tensor storage the pickle names against the archive before torch reads it. Anything else
    raises. The pure-Python unpickler is used because its opcode table can be restricted;
    checkpoint pickles are small (the tensor bytes are read by torch, outside the pickle)."""

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
        state, target = self.stack[-1], self.stack[-2]  # the state is on top, the object below
        if isinstance(target, PickledDtype):
            self.stack.pop()
            target.set_state(state)
        elif type(target) is OrderedDict and isinstance(state, dict) and set(state) == {
                '_metadata'}:
            self.stack.pop()  # a state_dict's module versions: not needed, dropped
        elif isinstance(target, LightningStandIn):
            super().load_build()
        else:
            kind = type(target).__name__
            raise UnsafePickle(f'a state change of the {kind} {getattr(target, "__name__", kind)}')

    def _load_binpersid(self) -> None:
        saved_id = self.stack.pop()
        self.append(self.persistent_load(_checked_storage_id(saved_id)))

    def _load_persid(self) -> None:
        raise UnsafePickle('a text persistent id (torch writes binary ones)')

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BINPERSID[0]] = _load_binpersid
    dispatch[pickle.PERSID[0]] = _load_persid

    def load(self) -> Any:
        try:
            return super().load()
        except KeyError as exc:  # the opcode table has no entry for this byte
            if exc.args and isinstance(exc.args[0], int):
                raise DamagedCheckpoint(f'an unknown pickle opcode 0x{exc.args[0]:02x}; the file '
                                        'is damaged or not a checkpoint') from None
            raise


def _checked_storage_id(saved_id: Any) -> Any:
    """The persistent id of one tensor storage, checked against the archive before torch
    allocates or reads anything for it: its declared size must be the record's real size."""
    limits = _ARCHIVE.get()
    if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6)
            and saved_id[0] in ('storage', b'storage')):
        raise UnsafePickle(f'the persistent id {saved_id!r:.60}')
    storage_type, key, location, numel = saved_id[1:5]
    if storage_type is torch.UntypedStorage:
        dtype = torch.uint8
    elif isinstance(storage_type, torch.serialization.StorageType):
        dtype = storage_type.dtype
    else:
        raise UnsafePickle(f'a storage of type {storage_type!r:.60}')
    if not (isinstance(key, str) and isinstance(location, str) and _whole(numel)
            and numel >= 0):
        raise DamagedCheckpoint(f'the storage id {saved_id!r:.80}')
    nbytes = numel * torch._utils._element_size(dtype)
    if limits is None:
        raise DamagedCheckpoint('a storage outside a checked archive')
    if limits.records is not None:
        if len(saved_id) != 5:
            raise DamagedCheckpoint(f'the storage id {saved_id!r:.80}')
        size = limits.records.get(key)
        if size is None:
            raise DamagedCheckpoint(f'tensor record data/{key} is missing from the archive')
        if size != nbytes:
            raise DamagedCheckpoint(f'tensor record data/{key} holds {size} bytes, the pickle '
                                    f'declares {nbytes}')
    elif nbytes > limits.file_bytes:
        raise DamagedCheckpoint(f'a storage of {nbytes} bytes in a file of {limits.file_bytes}')
    return saved_id


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# Passed to torch.load as `pickle_module`: torch wraps this Unpickler for its zip/legacy formats.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__='distdpo_restricted_pickle', Unpickler=_RestrictedUnpickler, load=_restricted_load)


def _check_archive(path: Path) -> dict[str, int]:
    """Check a zip checkpoint's directory before anything is decompressed: entry count, sizes,
    compression ratio, and tensor records stored uncompressed inside the file (torch maps them
    in place). Returns the tensor records' sizes by key."""
    file_bytes = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f'{path}: a damaged zip archive ({exc})') from None
    if len(entries) > MAX_ARCHIVE_ENTRIES:
        raise UserError(f'{path}: a zip archive of {len(entries)} entries; not a checkpoint')
    if any(e.filename.rsplit('/', 1)[-1] == 'constants.pkl' for e in entries):
        raise UserError(f'{path}: a TorchScript archive, not a Lightning checkpoint; refusing '
                        'to run its code')
    pickles = [e for e in entries if e.filename.endswith('/data.pkl') or e.filename == 'data.pkl']
    if len(pickles) != 1:
        raise UserError(f'{path}: a zip archive with {len(pickles)} data.pkl records; not a '
                        'PyTorch checkpoint')
    prefix = pickles[0].filename[:-len('data.pkl')]
    records: dict[str, int] = {}
    total = 0
    for entry in entries:
        total += entry.file_size
        if entry.compress_type != zipfile.ZIP_STORED and entry.file_size > max(
                entry.compress_size, 1) * MAX_COMPRESSION_RATIO:
            raise UserError(f'{path}: archive entry {entry.filename} inflates '
                            f'{entry.compress_size} bytes to {entry.file_size} (over '
                            f'{MAX_COMPRESSION_RATIO}x); '
                            'refusing a zip bomb')
        if entry.filename.startswith(prefix + 'data/'):
            if entry.compress_type != zipfile.ZIP_STORED or \
                    entry.compress_size != entry.file_size or \
                    entry.header_offset + entry.file_size > file_bytes:
                raise UserError(f'{path}: tensor record {entry.filename} is compressed or lies '
                                'outside the file; torch stores them uncompressed')
            records[entry.filename[len(prefix) + len('data/'):]] = entry.file_size
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise UserError(f'{path}: its data.pkl declares {pickles[0].file_size} bytes (at most '
                        f'{MAX_PICKLE_BYTES} are read); not a checkpoint')
    if total > MAX_ARCHIVE_BYTES:
        raise UserError(f'{path}: the archive declares {total} bytes in all (at most '
                        f'{MAX_ARCHIVE_BYTES}); refusing to read it')
    return records


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a Lightning ``.ckpt`` safely (see the module docstring) into a dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: no such checkpoint file')
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        limits = _ArchiveLimits(records=_check_archive(path), file_bytes=path.stat().st_size)
    else:
        with open(path, 'rb') as handle:
            head = handle.read(2)
        if head[:1] != pickle.PROTO or len(head) < 2:  # torch's legacy format: protocol >= 2
            raise UserError(f'{path}: not a readable PyTorch checkpoint (neither a zip archive '
                            f'nor a pickle; it starts with {head!r})')
        limits = _ArchiveLimits(records=None, file_bytes=path.stat().st_size)
    token = _ARCHIVE.set(limits)
    try:
        # mmap (zip format only): the optimizer states, most of the file, are never read.
        data = torch.load(path, map_location='cpu', weights_only=False, mmap=is_zip,
                          pickle_module=_RESTRICTED_PICKLE)
    except UnsafePickle as exc:
        raise UserError(f'{path}: refusing to unpickle {exc.what}: only tensors, plain '
                        'containers and Lightning classes are allowed, so this file could run '
                        'code') from None
    except DamagedCheckpoint as exc:
        raise UserError(f'{path}: not a readable PyTorch checkpoint ({exc.what})') from None
    except Exception as exc:  # corrupt input surfaces as many types (zip, pickle, EOF, value)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f'{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: '
                        f'{reason[:200]})') from None
    finally:
        _ARCHIVE.reset(token)
    if not isinstance(data, dict):
        raise UserError(f'{path}: holds a {type(data).__name__}, not a checkpoint dict')
    return data
