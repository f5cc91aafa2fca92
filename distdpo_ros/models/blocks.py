"""MinkUNet building blocks with LiDiff's module names and Sequential indices (reference §2.3)."""

from __future__ import annotations

from torch import nn

from distdpo_ros.sparse import (
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseReLU,
    SparseTensor,
)

BASE_CHANNELS = (32, 32, 64, 128, 256, 256, 128, 96, 96)


def channels(channel_ratio: float) -> list[int]:
    """LiDiff's channel list scaled by the ratio: cs = [int(cr * c) for c in cs]."""
    cs = [int(channel_ratio * c) for c in BASE_CHANNELS]
    if min(cs) < 1:
        raise ValueError(f'channel_ratio {channel_ratio} leaves a layer without channels')
    return cs


class BasicConvolutionBlock(nn.Module):
    """net = [conv(ks, stride), BN, ReLU] (indices 0, 1, 2)."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(SparseConv3d(inc, outc, ks, stride), SparseBatchNorm(outc),
                                 SparseReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class BasicDeconvolutionBlock(nn.Module):
    """net = [transposed conv k2 s2, BN, ReLU] (indices 0, 1, 2)."""

    def __init__(self, inc: int, outc: int, ks: int = 2, stride: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(SparseConvTranspose3d(inc, outc, ks, stride),
                                 SparseBatchNorm(outc), SparseReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """ReLU(net(x) + downsample(x)); downsample = identity or [conv k1 (C_in, C_out), BN]."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            SparseConv3d(inc, outc, ks, stride), SparseBatchNorm(outc), SparseReLU(True),
            SparseConv3d(outc, outc, ks, 1), SparseBatchNorm(outc))
        if inc == outc and stride == 1:
            self.downsample = nn.Sequential()
        else:
            self.downsample = nn.Sequential(SparseConv3d(inc, outc, 1, 1), SparseBatchNorm(outc))
        self.relu = SparseReLU(True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.relu(self.net(x) + self.downsample(x))


def stem(in_channels: int, cs: list[int]) -> nn.Sequential:
    """[conv3, BN, ReLU, conv3, BN, ReLU] (indices 0-5)."""
    return nn.Sequential(
        SparseConv3d(in_channels, cs[0], 3, 1), SparseBatchNorm(cs[0]), SparseReLU(True),
        SparseConv3d(cs[0], cs[0], 3, 1), SparseBatchNorm(cs[0]), SparseReLU(True))


def stage(inc: int, outc: int) -> nn.Sequential:
    """Down-sampling stage: [BasicConvolutionBlock k2 s2, ResidualBlock, ResidualBlock]."""
    return nn.Sequential(BasicConvolutionBlock(inc, inc, ks=2, stride=2),
                         ResidualBlock(inc, outc), ResidualBlock(outc, outc))


def up_stage(inc: int, outc: int, skipc: int) -> nn.ModuleList:
    """Up stage: [BasicDeconvolutionBlock, Sequential(Residual(outc + skipc), Residual)]."""
    return nn.ModuleList([
        BasicDeconvolutionBlock(inc, outc, ks=2, stride=2),
        nn.Sequential(ResidualBlock(outc + skipc, outc), ResidualBlock(outc, outc))])
