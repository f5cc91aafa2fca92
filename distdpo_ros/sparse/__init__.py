"""Sparse voxel tensors and convolutions in plain PyTorch with MinkowskiEngine semantics.

Same code on CPU and CUDA; parameters laid out like MinkowskiEngine so LiDiff checkpoints load
as-is.
"""

from distdpo_ros.sparse.coords import CoordinateManager, KernelMap
from distdpo_ros.sparse.functional import sparse_conv
from distdpo_ros.sparse.layers import (
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseGroupNorm,
    SparseLeakyReLU,
    SparseReLU,
)
from distdpo_ros.sparse.neighbours import nearest_reference
from distdpo_ros.sparse.tensor import PointVoxelMap, SparseTensor, cat, quantize

__all__ = ['CoordinateManager', 'KernelMap', 'PointVoxelMap', 'SparseBatchNorm', 'SparseConv3d',
           'SparseConvTranspose3d', 'SparseGroupNorm', 'SparseLeakyReLU', 'SparseReLU',
           'SparseTensor', 'cat', 'nearest_reference', 'quantize', 'sparse_conv']
