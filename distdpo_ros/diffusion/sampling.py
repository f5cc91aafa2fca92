"""The local-diffusion sampling loop on the residual r = x_t - x_init (reference §3.5).

x_start = x_init + lambda * s * eps (s = the solver's `start_scale`: 1 for LiDiff's samplers,
sigma_{t_start} for the VE ones); at every timestep the denoiser sees x_t = x_init + r and the
solver updates r. Noise comes from explicit torch.Generators, one per scene if wanted, so a
scene's result depends only on its own seed (not on batch composition or on scenes completed
before it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from distdpo_ros.diffusion.solvers import Solver
from distdpo_ros.errors import Cancelled

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StopCheck = Callable[[], bool]  # True: stop before the next network evaluation
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generators: Generators, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`; with a list of generators row b uses generators[b]."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.randn(tuple(shape), generator=generators, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f'{len(generators)} generators for a batch of {shape[0]}')
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                        for g in generators])


def sample_residual(denoiser: Denoiser, x_init: torch.Tensor, solver: Solver,
                    generators: Generators = None, init_noise_scale: float = 1.0,
                    progress: bool = False, should_stop: StopCheck | None = None
                    ) -> torch.Tensor:
    """Run `solver` from x_init + init_noise_scale * solver.start_scale * eps down to x_0; returns
    x_0 (B, N, 3).

    `solver` must be fresh (one per call). Noise is drawn in a fixed order: eps first, then one
    tensor per step of a stochastic solver. `should_stop` is asked before every step; when it
    answers True the run ends with :class:`distdpo_ros.errors.Cancelled` (a shutting-down node
    waits one step, not a scan).
    """
    batch = x_init.shape[0]
    residual = randn(x_init.shape, generators, x_init.device, x_init.dtype)
    residual.mul_(init_noise_scale * solver.start_scale)
    timesteps = [torch.full((batch,), t, dtype=torch.long, device=x_init.device)
                 for t in solver.timesteps]
    for t in tqdm(timesteps, desc='denoising', unit='step', disable=not progress, leave=False):
        if should_stop is not None and should_stop():
            raise Cancelled('sampling stopped on request')
        eps = denoiser(x_init + residual, t)
        noise = randn(x_init.shape, generators, x_init.device, x_init.dtype) \
            if solver.stochastic else None
        residual = solver.step(eps, residual, noise)
    return x_init + residual
