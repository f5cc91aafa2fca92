"""Coordinate sets of one sparse voxel geometry and the kernel maps between them.

Semantics follow MinkowskiEngine (reference §2.2): coordinates are integer voxel indices in
stride-1 units with a leading batch column; a set at tensor stride ``s`` holds multiples of ``s``.
The set at stride ``2s`` is ``unique(floor(c / 2s) * 2s)`` (floor division, also for negative
coordinates).

Every (batch, x, y, z) row is packed into one int64 key (batch in the top bits, then x, y, z with
an offset), so that sorting keys sorts voxels by batch and ``torch.searchsorted`` finds neighbours:
adding a constant to a key moves the voxel by a fixed offset. A :class:`CoordinateManager` builds
each set and each kernel map once, on first use, and every layer and batch item using that stride
shares it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

AXIS_BITS = 18
BATCH_BITS = 63 - 3 * AXIS_BITS  # 9 bits: up to 512 batch items per geometry
AXIS_OFFSET = 1 << (AXIS_BITS - 1)
COORD_LIMIT = AXIS_OFFSET - 4096  # |voxel index| limit (room for strides and offsets)
MAX_BATCH = 1 << BATCH_BITS


def _kernel_offsets(size: int) -> Tensor:
    """Offsets of a cubic kernel in MinkowskiEngine order: index a + s*b + s*s*c, x fastest.

    Odd kernels are centred ({-1, 0, 1} for size 3), even ones are not ({0, 1} for size 2).
    """
    shift = (size - 1) // 2 if size % 2 else 0
    r = torch.arange(size) - shift
    z, y, x = torch.meshgrid(r, r, r, indexing='ij')
    return torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], dim=1)


OFFSETS_K3 = _kernel_offsets(3)  # (27, 3); index 13 is the centre
OFFSETS_K2 = _kernel_offsets(2)  # (8, 3)
CENTRE_K3 = 13


def offset_keys(offsets: Tensor) -> Tensor:
    """The key difference that moves a voxel by each (dx, dy, dz) offset (batch unchanged)."""
    o = offsets.to(torch.int64)
    return (o[:, 0] << (2 * AXIS_BITS)) + (o[:, 1] << AXIS_BITS) + o[:, 2]


def pack_keys(coords: Tensor) -> Tensor:
    """(N, 4) int64 rows (batch, x, y, z) -> (N,) int64 keys, in the rows' lexicographic order."""
    c = coords.to(torch.int64)
    return ((c[:, 0] << (3 * AXIS_BITS)) | ((c[:, 1] + AXIS_OFFSET) << (2 * AXIS_BITS))
            | ((c[:, 2] + AXIS_OFFSET) << AXIS_BITS) | (c[:, 3] + AXIS_OFFSET))


def unpack_keys(keys: Tensor) -> Tensor:
    """Inverse of :func:`pack_keys`: (N,) keys -> (N, 4) int64 rows (batch, x, y, z)."""
    mask = (1 << AXIS_BITS) - 1
    return torch.stack([keys >> (3 * AXIS_BITS),
                        ((keys >> (2 * AXIS_BITS)) & mask) - AXIS_OFFSET,
                        ((keys >> AXIS_BITS) & mask) - AXIS_OFFSET,
                        (keys & mask) - AXIS_OFFSET], dim=1)


def check_coordinates(coords: Tensor) -> None:
    """Raise ValueError when batch ids or voxel indices do not fit the key layout."""
    if coords.numel() == 0:
        return
    spatial = coords[:, 1:].abs().max().item()
    if spatial >= COORD_LIMIT:
        raise ValueError(f'voxel index {spatial} is out of range (|index| < {COORD_LIMIT}): '
                         'points too far from the origin for this voxel size')
    low, high = coords[:, 0].min().item(), coords[:, 0].max().item()
    if low < 0 or high >= MAX_BATCH:
        raise ValueError(f'batch ids must lie in [0, {MAX_BATCH}), got {low}..{high}')


@dataclass(frozen=True)
class KernelMap:
    """Which input voxel feeds which output voxel through which kernel weight.

    ``pairs`` holds (kernel index, input rows, output rows) for every kernel weight that has pairs;
    ``identity`` names the kernel weight, if any, that maps every voxel onto itself (the centre of
    a submanifold convolution), applied as one dense matrix product without index work.
    ``cache`` holds what the convolution derives from the pairs (built once per map, shared by
    every layer and call that uses it).
    """

    n_in: int
    n_out: int
    pairs: tuple[tuple[int, Tensor, Tensor], ...]
    identity: int | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def transposed(self) -> KernelMap:
        """The pairs read backwards (gradient of a convolution, or a transposed convolution)."""
        swapped = tuple((k, o, i) for k, i, o in self.pairs)
        return KernelMap(self.n_out, self.n_in, swapped, self.identity)

    @property
    def num_pairs(self) -> int:
        n = sum(len(i) for _, i, _ in self.pairs)
        return n + (self.n_in if self.identity is not None else 0)


class CoordinateManager:
    """The coordinate sets of one geometry at every tensor stride, and their cached kernel maps.

    Built from the unique stride-1 keys (sorted). Coarser sets, kernel maps and down-sampling maps
    are computed on first use and kept, so all layers (and all replicas of a batch, see
    :class:`~distdpo_ros.sparse.tensor.SparseTensor`) share them.
    """

    def __init__(self, keys: Tensor, batch_size: int) -> None:
        self.batch_size = batch_size
        self._keys: dict[int, Tensor] = {1: keys}
        self._coords: dict[int, Tensor] = {}
        self._submanifold: dict[int, KernelMap] = {}
        self._down: dict[int, KernelMap] = {}
        self._up: dict[int, KernelMap] = {}

    @classmethod
    def from_coordinates(cls, coords: Tensor, batch_size: int | None = None) -> CoordinateManager:
        """From (N, 4) integer rows (batch, x, y, z) at stride 1 (duplicates merged, sorted)."""
        check_coordinates(coords)
        keys = torch.unique(pack_keys(coords))
        if batch_size is None:
            batch_size = int(coords[:, 0].max().item()) + 1 if len(coords) else 0
        return cls(keys, batch_size)

    @property
    def device(self) -> torch.device:
        return self._keys[1].device

    def keys(self, stride: int) -> Tensor:
        """Sorted keys of the set at ``stride`` (a power of two), built from the finer sets."""
        if stride not in self._keys:
            if stride < 2 or stride & (stride - 1):
                raise ValueError(f'tensor stride must be a power of two, got {stride}')
            self.downsample_map(stride // 2)
        return self._keys[stride]

    def coords(self, stride: int) -> Tensor:
        """(N_s, 4) int64 rows (batch, x, y, z) of the set at ``stride``, in key order."""
        if stride not in self._coords:
            self._coords[stride] = unpack_keys(self.keys(stride))
        return self._coords[stride]

    def num_voxels(self, stride: int) -> int:
        return len(self.keys(stride))

    def batch_ids(self, stride: int) -> Tensor:
        return self.keys(stride) >> (3 * AXIS_BITS)

    def submanifold_map(self, stride: int) -> KernelMap:
        """Kernel-3 stride-1 map at ``stride``: output set = input set, neighbours at +-stride."""
        if stride not in self._submanifold:
            self._submanifold[stride] = self._build_submanifold(stride)
        return self._submanifold[stride]

    def downsample_map(self, stride: int) -> KernelMap:
        """Kernel-2 stride-2 map from ``stride`` to ``2 * stride`` (creates the coarser set)."""
        if stride not in self._down:
            self._down[stride] = self._build_downsample(stride)
        return self._down[stride]

    def upsample_map(self, stride: int) -> KernelMap:
        """Transposed kernel-2 map from ``stride`` onto the existing set at ``stride // 2``."""
        if stride // 2 not in self._keys:
            raise ValueError(f'no coordinate set at stride {stride // 2} to up-sample onto')
        if stride not in self._up:
            self._up[stride] = self.downsample_map(stride // 2).transposed()
        return self._up[stride]

    def _build_submanifold(self, stride: int) -> KernelMap:
        keys = self.keys(stride)
        n = len(keys)
        # Offsets k and 26 - k are mirror images: if u + o = v then v - o = u, so half the searches
        # give all 26 non-centre pair lists.
        half = offset_keys(OFFSETS_K3[:CENTRE_K3]).to(keys.device) * stride
        # One sorted row of queries per offset: cache-friendly binary searches (12 % faster).
        query = keys[None, :] + half[:, None]
        found_at = torch.searchsorted(keys, query).clamp_(max=max(n - 1, 0))
        found = keys[found_at] == query if n else torch.zeros_like(query, dtype=torch.bool)
        pairs: list[tuple[int, Tensor, Tensor]] = []
        mirrored: list[tuple[int, Tensor, Tensor]] = []
        for k in range(CENTRE_K3):
            out_rows = found[k].nonzero().squeeze(1)
            if len(out_rows) == 0:
                continue
            in_rows = found_at[k, out_rows]
            pairs.append((k, in_rows, out_rows))
            mirrored.append((26 - k, out_rows, in_rows))
        return KernelMap(n, n, tuple(pairs + mirrored[::-1]), identity=CENTRE_K3)

    def _build_downsample(self, stride: int) -> KernelMap:
        coords = self.coords(stride)
        spatial = coords[:, 1:]
        parent = torch.div(spatial, 2 * stride, rounding_mode='floor') * (2 * stride)
        code_xyz = torch.div(spatial - parent, stride, rounding_mode='floor')
        code = code_xyz[:, 0] + 2 * code_xyz[:, 1] + 4 * code_xyz[:, 2]
        coarse_keys, parent_row = torch.unique(
            pack_keys(torch.cat([coords[:, :1], parent], dim=1)), return_inverse=True)
        self._keys[2 * stride] = coarse_keys
        order = torch.argsort(code, stable=True)
        counts = torch.bincount(code, minlength=8).tolist()
        pairs = []
        for k, rows in enumerate(torch.split(order, counts)):
            if len(rows):
                pairs.append((k, rows, parent_row[rows]))
        return KernelMap(len(coords), len(coarse_keys), tuple(pairs))
