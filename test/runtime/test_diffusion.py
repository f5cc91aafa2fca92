"""Schedule, solvers, guidance and the sampling loop of distdpo_ros.diffusion.

The DPM-Solver++ and DDPM solvers are checked step by step against diffusers fed the same model
outputs and the same noise; the whole loop against denoisers whose answer is known analytically.
The variance-exploding samplers are checked against the exact posterior mean of the noise over a
small ground-truth point set (an oracle denoiser under x_t = x_0 + sigma_t eps).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distdpo_ros.diffusion import (
    VE_SOLVERS,
    VEDDIM,
    DDPMAncestral,
    DPMSolverSDE,
    GuidedDenoiser,
    NoiseSchedule,
    VEAncestral,
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


# ------------------------------------------------------------------------------------------------
# variance-exploding samplers


def ve_oracle(gt: torch.Tensor):
    """Exact E[eps | x_t] per point when x_0 is uniform over the points `gt` (G, 3) and
    x_t = x_0 + sigma_t eps: (x_t - E[x_0 | x_t]) / sigma_t, a softmax over all of gt."""
    sigmas = SCHEDULE.sigmas

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = sigmas[t].view(-1, 1, 1)
        x = x_t.double()
        d2 = torch.cdist(x, gt.double()[None].expand(len(x), -1, -1)).square()
        x0 = torch.softmax(-d2 / (2 * sigma**2), dim=2) @ gt.double()
        return ((x - x0) / sigma).float()

    return denoise


def l_shaped_surface() -> torch.Tensor:
    """Ground 4 x 4 m and a 2 m wall along one side, points 0.2 m apart (672 points)."""
    grid = torch.arange(21, dtype=torch.float32) * 0.2
    gx, gy = torch.meshgrid(grid, grid, indexing='ij')
    ground = torch.stack([gx.flatten(), gy.flatten(), torch.zeros(gx.numel())], 1)
    wy, wz = torch.meshgrid(grid, grid[:11], indexing='ij')
    wall = torch.stack([torch.full((wy.numel(),), 4.0), wy.flatten(), wz.flatten()], 1)
    return torch.cat([ground, wall])


def nearest_distance(points: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points.reshape(-1, 3), gt).min(dim=1).values


def surface_distance(points: torch.Tensor) -> torch.Tensor:
    """Distance of every point to the continuous L-shaped surface the ground truth samples."""
    p = points.reshape(-1, 3)
    to_ground = p - torch.stack([p[:, 0].clamp(0, 4), p[:, 1].clamp(0, 4), torch.zeros(len(p))], 1)
    to_wall = p - torch.stack([torch.full((len(p),), 4.0), p[:, 1].clamp(0, 4),
                               p[:, 2].clamp(0, 2)], 1)
    return torch.minimum(to_ground.norm(dim=1), to_wall.norm(dim=1))


def partial_noisy_init(gt: torch.Tensor, seed: int) -> torch.Tensor:
    """x_init: 100 of the ground-truth points (a partial view) jittered by 0.15 m, tiled 4x."""
    g = torch.Generator().manual_seed(seed)
    seen = gt[torch.randperm(len(gt), generator=g)[:100]]
    return (seen + 0.15 * torch.randn(seen.shape, generator=g)).repeat(4, 1)[None]


# Mean distance to the surface after sampling with the oracle from t = 999 (measured about half of
# these: 0.145, 0.085, 0.03, 0.005-0.008, 1e-4; the start sample is ~0.7 m off the surface).
# Few steps end on a posterior mean at a large sigma (8 steps: last sigma 0.22): rounded corners.
ORACLE_SURFACE_DISTANCE = {1: 0.25, 2: 0.15, 4: 0.06, 8: 0.015, 50: 0.001}


@pytest.mark.parametrize('solver_name', VE_SOLVERS)
@pytest.mark.parametrize('steps', list(ORACLE_SURFACE_DISTANCE))
def test_ve_sampler_with_oracle_converges_onto_the_surface(solver_name: str, steps: int) -> None:
    gt = l_shaped_surface()
    x_init = partial_noisy_init(gt, steps)
    solver = make_solver(solver_name, SCHEDULE, steps)
    start = x_init + solver.start_scale * torch.randn(x_init.shape,
                                                      generator=torch.Generator().manual_seed(0))
    out = sample_residual(ve_oracle(gt), x_init, solver, torch.Generator().manual_seed(0))
    assert surface_distance(start).mean().item() > 0.5
    assert surface_distance(out).mean().item() < ORACLE_SURFACE_DISTANCE[steps]


@pytest.mark.parametrize('solver_name', VE_SOLVERS)
def test_ve_sampler_from_t_start_stays_local_and_converges(solver_name: str) -> None:
    """From t_start = 200 (sigma 0.41) the oracle lands the points on the surface near where they
    started; the first denoiser input is x_init + sigma_200 eps."""
    gt = l_shaped_surface()
    x_init = partial_noisy_init(gt, 1)
    seen = []

    def spy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((int(t[0]), (x_t - x_init).std().item()))
        return ve_oracle(gt)(x_t, t)

    solver = make_solver(solver_name, SCHEDULE, 8, t_start=200)
    assert solver.timesteps == [200, 175, 150, 125, 100, 75, 50, 25]
    out = sample_residual(spy, x_init, solver, torch.Generator().manual_seed(0))
    assert [t for t, _ in seen] == solver.timesteps
    assert seen[0][1] == pytest.approx(SCHEDULE.sigma(200), rel=0.05)
    distance = surface_distance(out)
    assert distance.mean().item() < 0.002
    assert (out - x_init).norm(dim=-1).max().item() < 2.0


def test_ve_steps_keep_the_marginals_of_a_known_x0() -> None:
    """With x_0 known exactly (eps = r / sigma when x_0 = x_init), each step maps a sample of
    N(0, sigma_t^2) to one of N(0, sigma_s^2): DDIM by scaling, the ancestral step by its
    posterior mean and variance (the two must add up to sigma_s^2)."""
    for cls in (VEDDIM, VEAncestral):
        solver = cls(SCHEDULE, 4, t_start=600)
        g = torch.Generator().manual_seed(4)
        r = torch.randn(1, 20000, 3, generator=g) * solver.start_scale
        targets = [SCHEDULE.sigma(t) for t in solver.timesteps[1:]] + [0.0]
        for t, target in zip(solver.timesteps, targets, strict=True):
            noise = torch.randn(r.shape, generator=g) if solver.stochastic else None
            r = solver.step(r / SCHEDULE.sigma(t), r, noise)
            assert r.std().item() == pytest.approx(target, rel=0.02, abs=1e-6), (cls, t)


def test_ve_ddim_is_euler_in_sigma() -> None:
    """Without the clamp a DDIM step is x_s = x_t + (sigma_s - sigma_t) eps_hat."""
    solver = make_solver('ve-ddim', SCHEDULE, 8, t_start=500)
    r, eps = torch.randn(1, 50, 3), torch.randn(1, 50, 3)
    t, s = solver.timesteps[0], solver.timesteps[1]
    expected = r + (SCHEDULE.sigma(s) - SCHEDULE.sigma(t)) * eps
    torch.testing.assert_close(solver.step(eps, r, None), expected)


@pytest.mark.parametrize('solver_name', VE_SOLVERS)
def test_x0_clamp_keeps_every_estimate_near_x_init(solver_name: str) -> None:
    """A denoiser that pushes every x_0 estimate 5 m away: with x0_clamp = 1 the result stays
    within 1 m of x_init (the last step lands on the clamped estimate), without it it does not."""
    x_init = torch.randn(1, 500, 3, generator=torch.Generator().manual_seed(6)) * 5

    def away(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x_t, -5.0) / SCHEDULE.sigmas[t].float().view(-1, 1, 1)

    for clamp, inside in ((1.0, True), (0.0, False)):
        solver = make_solver(solver_name, SCHEDULE, 8, t_start=300, x0_clamp=clamp)
        out = sample_residual(away, x_init, solver, torch.Generator().manual_seed(0))
        offset = (out - x_init).norm(dim=-1).max().item()
        assert (offset <= 1.0 + 1e-5) == inside, (clamp, offset)


def test_make_solver_options_are_checked() -> None:
    with pytest.raises(UserError):
        make_solver('dpm-solver++', SCHEDULE, 8, t_start=200)
    with pytest.raises(UserError):
        make_solver('ddpm', SCHEDULE, 8, x0_clamp=1.0)
    assert make_solver('dpm-solver++', SCHEDULE, 8, t_start=999).timesteps == timestep_grid(8)
    with pytest.raises(UserError):
        make_solver('ve-ddim', SCHEDULE, 8, x0_clamp=-1.0)
    with pytest.raises(UserError):
        make_solver('ve-ancestral', SCHEDULE, 50, t_start=20)  # more steps than timesteps
    assert make_solver('ve-ddim', SCHEDULE, 2, t_start=999).start_scale == SCHEDULE.sigma(999)
    assert timestep_grid(4, 1000, 400) == [400, 300, 200, 100]


def test_guided_ve_sampling_equals_the_guidance_formula() -> None:
    """Classifier-free guidance under a VE sampler: the loop with the batched GuidedDenoiser
    equals the loop with eps_u + w (eps_c - eps_u) written out."""
    scan = torch.randn(1, 30, 3)
    x_init = scan.repeat(1, 2, 1)
    net = ToyNet()
    cond, null = net.encode(scan), net.null_condition(1)

    def by_hand(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return apply_guidance(net(x_t, t, cond), net(x_t, t, null), 4.0)

    results = []
    for denoiser in (GuidedDenoiser(ToyNet(), scan, 4.0), by_hand):
        solver = make_solver('ve-ancestral', SCHEDULE, 4, t_start=250, x0_clamp=0.5)
        results.append(sample_residual(denoiser, x_init, solver, torch.Generator().manual_seed(9)))
    torch.testing.assert_close(results[0], results[1])
