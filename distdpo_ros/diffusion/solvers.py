"""Reverse-process solvers: LiDiff's DPM-Solver++ and DDPM, and the variance-exploding samplers.

Each solver is a small object for ONE sampling run, like a diffusers scheduler after
`set_timesteps`: build a fresh one for every scan (LiDiff re-used one across scenes, so every
scene after the first started with a 2nd-order step mixing in the previous scene's data prediction;
reference §3.5). All coefficients are Python floats computed at construction, so a step is a few
fused tensor operations with no host-device traffic.

All work on the residual r = x_t - x_init that the completion sampler feeds them.

- `dpm-solver++`, `ddpm` (LiDiff's): the residual is treated as variance preserving, r_t =
  alpha_t r_0 + sigma_t eps, started from x_init + eps at t = T - 1 (reference §3.5). Exact for the
  published checkpoints; every unexplained residual is divided by alpha_t (x5.8 at t = 999).
- `ve-ddim`, `ve-ancestral`: consistent with how LiDiff trains, x_t = x_0 + sigma_t eps (variance
  exploding; in absolute coordinates or on the residual, the same thing, since the noising is a
  pure translation). Started from x_init + sigma_{t_start} eps at any t_start, with an optional
  clamp of each x_0 estimate to within `x0_clamp` metres of x_init.

A solver tells the loop how to start (`start_scale`: the noise multiplier of the first sample)
and whether it needs fresh noise at each step (`stochastic`).
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
    start_scale: float  # x_start = x_init + init_noise_scale * start_scale * eps
    stochastic: bool  # whether `step` uses its `noise` argument

    def step(self, eps: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None
             ) -> torch.Tensor:
        """Move `sample` from the current timestep to the next, given the predicted noise
        (`noise`: fresh N(0, I) of the sample's shape; None for a deterministic solver)."""
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

    start_scale = 1.0  # LiDiff: x_T = x_init + eps (unit std, not sigma_999 = 0.985)
    stochastic = True

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

    start_scale = 1.0
    stochastic = True

    def step(self, eps: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        c, data = _data_prediction(self._steps, self._index, eps, sample)
        out = sample * c.c_sample
        out.add_(data, alpha=c.c_data)
        if c.std > 0:
            out.add_(noise, alpha=c.std)
        self._index += 1
        return out


@dataclass(frozen=True)
class _VEStep:
    sigma: float  # sigma_t of the current timestep
    keep: float  # share of the current noise r_t - D carried to the next timestep
    std: float  # std of the fresh noise added


def _ve_data_prediction(steps: list[_VEStep], index: int, eps: torch.Tensor,
                        sample: torch.Tensor, clamp: float) -> tuple[_VEStep, torch.Tensor]:
    """Step `index`'s coefficients and D = r_t - sigma_t eps, each point's offset from x_init
    shortened to at most `clamp` metres when clamp > 0 (a no-op for shorter offsets)."""
    if index >= len(steps):
        raise RuntimeError('this solver run is finished; build a new solver for a new sample')
    c = steps[index]
    data = torch.add(sample, eps, alpha=-c.sigma)
    if clamp > 0:
        length = torch.linalg.vector_norm(data, dim=-1, keepdim=True)
        data = data * (clamp / length.clamp_min(clamp))
    return c, data


class _VESolver:
    """Shared set-up of the VE samplers: grid from t_start, sigmas as Python floats."""

    def __init__(self, schedule: NoiseSchedule, steps: int, t_start: int | None = None,
                 x0_clamp: float = 0.0) -> None:
        if not x0_clamp >= 0:
            raise UserError(f'x0_clamp must be >= 0 metres, got {x0_clamp}')
        self.timesteps = timestep_grid(steps, schedule.num_train_timesteps, t_start)
        self.x0_clamp = float(x0_clamp)
        self.start_scale = schedule.sigma(self.timesteps[0])
        sigmas = [schedule.sigma(t) for t in self.timesteps] + [0.0]
        self._steps = [self._coefficients(sigma_t, sigma_s)
                       for sigma_t, sigma_s in zip(sigmas[:-1], sigmas[1:], strict=True)]
        self._index = 0

    @staticmethod
    def _coefficients(sigma_t: float, sigma_s: float) -> _VEStep:
        raise NotImplementedError

    def step(self, eps: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None
             ) -> torch.Tensor:
        c, data = _ve_data_prediction(self._steps, self._index, eps, sample, self.x0_clamp)
        out = torch.lerp(data, sample, c.keep) if c.keep > 0 else data
        if c.std > 0:  # stochastic solvers are always given noise
            out = out.add_(noise, alpha=c.std)
        self._index += 1
        return out


class VEDDIM(_VESolver):
    """Deterministic DDIM for x_t = x_0 + sigma_t eps (Euler on the probability-flow ODE in sigma).

    With D = x_t - sigma_t eps_hat (clamped to x_init +- x0_clamp): x_s = D + (sigma_s / sigma_t)
    (x_t - D), i.e. x_s = x_t + (sigma_s - sigma_t) eps_hat without the clamp. The last step
    lands on sigma = 0, the x_0 estimate itself.
    """

    stochastic = False

    @staticmethod
    def _coefficients(sigma_t: float, sigma_s: float) -> _VEStep:
        return _VEStep(sigma=sigma_t, keep=sigma_s / sigma_t, std=0.0)


class VEAncestral(_VESolver):
    """Ancestral sampling (the DDPM posterior) for x_t = x_0 + sigma_t eps.

    The VE forward process has independent increments, x_t = x_s + sqrt(sigma_t^2 - sigma_s^2) z,
    so q(x_s | x_t, x_0) = N(x_0 + (sigma_s^2 / sigma_t^2)(x_t - x_0), sigma_s^2 (1 - sigma_s^2 /
    sigma_t^2)); x_0 is replaced by D (clamped as in VEDDIM). The last step lands on D.
    """

    stochastic = True

    @staticmethod
    def _coefficients(sigma_t: float, sigma_s: float) -> _VEStep:
        ratio = (sigma_s / sigma_t) ** 2
        return _VEStep(sigma=sigma_t, keep=ratio, std=sigma_s * math.sqrt(1.0 - ratio))


SOLVERS = {'dpm-solver++': DPMSolverSDE, 'ddpm': DDPMAncestral, 've-ddim': VEDDIM,
           've-ancestral': VEAncestral}
VE_SOLVERS = ('ve-ddim', 've-ancestral')


def make_solver(name: str, schedule: NoiseSchedule, steps: int, t_start: int | None = None,
                x0_clamp: float = 0.0) -> Solver:
    """A fresh solver run by name (see SOLVERS; 'dpm-solver++' is LiDiff's).

    `t_start` (None: T - 1) and `x0_clamp` (metres, 0: off) apply to the VE samplers only;
    LiDiff's samplers always start at T - 1 and do not clamp.
    """
    if name not in SOLVERS:
        raise UserError(f'unknown solver {name!r}; choose one of {sorted(SOLVERS)}')
    if name in VE_SOLVERS:
        return SOLVERS[name](schedule, steps, t_start, x0_clamp)
    last = schedule.num_train_timesteps - 1
    if (t_start is not None and t_start != last) or x0_clamp > 0:
        raise UserError(f'solver {name!r} starts at t = {last} and does not clamp; t_start and '
                        f'x0_clamp need one of {VE_SOLVERS}')
    return SOLVERS[name](schedule, steps)
