"""Classifier-free guidance: eps = eps_u + w (eps_c - eps_u), the all-zero scan as null condition.

`GuidedDenoiser` turns a conditional noise predictor into the function eps(x_t, t) a sampler calls.
It encodes the scan (and the null condition) ONCE per sampling run, and evaluates the conditional
and unconditional branches in ONE forward pass on a doubled batch (the reference ran the encoder
twice and the UNet twice per step, reference §3.4, §6). Weights 1 and 0 need one branch only.
Both shortcuts can be switched off (`cache_condition`, `batched`) to measure what they buy.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class ConditionalNoiseModel(Protocol):
    """What the sampler needs from a noise predictor (see distdpo_ros.models.DiffusionNet)."""

    def encode(self, scan: torch.Tensor) -> Any:
        """Condition of a batch of scans (B, M, 3); the result type has a `cat(list)` method."""
        ...

    def null_condition(self, batch: int) -> Any:
        """Condition of the all-zero scan for `batch` samples."""
        ...

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Predicted noise (B, N, 3) of x_t (B, N, 3) at timesteps t (B,)."""
        ...


def apply_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, weight: float
                   ) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u)."""
    return torch.lerp(eps_uncond, eps_cond, weight) if weight != 1.0 else eps_cond


class GuidedDenoiser:
    """eps(x_t, t) with classifier-free guidance of weight `weight` for one batch of scans."""

    def __init__(self, net: ConditionalNoiseModel, scan: torch.Tensor, weight: float,
                 batched: bool = True, cache_condition: bool = True) -> None:
        self.net = net
        self.scan = scan
        self.weight = float(weight)
        self.batched = batched
        self.cache_condition = cache_condition
        self.batch = scan.shape[0]
        self._cached = self._conditions() if cache_condition else None

    def _conditions(self) -> tuple[Any, Any]:
        """(condition, null condition); batched: one condition of 2B items, null None.

        The batched condition interleaves the branches (scene 0, null, scene 1, null, ...) so
        that the doubled x_t holds each cloud twice in a row and the network can voxelise it
        once for both branches (DiffusionNet shares the geometry of consecutive identical items).
        """
        uses_cond, uses_null = self.weight != 0.0, self.weight != 1.0
        if self.batched and uses_cond and uses_null:
            items = []
            for b in range(self.batch):
                items += [self.net.encode(self.scan[b:b + 1]), self.net.null_condition(1)]
            return type(items[0]).cat(items), None
        cond = self.net.encode(self.scan) if uses_cond else None
        null = self.net.null_condition(self.batch) if uses_null else None
        return cond, null

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, null = self._cached if self.cache_condition else self._conditions()
        if self.weight == 1.0:
            return self.net(x_t, t, cond)
        if self.weight == 0.0:
            return self.net(x_t, t, null)
        if null is None:  # batched: rows 2b (conditional) and 2b + 1 (unconditional)
            eps = self.net(x_t.repeat_interleave(2, dim=0), t.repeat_interleave(2), cond)
            eps = eps.view(self.batch, 2, *eps.shape[1:])
            eps_cond, eps_uncond = eps[:, 0], eps[:, 1]
        else:
            eps_cond = self.net(x_t, t, cond)
            eps_uncond = self.net(x_t, t, null)
        return apply_guidance(eps_cond, eps_uncond, self.weight)
