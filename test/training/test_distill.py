"""Distillation-DPO: the student really learns (Eq. 18 gradient), pairs follow the metric, the loop
trains, exports a student the Completer loads and resumes exactly."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from distdpo_ros.checkpoint import ModelBundle, save_model
from distdpo_ros.completion import Completer
from distdpo_ros.config import preset
from distdpo_ros.models import DiffusionNet
from distdpo_training.engine import read_log
from distdpo_training.loops.distill import (
    DistillConfig,
    DistillTask,
    NoisePredictor,
    diffusion_mse,
    rank_pairs,
    surrogate_loss,
)


def _teacher(seed: int = 0) -> ModelBundle:
    """A random tiny teacher whose BatchNorm statistics fit its inputs (as a trained one's do)."""
    config = preset('tiny', 'teacher')
    torch.manual_seed(seed)
    net = DiffusionNet(config)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration passes
    scan = torch.stack([_scan(seed), _scan(seed + 1)])
    with torch.no_grad():
        cond = net.encode(scan)
        for t in (100, 500, 900):
            x_t = scan.repeat(1, config.replication, 1)
            x_t = x_t + torch.randn_like(x_t) * 0.5
            net(x_t, torch.full((2,), t), cond)
    for m in norms:
        m.momentum = 0.1
    return ModelBundle(config=config, diffusion=net.eval())


def _stub_engine() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device('cpu'), autocast=contextlib.nullcontext)


def _scan(seed: int, points: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(points, generator=g) * 2 * torch.pi
    radius = 4 + 20 * torch.rand(points, generator=g)
    z = -1.7 + 0.05 * torch.randn(points, generator=g)
    return torch.stack([radius * angle.cos(), radius * angle.sin(), z], 1)


def _student_samples(seed: int = 0, points: int = 200):
    """A task whose student is a fresh tiny net, and its one-step pair for two scans."""
    teacher = _teacher()
    task = DistillTask(DistillConfig(model=SimpleNamespace(build=lambda: teacher.config)),
                       teacher)
    task.student = NoisePredictor(DiffusionNet(task.model))
    task.student.net.load_state_dict(teacher.diffusion.state_dict())
    task.student.eval()
    scan = torch.stack([_scan(1, points), _scan(2, points)])
    with torch.no_grad():
        cond = teacher.diffusion.encode(scan)
    gens = [torch.Generator().manual_seed(seed + b) for b in range(2)]
    samples, _ = task.generate(_stub_engine(), scan, cond, gens)
    return task, samples


def test_student_gradient_is_eq18_and_nonzero():
    task, samples = _student_samples(points=12)  # small: the Jacobian is built row by row
    x_first, x_second = samples.split(2)
    g = torch.Generator().manual_seed(7)
    d_w, d_l = (torch.randn(x_first.shape, generator=g) for _ in range(2))
    param = task.student.net.denoiser.last[2].weight  # the head: its Jacobian is cheap
    omega = 2.0

    loss = surrogate_loss(x_first, x_second, d_w, d_l, None, None, 'paper', omega)
    (grad,) = torch.autograd.grad(loss, param, retain_graph=True)

    # by hand: (1/omega) [J_l^T d_l - J_w^T d_w] / (elements per sample * batch)
    def flat_outputs(which: torch.Tensor) -> torch.Tensor:
        return which.reshape(-1)

    count = x_first[0].numel() * x_first.shape[0]
    rows_w, rows_l = [], []
    for out, rows in ((x_first, rows_w), (x_second, rows_l)):
        flat = flat_outputs(out)
        for i in range(flat.numel()):
            (row,) = torch.autograd.grad(flat[i], param, retain_graph=True)
            rows.append(row.reshape(-1))
    jac_w, jac_l = torch.stack(rows_w), torch.stack(rows_l)  # (outputs, params)
    by_hand = (jac_l.T @ d_l.reshape(-1) - jac_w.T @ d_w.reshape(-1)) / (count * omega)
    assert by_hand.abs().max() > 1e-6  # the student does learn
    torch.testing.assert_close(grad.reshape(-1), by_hand, atol=1e-5, rtol=1e-4)

    reversed_loss = surrogate_loss(x_first, x_second, d_w, d_l, None, None, 'reversed', omega)
    (rev,) = torch.autograd.grad(reversed_loss, param, retain_graph=True)
    torch.testing.assert_close(rev, -grad)


def test_released_variant_gives_exactly_zero_student_gradient():
    task, samples = _student_samples()
    x_first, x_second = samples.split(2)
    noise = 0.3 * torch.randn_like(x_first)
    d_w, d_l = torch.randn_like(x_first), torch.randn_like(x_second)
    loss = surrogate_loss(x_first, x_second, d_w, d_l, noise, noise, 'released', 1.0)
    params = [p for p in task.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert loss.requires_grad
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_winner_follows_the_metric_and_swaps_with_the_ground_truth():
    gt = torch.stack([_scan(3, 300)])
    near = gt[:, :200] + 0.01
    far = gt[:, :200] + 1.0
    winners, losers, first_won = rank_pairs(near, far, gt, 'cd')
    assert bool(first_won[0]) and torch.equal(winners, near) and torch.equal(losers, far)
    winners, losers, first_won = rank_pairs(near, far, far, 'cd')  # far is now the truth
    assert not bool(first_won[0]) and torch.equal(winners, far) and torch.equal(losers, near)
    _, _, first_won = rank_pairs(near, far, gt, 'jsd')
    assert bool(first_won[0])


def test_assistant_loss_goes_down_on_fixed_student_samples():
    task, samples = _student_samples(points=50)
    samples = samples.detach()
    with torch.no_grad():
        cond = task.teacher_bundle.diffusion.encode(torch.stack([_scan(1, 50), _scan(2, 50)] * 2))
    assistant = NoisePredictor(DiffusionNet(task.model))
    assistant.net.load_state_dict(task.teacher_bundle.diffusion.state_dict())
    assistant.eval()
    opt = torch.optim.Adam([p for p in assistant.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (samples.shape[0],), generator=g)
    eps = torch.randn(samples.shape, generator=g)
    losses = []
    for _ in range(12):
        loss = diffusion_mse(assistant, samples, t, eps, cond, task.schedule)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.98 * np.mean(losses[:3])


def _run(tmp: Path, data: Path, teacher: Path, steps: int, resume: bool = False,
         extra: tuple[str, ...] = ()) -> int:
    from distdpo_ros.cli import main

    args = ['train', 'distill', '--config', 'distill_tiny', '--data', str(data), '--out',
            str(tmp), '--teacher', str(teacher), '--max-steps', str(steps), '--device', 'cpu',
            '--set', 'data.train=["00"]', '--set', 'data.val=["01"]', '--set',
            'train.ckpt_every=2', '--set', 'train.val_every=0', '--set', 'train.log_every=1',
            '--set', 'train.val_at_start=false', *extra]
    return main(args + (['--resume'] if resume else []))


def _losses(run: Path) -> list[float]:
    return [r['student_loss'] for r in read_log(run / 'log.jsonl')]


def test_short_run_exports_a_student_and_resumes_exactly(sim_dataset, tmp_path):
    teacher_dir = save_model(tmp_path / 'teacher', _teacher(3))
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert _run(full, sim_dataset, teacher_dir, 4) == 0
    assert _run(part, sim_dataset, teacher_dir, 2) == 0
    assert _run(part, sim_dataset, teacher_dir, 4, resume=True) == 0
    assert len(_losses(full)) == 4
    np.testing.assert_allclose(_losses(part)[-2:], _losses(full)[-2:], rtol=1e-5)

    student = Completer.from_pretrained(full / 'model' / 'last', device='cpu')
    assert student.config.role == 'student' and student.config.steps == 8
    out = student.complete(_scan(9).numpy(), seed=0)
    assert out.ndim == 2 and out.shape[1] == 3 and len(out) > 0
    before = _teacher(3).diffusion.denoiser.state_dict()
    after = student.bundle.diffusion.denoiser.state_dict()
    changed = [k for k in before if 'running' not in k and 'num_batches' not in k
               and not torch.equal(before[k], after[k])]
    assert changed, 'the student weights did not move'


def test_score_distillation_runs(sim_dataset, tmp_path):
    from distdpo_ros.cli import main

    teacher_dir = save_model(tmp_path / 'teacher', _teacher(4))
    code = main(['train', 'score-distill', '--config', 'distill_tiny', '--data', str(sim_dataset),
                 '--out', str(tmp_path / 'run'), '--teacher', str(teacher_dir), '--max-steps',
                 '2', '--device', 'cpu', '--set', 'data.train=["00"]', '--set',
                 'data.val=["01"]', '--set', 'train.val_every=0', '--set',
                 'train.val_at_start=false'])
    assert code == 0
    assert (tmp_path / 'run' / 'model' / 'last' / 'config.json').exists()


def test_teacher_that_does_not_fit_the_config_is_refused(sim_dataset, tmp_path, capsys):
    from distdpo_ros.cli import main

    config = preset('small', 'teacher')
    teacher_dir = save_model(tmp_path / 'small', ModelBundle(config, DiffusionNet(config)))
    code = main(['train', 'distill', '--config', 'distill_tiny', '--data', str(sim_dataset),
                 '--out', str(tmp_path / 'run'), '--teacher', str(teacher_dir)])
    assert code == 2
    assert 'does not fit' in capsys.readouterr().err


def test_ablation_writes_one_table_and_skips_finished_runs(sim_dataset, tmp_path, capsys):
    from distdpo_ros.cli import main

    teacher_dir = save_model(tmp_path / 'teacher', _teacher(5))
    args = ['ablate', 'distill', '--teacher', str(teacher_dir), '--data', str(sim_dataset),
            '--out', str(tmp_path / 'abl'), '--config', 'distill_tiny', '--max-steps', '1',
            '--variants', 'released', '--sequences', '01', '--limit', '1', '--device', 'cpu',
            '--renders', '0', '--emd-points', '128',
            '--set', 'data.train=["00"]', '--set', 'data.val=["01"]', '--set',
            'train.val_every=0', '--set', 'train.val_at_start=false']
    assert main(args) == 0
    table = (tmp_path / 'abl' / 'ablation.md').read_text()
    for text in ('Table 2', 'teacher, 50 steps', 'teacher, 8 steps', 'zero student gradient',
                 '1 steps', '| CD (m) |', '| input: conditioning points |',
                 '| input: raw scan subsampled |'):
        assert text in table
    capsys.readouterr()
    assert main(args) == 0  # a second run recomputes nothing
    assert capsys.readouterr().err.count('already trained') == 2


def test_a_ve_teacher_is_distilled_on_its_own_sampler_and_range_of_t():
    """The models we train sample with a VE sampler from t_start: the student's one-step pair
    starts at x_init + sigma_{t_start} eps (and lambda times that), and the assistants and the
    score differences stay inside the teacher's range of t."""
    teacher = _teacher()
    config = teacher.config.replace(sampler='ve-ddim', t_start=100)
    teacher = ModelBundle(config=config, diffusion=teacher.diffusion)
    task = DistillTask(DistillConfig(model=SimpleNamespace(build=lambda: config)), teacher)
    assert task.t_range == (0, 100)
    task.student = NoisePredictor(DiffusionNet(task.model))
    task.student.net.load_state_dict(teacher.diffusion.state_dict())
    task.student.eval()
    scan = torch.stack([_scan(1), _scan(2)])
    calls = []

    def zero_noise(x_t, t, cond):  # a perfect denoiser of x_init: D = x_t - sigma eps_hat
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    task.student.forward = zero_noise
    with torch.no_grad():
        cond = teacher.diffusion.encode(scan)
    gens = [torch.Generator().manual_seed(b) for b in range(2)]
    samples, x_init = task.generate(_stub_engine(), scan, cond, gens)
    assert calls == [100]  # one step from t_start
    first, second = samples.split(2)
    sigma = task.schedule.sigma(100)
    spread = (first - x_init).std().item()
    assert abs(spread - sigma) < 0.1 * sigma  # eps_hat = 0 keeps the start: x_init + sigma eps
    ratio = ((second - x_init).std() / (first - x_init).std()).item()
    assert abs(ratio - task.cfg.pair_noise_scale) < 1e-4


def test_the_config_states_the_scale_and_the_teacher_brings_its_normalisation():
    from distdpo_training.engine.config import ModelSpec
    from distdpo_training.loops.distill import student_config

    teacher = preset('tiny', 'teacher').replace(norm='group', sampler='ve-ddim', t_start=100)
    student = student_config(teacher, ModelSpec(scale='tiny', role='student'), DistillConfig(),
                             'distill_tiny')
    assert (student.norm, student.sampler, student.t_start) == ('group', 've-ddim', 100)
    assert student.role == 'student'
