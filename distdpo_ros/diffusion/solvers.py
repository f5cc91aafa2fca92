"""Reverse-process solvers: DPM-Solver++ (SDE, 2nd order) and DDPM ancestral sampling.

Each solver is a small object for ONE sampling run, like a diffusers scheduler after
`set_timesteps`: build a fresh one for every scan (LiDiff re-used one across scenes, so every
scene after the first started with a 2nd-order step mixing in the previous scene's data prediction;
reference §3.5). All coefficients are Python floats computed at construction, so a step is a few
fused tensor operations with no host-device traffic.

Both work on a sample r_t that the solver treats as variance preserving, r_t = alpha_t r_0 +
sigma_t eps; the completion sampler feeds the residual r = x_t - x_init (reference §3.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distdpo_ros.diffusion.schedule import NoiseSchedule, timestep_grid
from distdpo_ros.errors import UserError


class Solver(Protocol):
    """One sampling run: call `step` once per entry of `timesteps`, largest first."""

    timesteps: list[int]

    def step(self, eps: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Move `sample` from the current timestep to the next, given the predicted noise."""
        ...


def _data_prediction(steps: list[Any], index: int, eps: torch.Tensor, sample: torch.Tensor
                     ) -> tuple[Any, torch.Tensor]:
    """Step `index`'s coefficients and D_t = (r_t - sigma_t eps) / alpha_t."""
    if index >= len(steps):
        raise RuntimeError('this solver run is finished; build a new solver for a new sample')
    c = steps[index]
    return c, torch.add(sample, eps, alpha=-c.sigma).div_(c.alpha)


@dataclass(frozen=True)
class _DPMStep:
    alpha: float  # alpha and sigma of the current timestep (to form the data prediction)
    sigma: float
    c_sample: float  # first-order update: c_sample r + c_data D + c_noise z
    c_data: float
    c_noise: float
    c_data2: float  # second-order (midpoint) update: c_sample r + c_data2 D + c_prev D_prev + ...
    c_prev: float
    second_order: bool  # False where the first-order update is used (first / lower-order final)


class DPMSolverSDE:
    """DPM-Solver++ (SDE variant), 2nd-order multistep, midpoint, epsilon prediction.

    With lambda = log(alpha / sigma), h = lambda_s - lambda_t (s the next, smaller timestep) and
    the data prediction D_t = (r_t - sigma_t eps) / alpha_t:
      first order   r_s = (sigma_s / sigma_t) e^-h r_t + alpha_s (1 - e^-2h) D_t
                          + sigma_s sqrt(1 - e^-2h) z
      second order  adds 0.5 alpha_s (1 - e^-2h) (D_t - D_prev) / r0, with r0 = h_prev / h.
    The first step is first order (no previous prediction yet); with `lower_order_final` and fewer
    than 15 steps so is the last. The last step goes to t = 0 (sigma_0 = 0.0059, not 0), as in
    diffusers 0.18 used by LiDiff (`final_sigmas_type='sigma_min'` in later releases).
    """

    def __init__(self, schedule: NoiseSchedule, steps: int,
                 lower_order_final: bool = True) -> None:
        self.timesteps = timestep_grid(steps, schedule.num_train_timesteps)
        targets = self.timesteps[1:] + [0]
        self._steps: list[_DPMStep] = []
        h_prev = None
        for index, (t, s) in enumerate(zip(self.timesteps, targets, strict=True)):
            h = schedule.log_snr(s) - schedule.log_snr(t)
            decay = math.exp(-h)
            alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
            c_data = alpha_s * (1.0 - decay * decay)
            last = index == len(self.timesteps) - 1
            second = h_prev is not None and not (last and lower_order_final and steps < 15)
            half_over_r0 = 0.5 * h / h_prev if h_prev is not None else 0.0
            self._steps.append(_DPMStep(
                alpha=schedule.alpha(t), sigma=schedule.sigma(t),
                c_sample=sigma_s / schedule.sigma(t) * decay, c_data=c_data,
                c_noise=sigma_s * math.sqrt(1.0 - decay * decay),
                c_data2=c_data * (1.0 + half_over_r0), c_prev=-c_data * half_over_r0,
                second_order=second))
            h_prev = h
        self._index = 0
        self._prev_data: torch.Tensor | None = None

    def step(self, eps: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        c, data = _data_prediction(self._steps, self._index, eps, sample)
        out = sample * c.c_sample
        if c.second_order:
            out.add_(data, alpha=c.c_data2).add_(self._prev_data, alpha=c.c_prev)
        else:
            out.add_(data, alpha=c.c_data)
        out.add_(noise, alpha=c.c_noise)
        self._prev_data = data
        self._index += 1
        return out


@dataclass(frozen=True)
class _DDPMStep:
    alpha: float
    sigma: float
    c_data: float  # posterior mean = c_data x0_hat + c_sample r_t; std of the added noise
    c_sample: float
    std: float


class DDPMAncestral:
    """DDPM ancestral sampling on a strided grid (diffusers' DDPMScheduler with custom timesteps).

    From t to the next grid entry p (p = -1, i.e. abar = 1, after the last): with beta' = 1 -
    abar_t / abar_p the posterior is N(c_data x0_hat + c_sample r_t, beta' (1 - abar_p) / (1 -
    abar_t)), c_data = sqrt(abar_p) beta' / (1 - abar_t), c_sample = sqrt(1 - beta') (1 - abar_p) /
    (1 - abar_t). Same grid as DPM-Solver; the final step lands on the clean sample (no noise).
    """

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        self.timesteps = timestep_grid(steps, schedule.num_train_timesteps)
        abar = [float(a) for a in schedule.alphas_cumprod]
        self._steps: list[_DDPMStep] = []
        for t, p in zip(self.timesteps, self.timesteps[1:] + [-1], strict=True):
            abar_t, abar_p = abar[t], (abar[p] if p >= 0 else 1.0)
            beta = 1.0 - abar_t / abar_p
            variance = max((1.0 - abar_p) / (1.0 - abar_t) * beta, 1e-20) if p >= 0 else 0.0
            self._steps.append(_DDPMStep(
                alpha=math.sqrt(abar_t), sigma=math.sqrt(1.0 - abar_t),
                c_data=math.sqrt(abar_p) * beta / (1.0 - abar_t),
                c_sample=math.sqrt(1.0 - beta) * (1.0 - abar_p) / (1.0 - abar_t),
                std=math.sqrt(variance)))
        self._index = 0

    def step(self, eps: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        c, data = _data_prediction(self._steps, self._index, eps, sample)
        out = sample * c.c_sample
        out.add_(data, alpha=c.c_data)
        if c.std > 0:
            out.add_(noise, alpha=c.std)
        self._index += 1
        return out


SOLVERS = {'dpm-solver++': DPMSolverSDE, 'ddpm': DDPMAncestral}


def make_solver(name: str, schedule: NoiseSchedule, steps: int) -> Solver:
    """A fresh solver run by name: 'dpm-solver++' (default everywhere) or 'ddpm'."""
    if name not in SOLVERS:
        raise UserError(f'unknown solver {name!r}; choose one of {sorted(SOLVERS)}')
    return SOLVERS[name](schedule, steps)
