"""MinkUNet building blocks with LiDiff's module names and Sequential indices (reference §2.3).

Every block takes ``norm``: 'batch' is LiDiff's BatchNorm (:class:`SparseBatchNorm`, weight names
``...bn.weight`` as in published checkpoints); 'group' is a per-item GroupNorm
(:class:`SparseGroupNorm`, ``...weight``/``...bias``) for the models we train, which computes the
same function in train and eval mode at every noise level. The Sequential indices are the same.
"""

from __future__ import annotations

from torch import nn

from distdpo_ros.sparse import (
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseGroupNorm,
    SparseReLU,
    SparseTensor,
)

BASE_CHANNELS = (32, 32, 64, 128, 256, 256, 128, 96, 96)
NORM_GROUPS = 8  # groups of SparseGroupNorm (fewer where the width is not a multiple of 8)


def channels(channel_ratio: float) -> list[int]:
    """LiDiff's channel list scaled by the ratio: cs = [int(cr * c) for c in cs]."""
    cs = [int(channel_ratio * c) for c in BASE_CHANNELS]
    if min(cs) < 1:
        raise ValueError(f'channel_ratio {channel_ratio} leaves a layer without channels')
    return cs


def norm_layer(num_features: int, norm: str = 'batch') -> nn.Module:
    """The normalisation of a block: 'batch' (LiDiff's) or 'group' (per item)."""
    if norm == 'batch':
        return SparseBatchNorm(num_features)
    if norm == 'group':
        return SparseGroupNorm(num_features, NORM_GROUPS)
    raise ValueError(f'unknown norm {norm!r}; use batch or group')


class BasicConvolutionBlock(nn.Module):
    """net = [conv(ks, stride), norm, ReLU] (indices 0, 1, 2)."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1,
                 norm: str = 'batch') -> None:
        super().__init__()
        self.net = nn.Sequential(SparseConv3d(inc, outc, ks, stride), norm_layer(outc, norm),
                                 SparseReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class BasicDeconvolutionBlock(nn.Module):
    """net = [transposed conv k2 s2, norm, ReLU] (indices 0, 1, 2)."""

    def __init__(self, inc: int, outc: int, ks: int = 2, stride: int = 2,
                 norm: str = 'batch') -> None:
        super().__init__()
        self.net = nn.Sequential(SparseConvTranspose3d(inc, outc, ks, stride),
                                 norm_layer(outc, norm), SparseReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """ReLU(net(x) + downsample(x)); downsample = identity or [conv k1 (C_in, C_out), norm]."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1,
                 norm: str = 'batch') -> None:
        super().__init__()
        self.net = nn.Sequential(
            SparseConv3d(inc, outc, ks, stride), norm_layer(outc, norm), SparseReLU(True),
            SparseConv3d(outc, outc, ks, 1), norm_layer(outc, norm))
        if inc == outc and stride == 1:
            self.downsample = nn.Sequential()
        else:
            self.downsample = nn.Sequential(SparseConv3d(inc, outc, 1, 1),
                                            norm_layer(outc, norm))
        self.relu = SparseReLU(True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.relu(self.net(x) + self.downsample(x))


def stem(in_channels: int, cs: list[int], norm: str = 'batch') -> nn.Sequential:
    """[conv3, norm, ReLU, conv3, norm, ReLU] (indices 0-5)."""
    return nn.Sequential(
        SparseConv3d(in_channels, cs[0], 3, 1), norm_layer(cs[0], norm), SparseReLU(True),
        SparseConv3d(cs[0], cs[0], 3, 1), norm_layer(cs[0], norm), SparseReLU(True))


def stage(inc: int, outc: int, norm: str = 'batch') -> nn.Sequential:
    """Down-sampling stage: [BasicConvolutionBlock k2 s2, ResidualBlock, ResidualBlock]."""
    return nn.Sequential(BasicConvolutionBlock(inc, inc, ks=2, stride=2, norm=norm),
                         ResidualBlock(inc, outc, norm=norm), ResidualBlock(outc, outc, norm=norm))


def up_stage(inc: int, outc: int, skipc: int, norm: str = 'batch') -> nn.ModuleList:
    """Up stage: [BasicDeconvolutionBlock, Sequential(Residual(outc + skipc), Residual)]."""
    return nn.ModuleList([
        BasicDeconvolutionBlock(inc, outc, ks=2, stride=2, norm=norm),
        nn.Sequential(ResidualBlock(outc + skipc, outc, norm=norm),
                      ResidualBlock(outc, outc, norm=norm))])
