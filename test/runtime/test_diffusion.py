"""Schedule, solvers, guidance and the sampling loop of distdpo_ros.diffusion.

The DPM-Solver++ and DDPM solvers are checked step by step against diffusers fed the same model
outputs and the same noise; the whole loop against denoisers whose answer is known analytically.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distdpo_ros.diffusion import (
    DDPMAncestral,
    DPMSolverSDE,
    GuidedDenoiser,
    NoiseSchedule,
    apply_guidance,
    make_solver,
    sample_residual,
    timestep_grid,
)
from distdpo_ros.errors import UserError

diffusers = pytest.importorskip('diffusers')

SCHEDULE = NoiseSchedule(3.5e-5, 0.007, 1000)


def toy_eps(sample: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth, state-dependent stand-in for a network's noise prediction."""
    return torch.tanh(0.8 * sample + 0.3 * math.sin(t / 97.0)) + 0.1 * torch.cos(3.0 * sample)


def test_schedule_matches_reference_values() -> None:
    abar = SCHEDULE.alphas_cumprod
    assert abar[0].item() == pytest.approx(0.999965, abs=1e-6)
    assert abar[499].item() == pytest.approx(0.4114, abs=1e-4)
    assert abar[999].item() == pytest.approx(0.02943, abs=1e-5)
    expected_sigma = {0: 0.00592, 100: 0.195, 250: 0.451, 500: 0.768, 750: 0.929, 999: 0.9852}
    for t, sigma in expected_sigma.items():
        assert SCHEDULE.sigma(t) == pytest.approx(sigma, abs=6e-4), t
    assert SCHEDULE.alpha(999) == pytest.approx(0.1716, abs=1e-4)


def test_local_noising_moves_each_point_by_sigma_t() -> None:
    x0 = torch.randn(2, 50, 3)
    noise = torch.randn(2, 50, 3)
    t = torch.tensor([0, 999])
    x_t = SCHEDULE.add_noise(x0, t, noise)
    torch.testing.assert_close(x_t[0], x0[0] + SCHEDULE.sigma(0) * noise[0])
    torch.testing.assert_close(x_t[1], x0[1] + SCHEDULE.sigma(999) * noise[1])  # x0 not scaled


def test_timestep_grid_is_lidiffs() -> None:
    assert timestep_grid(8) == [999, 874, 749, 624, 500, 375, 250, 125]
    assert timestep_grid(1) == [999]
    grid50 = timestep_grid(50)
    assert grid50[:3] == [999, 979, 959] and grid50[-1] == 20 and len(grid50) == 50
    for steps in (0, 1000, -3):
        with pytest.raises(UserError):
            timestep_grid(steps)


def reference_dpm_scheduler(steps: int):
    """diffusers' scheduler configured as LiDiff's (0.18 semantics, see the module docstring)."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=3.5e-5, beta_end=0.007, beta_schedule='linear',
        algorithm_type='sde-dpmsolver++', solver_order=2, solver_type='midpoint',
        lower_order_final=True, final_sigmas_type='sigma_min')
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize('steps', [1, 2, 4, 8, 50])
def test_dpm_solver_matches_diffusers(steps: int) -> None:
    """Same model outputs, same noise: same trajectory, step by step, for 1..50 steps.

    diffusers >= 0.2x defaults to final_sigmas_type='zero' (last step lands on sigma = 0, a pure
    x0 prediction); LiDiff used 0.18, whose last step lands on t = 0 (sigma_0 = 0.0059). That is
    'sigma_min' in current releases, so the reference is configured with it. The timestep grid
    ('linspace') is the same in both versions.
    """
    reference = reference_dpm_scheduler(steps)
    solver = DPMSolverSDE(SCHEDULE, steps)
    assert solver.timesteps == reference.timesteps.tolist()
    generator = torch.Generator().manual_seed(steps)
    ours = theirs = torch.randn(2, 300, 3, generator=generator)
    for t in solver.timesteps:
        noise = torch.randn(ours.shape, generator=generator)
        ours_next = solver.step(toy_eps(ours, t), ours, noise)
        theirs = reference.step(toy_eps(theirs, t), t, theirs, variance_noise=noise).prev_sample
        ours = ours_next
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours, theirs, atol=2e-5 * scale, rtol=1e-4)


def test_dpm_solver_lower_order_steps() -> None:
    """First step first order; last step first order only below 15 steps (lower_order_final)."""
    orders = [s.second_order for s in DPMSolverSDE(SCHEDULE, 8)._steps]
    assert orders == [False] + [True] * 6 + [False]
    orders = [s.second_order for s in DPMSolverSDE(SCHEDULE, 20)._steps]
    assert orders == [False] + [True] * 19


@pytest.mark.parametrize('steps', [1, 8, 50])
def test_ddpm_matches_diffusers(steps: int) -> None:
    reference = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=3.5e-5, beta_end=0.007, beta_schedule='linear',
        clip_sample=False, variance_type='fixed_small')
    reference.set_timesteps(timesteps=timestep_grid(steps))
    solver = DDPMAncestral(SCHEDULE, steps)
    start = torch.randn(1, 200, 3, generator=torch.Generator().manual_seed(1))
    ours = theirs = start
    ours_noise, theirs_noise = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in solver.timesteps:
        ours = solver.step(toy_eps(ours, t), ours, torch.randn(ours.shape, generator=ours_noise))
        theirs = reference.step(toy_eps(theirs, t), t, theirs, generator=theirs_noise).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_solver_run_is_single_use_and_fresh_runs_repeat() -> None:
    sample = torch.randn(1, 20, 3)
    noise = torch.randn(1, 20, 3)
    runs = []
    for _ in range(2):
        solver = make_solver('dpm-solver++', SCHEDULE, 2)
        out = sample
        for t in solver.timesteps:
            out = solver.step(toy_eps(out, t), out, noise)
        runs.append(out)
        with pytest.raises(RuntimeError):
            solver.step(toy_eps(out, 0), out, noise)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with pytest.raises(UserError):
        make_solver('euler', SCHEDULE, 2)


def exact_point_set_denoiser(x_init: torch.Tensor, offset: torch.Tensor):
    """The exact noise prediction when the residual x_0 - x_init is the fixed set `offset`."""
    alphas = SCHEDULE.sqrt_alphas_cumprod.float()
    sigmas = SCHEDULE.sigmas.float()

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alphas[t].view(-1, 1, 1), sigmas[t].view(-1, 1, 1)
        return (x_t - x_init - alpha * offset) / sigma

    return denoise


@pytest.mark.parametrize('solver_name', ['dpm-solver++', 'ddpm'])
@pytest.mark.parametrize('steps', [1, 2, 8, 50])
def test_sampler_recovers_a_known_point_set(solver_name: str, steps: int) -> None:
    generator = torch.Generator().manual_seed(3)
    x_init = torch.randn(1, 400, 3, generator=generator) * 10
    offset = torch.randn(1, 400, 3, generator=generator) * 0.4
    denoise = exact_point_set_denoiser(x_init, offset)
    solver = make_solver(solver_name, SCHEDULE, steps)
    out = sample_residual(denoise, x_init, solver, torch.Generator().manual_seed(0))
    error = (out - (x_init + offset)).abs()
    # DPM-Solver stops at t = 0, whose sigma is 0.0059: the answer up to that much noise.
    assert error.max().item() < 0.04
    assert error.mean().item() < 0.01


@pytest.mark.parametrize(('solver_name', 'steps'), [('dpm-solver++', 200), ('ddpm', 999)])
def test_sampler_reproduces_a_gaussian_distribution(solver_name: str, steps: int) -> None:
    """With the exact denoiser of r_0 ~ N(mu, s^2) the samples have that mean and spread.

    Only in the many-step limit: at 50 steps DPM-Solver++ overshoots the spread by 8 % (0.54),
    DDPM undershoots it by 7 %; both converge (200 steps: 0.502; DDPM at 999 steps: 0.498).
    """
    mu, s = 0.3, 0.5
    alphas = SCHEDULE.sqrt_alphas_cumprod.float()
    sigmas = SCHEDULE.sigmas.float()

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alphas[t].view(-1, 1, 1), sigmas[t].view(-1, 1, 1)
        return sigma * (x_t - alpha * mu) / (alpha**2 * s**2 + sigma**2)

    x_init = torch.zeros(1, 6000, 3)
    solver = make_solver(solver_name, SCHEDULE, steps)
    out = sample_residual(denoise, x_init, solver, torch.Generator().manual_seed(5))
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.02)


def test_per_scene_generators_make_results_independent_of_batching_and_order() -> None:
    generator = torch.Generator().manual_seed(11)
    scenes = torch.randn(2, 1, 100, 3, generator=generator) * 5
    offsets = torch.randn(2, 1, 100, 3, generator=generator)

    def run(order: list[int]) -> torch.Tensor:
        x_init = torch.cat([scenes[i] for i in order])
        offset = torch.cat([offsets[i] for i in order])
        gens = [torch.Generator().manual_seed(100 + i) for i in order]
        solver = DPMSolverSDE(SCHEDULE, 4)
        return sample_residual(exact_point_set_denoiser(x_init, offset), x_init, solver, gens)

    forward, backward = run([0, 1]), run([1, 0])
    torch.testing.assert_close(forward[0], backward[1], rtol=0, atol=0)
    torch.testing.assert_close(forward[1], backward[0], rtol=0, atol=0)
    alone = run([1])
    torch.testing.assert_close(alone[0], forward[1], rtol=0, atol=0)


class ToyCondition:
    def __init__(self, feats: torch.Tensor) -> None:
        self.feats = feats

    @classmethod
    def cat(cls, conditions: list[ToyCondition]) -> ToyCondition:
        return cls(torch.cat([c.feats for c in conditions]))


class ToyNet:
    """A conditional noise predictor that counts encoder calls and forward batch sizes."""

    def __init__(self) -> None:
        self.encodes = 0
        self.batches: list[int] = []

    def encode(self, scan: torch.Tensor) -> ToyCondition:
        self.encodes += 1
        return ToyCondition(scan.mean(dim=1) + 0.1 * scan.std(dim=1))

    def null_condition(self, batch: int) -> ToyCondition:
        return self.encode(torch.zeros(batch, 4, 3))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: ToyCondition) -> torch.Tensor:
        self.batches.append(x_t.shape[0])
        return torch.tanh(0.5 * x_t + cond.feats[:, None, :] + t[:, None, None] / 1000.0)


def test_guidance_formula() -> None:
    eps_c, eps_u = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(apply_guidance(eps_c, eps_u, 3.5), eps_u + 3.5 * (eps_c - eps_u))
    torch.testing.assert_close(apply_guidance(eps_c, eps_u, 1.0), eps_c)


def test_batched_guidance_equals_two_separate_passes() -> None:
    scan = torch.randn(2, 30, 3)
    x_t = torch.randn(2, 60, 3)
    t = torch.tensor([999, 500])
    batched_net, separate_net = ToyNet(), ToyNet()
    batched = GuidedDenoiser(batched_net, scan, 3.5, batched=True)(x_t, t)
    separate = GuidedDenoiser(separate_net, scan, 3.5, batched=False)(x_t, t)
    torch.testing.assert_close(batched, separate)
    assert batched_net.batches == [4] and separate_net.batches == [2, 2]
    net = ToyNet()
    eps_c = net(x_t, t, net.encode(scan))
    eps_u = net(x_t, t, net.null_condition(2))
    torch.testing.assert_close(batched, eps_u + 3.5 * (eps_c - eps_u))


def test_weight_one_and_zero_use_one_branch() -> None:
    scan, x_t, t = torch.randn(1, 30, 3), torch.randn(1, 60, 3), torch.tensor([10])
    net = ToyNet()
    torch.testing.assert_close(GuidedDenoiser(net, scan, 1.0)(x_t, t),
                               net(x_t, t, net.encode(scan)))
    torch.testing.assert_close(GuidedDenoiser(net, scan, 0.0)(x_t, t),
                               net(x_t, t, net.null_condition(1)))


def test_encoder_runs_once_per_run_and_equals_recomputing() -> None:
    scan = torch.randn(1, 30, 3)
    x_init = scan.repeat(1, 2, 1)
    results, encodes = [], []
    for cache in (True, False):
        net = ToyNet()
        denoiser = GuidedDenoiser(net, scan, 6.0, cache_condition=cache)
        solver = DPMSolverSDE(SCHEDULE, 8)
        results.append(sample_residual(denoiser, x_init, solver, torch.Generator().manual_seed(2)))
        encodes.append(net.encodes)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert encodes == [2, 16]  # scan + null once, versus both at each of the 8 steps


def test_init_noise_scale_sets_the_starting_spread() -> None:
    """x_T = x_init + lambda * eps: the first denoiser input shows the starting spread."""
    seen = []

    def spy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x_t.clone())
        return torch.zeros_like(x_t)

    x_init = torch.full((1, 5000, 3), 2.0)
    sample_residual(spy, x_init, DPMSolverSDE(SCHEDULE, 1), torch.Generator().manual_seed(0),
                    init_noise_scale=1.1)
    assert np.isclose((seen[0] - x_init).std().item(), 1.1, rtol=0.03)


def test_sampling_stops_between_steps_when_asked():
    from distdpo_ros.diffusion import NoiseSchedule, make_solver, sample_residual
    from distdpo_ros.errors import Cancelled

    calls = []

    def denoiser(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    asked = iter([False, False, True])
    with pytest.raises(Cancelled):
        sample_residual(denoiser, torch.zeros(1, 8, 3), make_solver('dpm-solver++',
                        NoiseSchedule(), 8), should_stop=lambda: next(asked))
    assert len(calls) == 2  # two steps ran, the third was never started
