"""Point-cloud facades used by the sampler, the Completer and training.

:class:`DiffusionNet` holds the condition encoder and the noise predictor of one checkpoint and
works on point clouds in metres; :class:`RefineNet` wraps the refinement MinkUNet.

Classifier-free guidance evaluates the same x_t under two conditions. When consecutive batch items
of ``x_t`` are identical, :meth:`DiffusionNet.forward` voxelises each distinct cloud once and
carries the copies as replicas of one geometry (:mod:`distdpo_ros.sparse.tensor`): coordinate sets,
kernel maps, the point->voxel map and every sparse index operation are shared, only features and
the condition lookups differ. Pass ``share_geometry=False`` to run every item as its own geometry
(same numbers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distdpo_ros.config import ModelConfig
from distdpo_ros.models.conditioning import Condition
from distdpo_ros.models.minkunet import MinkGlobalEnc, MinkUNet, MinkUNetDiff
from distdpo_ros.sparse import quantize


def identical_groups(clouds: Tensor) -> int:
    """Largest R such that the batch is made of consecutive runs of R identical clouds."""
    batch = clouds.shape[0]
    for replicas in range(batch, 1, -1):
        if batch % replicas:
            continue
        grouped = clouds.reshape(batch // replicas, replicas, *clouds.shape[1:])
        if torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
            return replicas
    return 1


def _check_points(points: Tensor, name: str) -> None:
    if points.dim() != 3 or points.shape[-1] != 3 or points.shape[1] == 0:
        raise ValueError(f'{name} must be shaped (batch, points>0, 3), got {tuple(points.shape)}')


class DiffusionNet(nn.Module):
    """Condition encoder (``encoder``) + noise predictor (``denoiser``) on clouds in metres."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.resolution = config.resolution
        self.encoder = MinkGlobalEnc(channel_ratio=config.channel_ratio, norm=config.norm)
        self.denoiser = MinkUNetDiff(channel_ratio=config.channel_ratio, norm=config.norm)

    def encode(self, scan: Tensor) -> Condition:
        """Encode scans (B, M, 3) into the stride-16 condition of each item."""
        _check_points(scan, 'scan')
        x, _ = quantize(scan, self.resolution)
        out = self.encoder(x)
        return Condition(out.coords, out.feats, out.batch_size, out.stride)

    def null_condition(self, batch: int) -> Condition:
        """The unconditional branch of guidance: the encoding of an all-zero scan per item."""
        param = next(self.encoder.parameters())
        return self.encode(torch.zeros(batch, 1, 3, device=param.device, dtype=param.dtype))

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition,
                share_geometry: bool = True) -> Tensor:
        """Predicted noise (B, N, 3) for noisy points ``x_t`` (B, N, 3) at steps ``t`` (B,).

        Item b of ``x_t`` is conditioned on item b of ``cond``. With ``share_geometry`` consecutive
        identical clouds share one voxelisation (see the module docstring).
        """
        _check_points(x_t, 'x_t')
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if cond.batch_size != batch or t.shape != (batch,):
            raise ValueError(f'x_t has {batch} items but the condition has {cond.batch_size} '
                             f'and t has shape {tuple(t.shape)}')
        replicas = identical_groups(x_t) if share_geometry else 1
        x, voxel_map = quantize(x_t[::replicas], self.resolution, replicas)
        eps = self.denoiser(x, cond, t)
        return voxel_map.slice(eps)


class RefineNet(nn.Module):
    """LiDiff's refinement: ``refine_up_factor`` offsets in [-1, 1] m per input point."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.resolution = config.resolution
        self.up_factor = config.refine_up_factor
        self.model = MinkUNet(out_channels=3 * self.up_factor,
                              channel_ratio=config.channel_ratio, norm=config.norm)

    def forward(self, points: Tensor) -> Tensor:
        """Offsets (B, N, up_factor, 3) for points (B, N, 3); refined points = points + offsets."""
        _check_points(points, 'points')
        x, voxel_map = quantize(points, self.resolution)
        out = voxel_map.slice(self.model(x))
        return out.reshape(points.shape[0], points.shape[1], self.up_factor, 3)
