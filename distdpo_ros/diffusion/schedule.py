"""The LiDiff noise schedule and its local point noising (reference §3.1-3.2).

Betas rise linearly from `beta_start` to `beta_end` over `T` training steps; abar_t is their
cumulative product of (1 - beta). LiDiff noises every point *locally*: x_t = x_0 + sigma_t * eps
with sigma_t = sqrt(1 - abar_t) and no sqrt(abar_t) scaling of x_0. The samplers treat the residual
r = x_t - x_init as a variance-preserving process with alpha_t = sqrt(abar_t) (reference §3.5).

The tables are float64 on the CPU; samplers read them as Python floats (no device round trips),
training reads `sigmas_on(device)` with a tensor of timesteps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distdpo_ros.errors import UserError


class NoiseSchedule:
    """Linear beta schedule: betas, abar_t, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

    def __init__(self, beta_start: float = 3.5e-5, beta_end: float = 0.007,
                 num_train_timesteps: int = 1000) -> None:
        if not 0 < beta_start < beta_end < 1:
            raise UserError(f'noise schedule needs 0 < beta_start < beta_end < 1, got '
                            f'{beta_start}, {beta_end}')
        if num_train_timesteps < 2:
            raise UserError('noise schedule needs at least 2 timesteps, got '
                            f'{num_train_timesteps}')
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.num_train_timesteps = int(num_train_timesteps)
        # float32 linspace as in the reference, so the betas are bit-identical to the trained ones.
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sigmas = (1.0 - self.alphas_cumprod).sqrt()
        self._device_sigmas: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: object) -> NoiseSchedule:
        """The schedule of a :class:`distdpo_ros.config.ModelConfig`."""
        return cls(config.beta_start, config.beta_end, config.num_train_timesteps)

    def alpha(self, t: int) -> float:
        """alpha_t = sqrt(abar_t) as a Python float."""
        return float(self.sqrt_alphas_cumprod[t])

    def sigma(self, t: int) -> float:
        """sigma_t = sqrt(1 - abar_t) as a Python float."""
        return float(self.sigmas[t])

    def log_snr(self, t: int) -> float:
        """lambda_t = log(alpha_t) - log(sigma_t), the half log signal-to-noise ratio."""
        return math.log(self.alpha(t)) - math.log(self.sigma(t))

    def sigmas_on(self, device: torch.device | str, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
        """sigma_t for all t as a tensor on `device` (cached; index it with a LongTensor)."""
        key = (torch.device(device), dtype)
        if key not in self._device_sigmas:
            self._device_sigmas[key] = self.sigmas.to(device=key[0], dtype=dtype)
        return self._device_sigmas[key]

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Local noising x_t = x_0 + sigma_t * eps; x0 and noise (B, N, 3), t a LongTensor (B,)."""
        sigma = self.sigmas_on(x0.device, x0.dtype)[t].reshape(-1, *([1] * (x0.dim() - 1)))
        return x0 + sigma * noise


def timestep_grid(steps: int, num_train_timesteps: int = 1000, t_start: int | None = None
                  ) -> list[int]:
    """Sampling timesteps, largest first: round(linspace(0, t_start, steps+1)), reversed, last
    dropped.

    `t_start` defaults to T - 1, which is diffusers' "linspace" spacing as used by LiDiff (8 steps:
    999, 874, 749, 624, 500, 375, 250, 125). The solvers take one more step after the last entry,
    to t = 0 (DPM-Solver) or to the clean sample (DDPM, the VE samplers).
    """
    last = num_train_timesteps - 1
    t_start = last if t_start is None else int(t_start)
    if not 1 <= t_start <= last:
        raise UserError(f't_start must lie in [1, {last}], got {t_start}')
    if not 1 <= steps <= t_start:
        raise UserError(f'steps must lie in [1, {t_start}] (t_start {t_start}), got {steps}')
    grid = np.linspace(0, t_start, steps + 1).round()[::-1][:-1].astype(np.int64)
    if len(np.unique(grid)) != steps or grid[-1] <= 0:
        raise UserError(f'{steps} steps do not give distinct timesteps above 0; use fewer steps')
    return [int(t) for t in grid]
