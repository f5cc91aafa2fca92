"""LiDiff's three sparse networks with its exact state-dict layout (reference §2.3-§2.6, Appendix
   A).

- :class:`MinkGlobalEnc`: stem + 4 stages, the scan condition at stride 16 (256 * cr features).
- :class:`MinkUNetDiff`: the noise predictor; before each of its 8 down/up blocks the features are
  multiplied by latemp(cat(latent(nearest encoder voxel), temp(time embedding))).
- :class:`MinkUNet`: the refinement network (3 * up_factor outputs, Tanh).

Attributes are registered in the reference's order, so ``state_dict()`` lists the same keys in the
same order. The per-point heads (``last``) and the conditioning MLPs act row by row, so they are
applied to voxels (and to encoder voxels) before gathering: exactly the reference's numbers, with
far fewer rows. Networks return per-voxel outputs; :mod:`distdpo_ros.models.networks` slices them
to points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distdpo_ros.models.blocks import channels, stage, stem, up_stage
from distdpo_ros.models.conditioning import Condition
from distdpo_ros.sparse import SparseTensor, cat

LEVELS = ('stage1', 'stage2', 'stage3', 'stage4', 'up1', 'up2', 'up3', 'up4')


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """LiDiff's sinusoidal embedding: [sin(t f_j), cos(t f_j)], f_j = 10000^(-j / (dim/2 - 1))."""
    half = dim // 2
    j = torch.arange(half, dtype=torch.float64, device=t.device)
    freq = torch.exp(j * -(math.log(10000.0) / (half - 1))).float()
    args = t.reshape(-1, 1).float() * freq[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def _mlp(sizes: tuple[int, int, int]) -> nn.Sequential:
    """Linear -> LeakyReLU(0.1) -> Linear (indices 0, 1, 2)."""
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.LeakyReLU(0.1, True),
                         nn.Linear(sizes[1], sizes[2]))


def _head(cs: list[int], out_channels: int, tanh: bool) -> nn.Sequential:
    layers = [nn.Linear(cs[8], 20), nn.LeakyReLU(0.1, True), nn.Linear(20, out_channels)]
    return nn.Sequential(*layers, nn.Tanh()) if tanh else nn.Sequential(*layers)


class MinkGlobalEnc(nn.Module):
    """Condition encoder: stem + stage1..4, output at tensor stride 16 with cs[4] features."""

    def __init__(self, in_channels: int = 3, channel_ratio: float = 1.0,
                 norm: str = 'batch') -> None:
        super().__init__()
        cs = channels(channel_ratio)
        self.out_channels = cs[4]
        self.stem = stem(in_channels, cs, norm)
        self.stage1 = stage(cs[0], cs[1], norm)
        self.stage2 = stage(cs[1], cs[2], norm)
        self.stage3 = stage(cs[2], cs[3], norm)
        self.stage4 = stage(cs[3], cs[4], norm)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = self.stem(x)
        for block in (self.stage1, self.stage2, self.stage3, self.stage4):
            x = block(x)
        return x


class MinkUNetDiff(nn.Module):
    """LiDiff's noise predictor eps_theta(x_t, scan condition, t) on a sparse x_t."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 channel_ratio: float = 1.0, norm: str = 'batch') -> None:
        super().__init__()
        cs = channels(channel_ratio)
        self.embed_dim = cs[-1]
        d, e = self.embed_dim, cs[4]  # time-embedding width, condition width
        # latemp hidden/out widths per level: the channels of the tensor each level modulates.
        mod = {'stage1': (e, cs[0]), 'stage2': (e, cs[1]), 'stage3': (e, cs[2]),
               'stage4': (e, cs[3]), 'up1': (e, cs[4]), 'up2': (cs[5], cs[5]),
               'up3': (cs[6], cs[6]), 'up4': (cs[7], cs[7])}
        self.stem = stem(in_channels, cs, norm)
        downs = {'stage1': (cs[0], cs[1]), 'stage2': (cs[1], cs[2]), 'stage3': (cs[2], cs[3]),
                 'stage4': (cs[3], cs[4])}
        ups = {'up1': (cs[4], cs[5], cs[3]), 'up2': (cs[5], cs[6], cs[2]),
               'up3': (cs[6], cs[7], cs[1]), 'up4': (cs[7], cs[8], cs[0])}
        for name in LEVELS:
            hidden, out = mod[name]
            self.add_module(f'latent_{name}', _mlp((e, e, e)))
            self.add_module(f'latemp_{name}', _mlp((2 * e, hidden, out)))
            self.add_module(f'{name}_temp', _mlp((d, d, e)))
            if name in downs:
                self.add_module(name, stage(*downs[name], norm=norm))
            else:
                self.add_module(name, up_stage(*ups[name], norm=norm))
        self.last = _head(cs, out_channels, tanh=False)

    def forward(self, x: SparseTensor, cond: Condition, t: Tensor) -> Tensor:
        """Per-voxel noise prediction (N * R, out_channels) for the stride-1 tensor ``x``.

        ``cond`` and ``t`` (B,) are indexed by the batch items of ``x`` (``b * R + r``).
        """
        if cond.batch_size != x.batch_size or len(t) != x.batch_size:
            raise ValueError(f'batch mismatch: x has {x.batch_size} items, condition '
                             f'{cond.batch_size}, t {len(t)}')
        # in the parameters' dtype (float32, or float64 for a reference run); autocast unchanged
        temb = timestep_embedding(t, self.embed_dim).to(self.last[0].weight.dtype)
        matches: dict[int, Tensor] = {}  # nearest condition row per voxel, shared by levels

        def modulate(name: str, h: SparseTensor) -> SparseTensor:
            if h.stride not in matches:
                matches[h.stride] = cond.nearest(h.coords, h.replicas)
            latent = getattr(self, f'latent_{name}')(cond.feats)
            temp = getattr(self, f'{name}_temp')(temb)[cond.batch]
            pair = (temp, latent) if name == 'up1' else (latent, temp)  # up1 order as in LiDiff
            table = getattr(self, f'latemp_{name}')(torch.cat(pair, dim=1))
            return h * table.index_select(0, matches[h.stride])

        x0 = self.stem(x)
        x1 = self.stage1(modulate('stage1', x0))
        x2 = self.stage2(modulate('stage2', x1))
        x3 = self.stage3(modulate('stage3', x2))
        x4 = self.stage4(modulate('stage4', x3))
        y = x4
        for name, skip in (('up1', x3), ('up2', x2), ('up3', x1), ('up4', x0)):
            up = getattr(self, name)
            y = up[1](cat(up[0](modulate(name, y)), skip))
        return self.last(y.feats)


class MinkUNet(nn.Module):
    """LiDiff's refinement network: the same backbone without conditioning; Tanh head."""

    def __init__(self, in_channels: int = 3, out_channels: int = 18,
                 channel_ratio: float = 1.0, norm: str = 'batch') -> None:
        super().__init__()
        cs = channels(channel_ratio)
        self.stem = stem(in_channels, cs, norm)
        self.stage1 = stage(cs[0], cs[1], norm)
        self.stage2 = stage(cs[1], cs[2], norm)
        self.stage3 = stage(cs[2], cs[3], norm)
        self.stage4 = stage(cs[3], cs[4], norm)
        self.up1 = up_stage(cs[4], cs[5], cs[3], norm)
        self.up2 = up_stage(cs[5], cs[6], cs[2], norm)
        self.up3 = up_stage(cs[6], cs[7], cs[1], norm)
        self.up4 = up_stage(cs[7], cs[8], cs[0], norm)
        self.last = _head(cs, out_channels, tanh=True)

    def forward(self, x: SparseTensor) -> Tensor:
        """Per-voxel outputs in [-1, 1], shape (N * R, out_channels)."""
        x0 = self.stem(x)
        x1 = self.stage1(x0)
        x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        x4 = self.stage4(x3)
        y = x4
        for up, skip in ((self.up1, x3), (self.up2, x2), (self.up3, x1), (self.up4, x0)):
            y = up[1](cat(up[0](y), skip))
        return self.last(y.feats)
