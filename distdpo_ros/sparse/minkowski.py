"""Optional MinkowskiEngine twin of our networks, for comparisons and benchmarks only.

MinkowskiEngine is never required: :func:`available` says whether it imports. :func:`to_minkowski`
turns a copy of one of our networks into the same network made of MinkowskiEngine layers (same
parameter names, so ``load_state_dict`` copies the weights), and :func:`minkowski_forward` runs it
the way LiDiff does (TensorField with unweighted averaging, ``slice`` back to the points). The
condition match uses our exact nearest-voxel search, so both sides see the same modulation.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

from distdpo_ros.sparse.layers import (
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseReLU,
)
from distdpo_ros.sparse.neighbours import nearest_reference


def available() -> bool:
    """Whether MinkowskiEngine can be imported here."""
    return importlib.util.find_spec('MinkowskiEngine') is not None


def to_minkowski(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every sparse layer replaced by its MinkowskiEngine layer."""
    import MinkowskiEngine as ME

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, SparseConv3d):
            return ME.MinkowskiConvolution(module.in_channels, module.out_channels,
                                           kernel_size=module.kernel_size, stride=module.stride,
                                           dimension=3)
        if isinstance(module, SparseConvTranspose3d):
            return ME.MinkowskiConvolutionTranspose(module.in_channels, module.out_channels,
                                                    kernel_size=2, stride=2, dimension=3)
        if isinstance(module, SparseBatchNorm):
            return ME.MinkowskiBatchNorm(module.bn.num_features)
        if isinstance(module, SparseReLU):
            return ME.MinkowskiReLU(inplace=True)
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    twin = convert(copy.deepcopy(model))
    twin.load_state_dict(model.state_dict())
    return twin


def tensor_field(points: Tensor, resolution: float) -> Any:
    """LiDiff's input: a TensorField of (B, N, 3) points, coordinates round(xyz / resolution)."""
    import MinkowskiEngine as ME

    coords = ME.utils.batched_coordinates([torch.round(p.float() / resolution) for p in points],
                                          dtype=torch.float32, device=points.device)
    return ME.TensorField(
        features=points.reshape(-1, 3), coordinates=coords,
        quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE,
        minkowski_algorithm=ME.MinkowskiAlgorithm.SPEED_OPTIMIZED, device=points.device)


def minkowski_forward(twin: nn.Module, points: Tensor, cond: Any = None,
                      t: Tensor | None = None, resolution: float = 0.05) -> Tensor:
    """Per-point output (B * N, C) of a MinkowskiEngine twin of MinkUNetDiff or MinkUNet.

    ``cond`` (a :class:`~distdpo_ros.models.Condition`) and ``t`` are needed for MinkUNetDiff.
    """
    import MinkowskiEngine as ME

    from distdpo_ros.models.minkunet import timestep_embedding

    field = tensor_field(points, resolution)
    conditioned = hasattr(twin, 'latent_stage1')
    temb = timestep_embedding(t, twin.embed_dim) if conditioned else None

    def modulate(name: str, h: Any) -> Any:
        if not conditioned:
            return h
        q = h.C.long()
        p = getattr(twin, f'latent_{name}')(cond.feats[nearest_reference(q, cond.coords,
                                                                          cond.stride)])
        tau = getattr(twin, f'{name}_temp')(temb)[q[:, 0]]
        pair = (tau, p) if name == 'up1' else (p, tau)
        return h * getattr(twin, f'latemp_{name}')(torch.cat(pair, 1))

    x0 = twin.stem(field.sparse())
    x1 = twin.stage1(modulate('stage1', x0))
    x2 = twin.stage2(modulate('stage2', x1))
    x3 = twin.stage3(modulate('stage3', x2))
    x4 = twin.stage4(modulate('stage4', x3))
    y = x4
    for name, skip in (('up1', x3), ('up2', x2), ('up3', x1), ('up4', x0)):
        up = getattr(twin, name)
        y = up[1](ME.cat(up[0](modulate(name, y)), skip))
    return twin.last(y.slice(field).F)
