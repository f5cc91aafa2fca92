"""Sparse layers with MinkowskiEngine's parameter layout, so LiDiff checkpoints load unchanged.

- :class:`SparseConv3d`: parameter ``kernel`` shaped (kernel volume, C_in, C_out), x-fastest kernel
  index; kernel 3 stride 1 keeps the coordinate set (submanifold), kernel 2 stride 2 down-samples
  onto ``floor(c / 2s) * 2s`` with offsets {0, 1}, kernel 1 is a matrix product stored as (C_in,
  C_out).
- :class:`SparseConvTranspose3d`: kernel 2 stride 2 onto the existing finer coordinate set.
- :class:`SparseBatchNorm`: wrapper with child ``bn`` (``nn.BatchNorm1d``) over all rows of the
  batch.
- :class:`SparseGroupNorm`: GroupNorm per batch item (over the item's voxels and a group of
  channels); no running statistics, so training and evaluation compute the same function.
- :class:`SparseReLU`, :class:`SparseLeakyReLU`: activations on the features.
No convolution has a bias (MinkowskiEngine's default). Initialisation follows MinkowskiEngine:
kernel ~ U(-1/sqrt(n), 1/sqrt(n)), n = C_in * volume (C_out * volume for the transposed conv).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from distdpo_ros.sparse.functional import sparse_conv
from distdpo_ros.sparse.tensor import SparseTensor


class SparseConv3d(nn.Module):
    """Sparse 3-D convolution (no bias): kernel 3 stride 1, kernel 2 stride 2, or kernel 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1) -> None:
        super().__init__()
        if (kernel_size, stride) not in ((3, 1), (2, 2), (1, 1)):
            raise ValueError(f'unsupported kernel_size={kernel_size}, stride={stride}: '
                             'use (3, 1), (2, 2) or (1, 1)')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        volume = kernel_size ** 3
        shape = (in_channels, out_channels) if volume == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size ** 3)
        nn.init.uniform_(self.kernel, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.kernel_size == 1:
            return x.with_feats(x.feats @ self.kernel)
        if self.stride == 1:
            kmap = x.manager.submanifold_map(x.stride)
            return x.with_feats(sparse_conv(x.feats, self.kernel, kmap, x.replicas))
        kmap = x.manager.downsample_map(x.stride)
        out = sparse_conv(x.feats, self.kernel, kmap, x.replicas)
        return SparseTensor(out, 2 * x.stride, x.manager, x.replicas)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}')


class SparseConvTranspose3d(nn.Module):
    """Transposed kernel-2 stride-2 convolution onto the existing set at half the stride."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2,
                 stride: int = 2) -> None:
        super().__init__()
        if (kernel_size, stride) != (2, 2):
            raise ValueError('only kernel_size=2, stride=2 transposed convolutions are supported')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel = nn.Parameter(torch.empty(8, in_channels, out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.out_channels * 8)
        nn.init.uniform_(self.kernel, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.stride < 2:
            raise ValueError('cannot up-sample a stride-1 tensor')
        kmap = x.manager.upsample_map(x.stride)
        out = sparse_conv(x.feats, self.kernel, kmap, x.replicas)
        return SparseTensor(out, x.stride // 2, x.manager, x.replicas)

    def extra_repr(self) -> str:
        return f'{self.in_channels}, {self.out_channels}, kernel_size=2, stride=2'


class SparseBatchNorm(nn.Module):
    """BatchNorm over the features of all voxels of the batch; child ``bn`` like ME."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_feats(self.bn(x.feats))


class SparseGroupNorm(nn.Module):
    """GroupNorm per batch item: every item's voxels are normalised with their own statistics.

    For item i and channel group g (``groups`` groups of C / groups channels) the mean and biased
    variance are taken over the item's rows and the group's channels, then a per-channel affine
    (``weight``, ``bias``) follows. Replicas of one geometry (guidance) are separate items. The
    function does not depend on train/eval mode or on the other items of the batch. An item
    whose group is constant (e.g. one voxel) normalises to 0, i.e. to ``bias``.
    """

    def __init__(self, num_features: int, groups: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups = math.gcd(num_features, groups)
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: SparseTensor) -> SparseTensor:
        feats = x.feats
        rows, channels = feats.shape
        grouped = feats.reshape(rows, self.groups, channels // self.groups)
        items = x.item_ids()
        count = torch.bincount(items, minlength=x.batch_size).to(feats.dtype)[:, None]
        count = count.mul_(channels // self.groups).clamp_min_(1.0)
        total = feats.new_zeros(x.batch_size, self.groups)
        mean = total.index_add(0, items, grouped.sum(2)).div_(count)
        centred = grouped - mean.index_select(0, items)[:, :, None]
        var = total.index_add(0, items, centred.square().sum(2)).div_(count)
        inv = torch.rsqrt(var + self.eps).index_select(0, items)[:, :, None]
        out = (centred * inv).reshape(rows, channels)
        return x.with_feats(torch.addcmul(self.bias, out, self.weight))

    def extra_repr(self) -> str:
        return f'{self.num_features}, groups={self.groups}, eps={self.eps}'


class SparseReLU(nn.Module):
    """ReLU on the features (``inplace`` overwrites them, as MinkowskiReLU(inplace=True))."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_feats(F.relu(x.feats, inplace=self.inplace))


class SparseLeakyReLU(nn.Module):
    """LeakyReLU on the features."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_feats(F.leaky_relu(x.feats, self.negative_slope))
