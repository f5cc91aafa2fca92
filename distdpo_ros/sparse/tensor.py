"""Sparse voxel tensors: features on the coordinate set of a :class:`CoordinateManager`.

:func:`quantize` turns point clouds into a :class:`SparseTensor` the way LiDiff feeds
MinkowskiEngine (reference §2.1): voxel index ``round(xyz / resolution)`` (``torch.round``, half to
even), one voxel per unique (batch, i, j, k), voxel feature = unweighted mean of its points' xyz,
and a :class:`PointVoxelMap` that gives every point its voxel's output (``TensorField.slice``).

Replicas: a tensor can carry R copies of the same geometry with different features (classifier-free
guidance runs the conditional and unconditional branch on the same x_t). Rows are voxel-major (row
``v * R + r``), so kernel maps, coordinate sets and point->voxel maps are built once for all
replicas. The batch items of such a tensor are numbered ``b * R + r`` for geometry batch ``b`` and
replica ``r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distdpo_ros.sparse.coords import CoordinateManager, check_coordinates, pack_keys


@dataclass
class SparseTensor:
    """Features (N * R, C) of the N voxels at ``stride`` of ``manager``, for R replicas."""

    feats: Tensor
    stride: int
    manager: CoordinateManager
    replicas: int = 1

    def __post_init__(self) -> None:
        expected = self.manager.num_voxels(self.stride) * self.replicas
        if self.feats.dim() != 2 or self.feats.shape[0] != expected:
            raise ValueError(f'features of shape {tuple(self.feats.shape)} do not match '
                             f'{expected} rows (voxels x replicas) at stride {self.stride}')

    @property
    def coords(self) -> Tensor:
        """(N, 4) int64 rows (batch, x, y, z): one row per voxel, not per replica."""
        return self.manager.coords(self.stride)

    @property
    def num_voxels(self) -> int:
        return self.manager.num_voxels(self.stride)

    @property
    def batch_size(self) -> int:
        """Number of batch items: geometry batch size times replicas."""
        return self.manager.batch_size * self.replicas

    def item_ids(self) -> Tensor:
        """(N * R,) batch item of every feature row: ``b * R + r``."""
        r = torch.arange(self.replicas, device=self.feats.device)
        return (self.manager.batch_ids(self.stride)[:, None] * self.replicas + r).reshape(-1)

    def with_feats(self, feats: Tensor) -> SparseTensor:
        """A tensor on the same coordinates with other features."""
        return SparseTensor(feats, self.stride, self.manager, self.replicas)

    def __add__(self, other: SparseTensor) -> SparseTensor:
        """Sum of the features of two tensors on the same coordinate set."""
        if other.manager is not self.manager or other.stride != self.stride or \
                other.replicas != self.replicas:
            raise ValueError('cannot add tensors on different coordinate sets')
        return self.with_feats(self.feats + other.feats)

    def __mul__(self, other: Tensor) -> SparseTensor:
        """Element-wise product of the features with a (N * R, C) or broadcastable tensor."""
        return self.with_feats(self.feats * other)


def cat(*tensors: SparseTensor) -> SparseTensor:
    """Concatenate features of tensors on one coordinate set (first tensor's channels first)."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.manager is not first.manager or t.stride != first.stride or \
                t.replicas != first.replicas:
            raise ValueError('cat needs tensors on the same coordinate set, stride and replicas')
    return first.with_feats(torch.cat([t.feats for t in tensors], dim=1))


@dataclass
class PointVoxelMap:
    """Which voxel every input point fell into, to read voxel outputs back per point."""

    inverse: Tensor  # (G * P,) voxel row of every point, clouds concatenated
    clouds: int  # G distinct clouds (geometry batch items)
    points: int  # P points per cloud
    replicas: int  # R

    def slice(self, feats: Tensor) -> Tensor:
        """Voxel features (N * R, C) -> point features (G * R, P, C), item order ``g * R + r``."""
        c = feats.shape[1]
        per_point = feats.view(-1, self.replicas, c).index_select(0, self.inverse)
        per_point = per_point.view(self.clouds, self.points, self.replicas, c)
        return per_point.permute(0, 2, 1, 3).reshape(self.clouds * self.replicas, self.points, c)


def quantize(points: Tensor, resolution: float, replicas: int = 1) -> tuple[SparseTensor,
                                                                             PointVoxelMap]:
    """Voxelise G clouds (G, P, 3) in metres at ``resolution``; features = mean xyz per voxel.

    Returns the stride-1 sparse tensor (features repeated for ``replicas`` copies) and the map that
    slices its outputs back to the points.
    """
    if points.dim() != 3 or points.shape[2] != 3:
        raise ValueError(f'points must be shaped (batch, points, 3), got {tuple(points.shape)}')
    if not torch.isfinite(points).all():
        raise ValueError('points contain NaN or Inf')
    clouds, n_points, _ = points.shape
    flat = points.reshape(-1, 3)
    grid = torch.round(flat.float() / resolution).to(torch.int64)
    batch = torch.arange(clouds, device=points.device).repeat_interleave(n_points)
    coords = torch.cat([batch[:, None], grid], dim=1)
    check_coordinates(coords)
    keys, inverse = torch.unique(pack_keys(coords), return_inverse=True)
    n_vox = len(keys)
    sums = flat.new_zeros(n_vox, 3).index_add_(0, inverse, flat)
    counts = torch.bincount(inverse, minlength=n_vox).to(flat.dtype)
    mean = sums / counts[:, None]
    feats = mean.repeat_interleave(replicas, dim=0) if replicas > 1 else mean
    manager = CoordinateManager(keys, clouds)
    return SparseTensor(feats, 1, manager, replicas), PointVoxelMap(inverse, clouds, n_points,
                                                                     replicas)
