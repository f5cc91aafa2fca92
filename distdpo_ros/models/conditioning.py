"""The scan condition of the noise predictor: encoder voxels at stride 16 and their features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distdpo_ros.sparse.neighbours import ReferenceIndex


@dataclass
class Condition:
    """Output of :class:`~distdpo_ros.models.minkunet.MinkGlobalEnc` for a batch of scans.

    ``coords`` (E, 4) int64 rows (item, x, y, z) in stride-1 voxel units (multiples of ``stride``),
    ``feats`` (E, C) the encoder features, ``batch_size`` the number of items (each has >= 1
    voxel). The nearest-voxel search structure over ``coords`` is built on first use and kept,
    so every UNet level and every call with this condition (all steps of a sampler) share it.
    """

    coords: Tensor
    feats: Tensor
    batch_size: int
    stride: int = 16
    _index: ReferenceIndex | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.coords) != len(self.feats):
            raise ValueError('condition coords and feats differ in length')

    @property
    def batch(self) -> Tensor:
        """(E,) batch item of every condition voxel."""
        return self.coords[:, 0]

    @staticmethod
    def cat(conditions: Sequence[Condition]) -> Condition:
        """Batch conditions: items of the second follow those of the first, and so on."""
        if not conditions:
            raise ValueError('Condition.cat needs at least one condition')
        stride = conditions[0].stride
        if any(c.stride != stride for c in conditions):
            raise ValueError('cannot batch conditions of different strides')
        coords, offset = [], 0
        for c in conditions:
            shifted = c.coords.clone()
            shifted[:, 0] += offset
            coords.append(shifted)
            offset += c.batch_size
        return Condition(torch.cat(coords), torch.cat([c.feats for c in conditions]), offset,
                         stride)

    def to(self, device: torch.device | str) -> Condition:
        return Condition(self.coords.to(device), self.feats.to(device), self.batch_size,
                         self.stride)

    def detach(self) -> Condition:
        out = Condition(self.coords, self.feats.detach(), self.batch_size, self.stride)
        out._index = self._index  # same coordinates, same search structure
        return out

    def nearest(self, coords: Tensor, replicas: int) -> Tensor:
        """Nearest condition row for every voxel row and replica of a UNet level, same item only.

        coords: (N, 4) geometry rows (batch b, x, y, z); item of replica r is ``b * R + r``.
        Returns (N * R,) rows of this condition, voxel-major like sparse features.
        """
        if self._index is None:
            self._index = ReferenceIndex(self.coords, self.stride)
        if replicas == 1:
            return self._index.nearest(coords)
        query = coords.repeat_interleave(replicas, dim=0)
        query[:, 0] = query[:, 0] * replicas + torch.arange(
            replicas, device=coords.device).repeat(len(coords))
        return self._index.nearest(query)
