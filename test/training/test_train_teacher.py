"""`distdpo train teacher` on two tiny simulated drives with the tiny model.

Covers: the loss falls and the exported model completes a scan through the Completer; a stopped
and resumed run logs the same losses as an uninterrupted one; two torchrun processes reach the
same weights as one; clear errors for bad configs, missing maps and a config that does not fit
the state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distdpo_ros.cli import main as distdpo
from distdpo_training.engine import read_log
from distdpo_training.engine.state import load_state
from distdpo_training.loops.teacher import TeacherConfig, draw_training_noise, lidiff_loss


def train(data: Path, out: Path, *extra: str, config: str = 'teacher_tiny') -> int:
    return distdpo(['train', 'teacher', '--config', config, '--data', str(data), '--out',
                    str(out), *extra])


def losses(out: Path) -> list[float]:
    return [r['loss'] for r in read_log(out / 'log.jsonl')]


def test_teacher_learns_and_exports_a_model_the_completer_loads(sim_dataset: Path,
                                                               tmp_path: Path) -> None:
    from distdpo_ros.completion import Completer
    from distdpo_training.data.kitti import KittiSequence

    assert train(sim_dataset, tmp_path, '--max-steps', '20', '--set', 'train.val_every=10') == 0
    loss = losses(tmp_path)
    assert len(loss) == 20
    assert np.mean(loss[-5:]) < 0.85 * np.mean(loss[:5])
    val = read_log(tmp_path / 'log.jsonl', kind='val')
    assert [r['step'] for r in val] == [0, 10, 20] and all(r['cd'] > 0 for r in val)
    for name in ('raw', 'cond', 'jit', 'sub'):  # the input baselines sit beside the model
        assert all(r[f'cd_input_{name}'] > 0 and r[f'fscore_input_{name}'] >= 0 for r in val)
    assert len({r['cd_input_cond'] for r in val}) == 1  # the same scans at every validation
    completer = Completer.from_pretrained(tmp_path / 'model' / 'last', device='cpu')
    assert completer.config.notes['trained_by'] == 'distdpo train teacher'
    assert completer.config.notes['step'] == 20
    scan = KittiSequence(sim_dataset / 'sequences' / '01').scan(0)
    out = completer.complete(scan, steps=2, seed=0)
    assert out.ndim == 2 and out.shape[1] == 3 and len(out) > 0
    best = Completer.from_pretrained(tmp_path / 'model' / 'best', device='cpu')
    trained = [r for r in val if r['step'] > 0]  # the untrained start is never model/best
    assert best.config.notes['best'] == min(r['cd'] for r in trained)
    assert best.config.notes['step'] == min(trained, key=lambda r: r['cd'])['step']


def test_resumed_run_repeats_the_uninterrupted_losses(sim_dataset: Path, tmp_path: Path) -> None:
    quick = ['--set', 'train.val_every=0', '--set', 'train.val_at_start=false']
    assert train(sim_dataset, tmp_path / 'full', '--max-steps', '7', *quick) == 0
    assert train(sim_dataset, tmp_path / 'part', '--max-steps', '4', *quick) == 0  # mid-epoch
    assert train(sim_dataset, tmp_path / 'part', '--max-steps', '7', '--resume', *quick) == 0
    assert losses(tmp_path / 'part') == losses(tmp_path / 'full')


def test_warmup_clip_and_ema_are_used_and_resume_exactly(sim_dataset: Path,
                                                          tmp_path: Path) -> None:
    from safetensors.torch import load_file

    quick = ['--set', 'train.val_every=0', '--set', 'train.val_at_start=false',
             '--set', 'train.log_every=1', '--set', 'warmup_steps=4', '--set', 'grad_clip=0.5',
             '--set', 'ema_decay=0.9', '--set', 'reg_weight=0', '--set', 't_max=200']
    assert train(sim_dataset, tmp_path / 'full', '--max-steps', '6', *quick) == 0
    records = read_log(tmp_path / 'full' / 'log.jsonl')
    lrs = [r['lr'] for r in records]
    # logged after the scheduler's step (the next step's rate); teacher_tiny's lr is 1e-3
    assert lrs[:4] == pytest.approx([5e-4, 7.5e-4, 1e-3, 1e-3])
    assert all(r['grad_norm'] > 0 for r in records)
    state = load_state(tmp_path / 'full' / 'state' / 'last.safetensors')
    raw = state['modules']['diffusion']
    average = state['modules']['diffusion_ema']
    exported = load_file(tmp_path / 'full' / 'model' / 'last' / 'weights.safetensors')
    key = 'denoiser.last.2.weight'
    assert torch.equal(exported[key], average['net.' + key])  # the EMA is what ships
    assert not torch.equal(average['net.' + key], raw['net.' + key])
    assert train(sim_dataset, tmp_path / 'part', '--max-steps', '3', *quick) == 0
    assert train(sim_dataset, tmp_path / 'part', '--max-steps', '6', '--resume', *quick) == 0
    assert losses(tmp_path / 'part') == losses(tmp_path / 'full')
    resumed = load_file(tmp_path / 'part' / 'model' / 'last' / 'weights.safetensors')
    assert torch.equal(resumed[key], exported[key])


def test_training_timesteps_stay_below_t_max() -> None:
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    t, _, _ = draw_training_noise(gens, (5, 3), 201, 0.0, torch.device('cpu'))
    assert int(t.max()) <= 200 and int(t.min()) >= 0


def test_torchrun_two_processes_match_one(sim_dataset: Path, tmp_path: Path) -> None:
    """Same global batch on 1 and 2 processes: same loss and the same averaged gradient (Adam's
    first moment after one step is 0.1 * gradient; Adam itself amplifies float noise in
    near-zero gradients, so later steps agree only approximately)."""
    common = ['--max-steps', '1', '--set', 'train.val_every=0',
              '--set', 'train.val_at_start=false']
    assert train(sim_dataset, tmp_path / 'one', *common) == 0
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'distdpo_ros.cli', 'train', 'teacher', '--config', 'teacher_tiny', '--data',
           str(sim_dataset), '--out', str(tmp_path / 'two'), *common]
    env = dict(os.environ, GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f'torchrun did not finish: {proc.communicate()[1][-3000:]}')
    assert proc.returncode == 0, err[-3000:]
    one = load_state(tmp_path / 'one' / 'state' / 'last.safetensors')
    two = load_state(tmp_path / 'two' / 'state' / 'last.safetensors')
    assert two['world_size'] == 2
    np.testing.assert_allclose(losses(tmp_path / 'one'), losses(tmp_path / 'two'), rtol=1e-5)
    g1, g2 = one['optimizers']['adam']['state'], two['optimizers']['adam']['state']
    diff = sum(((g1[k]['exp_avg'] - g2[k]['exp_avg']) ** 2).sum() for k in g1)
    norm = sum((g1[k]['exp_avg'] ** 2).sum() for k in g1)
    assert (diff / norm).sqrt() < 1e-3  # float summation order; unsynchronised BN: ~1e-1
    for key, value in one['modules']['diffusion'].items():  # BatchNorm statistics included
        if value.is_floating_point():
            assert torch.allclose(value, two['modules']['diffusion'][key], atol=2e-3), key


def test_loss_is_lidiffs_objective_per_sample() -> None:
    eps = torch.randn(2, 50, 3)
    eps_hat = 0.5 * eps + 0.2
    out = lidiff_loss(eps_hat, eps, reg_weight=5.0)
    per = [((eps_hat[b] - eps[b]) ** 2).mean() + 5.0 * (eps_hat[b].mean() ** 2
                                                       + (eps_hat[b].std() - 1) ** 2)
           for b in range(2)]
    assert torch.allclose(out['loss'], torch.stack(per).mean())


def test_condition_is_dropped_per_sample_at_the_configured_rate() -> None:
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    t, drop, eps = draw_training_noise(gens, (4, 3), 1000, 0.1, torch.device('cpu'))
    assert 0.08 < drop.float().mean() < 0.12
    assert t.min() >= 0 and t.max() <= 999 and len(set(t.tolist())) > 500
    assert eps.shape == (2000, 4, 3)


def test_bad_config_and_data_are_refused_in_one_line(sim_dataset: Path, tmp_path: Path,
                                                     capsys) -> None:
    bad = tmp_path / 'bad.yaml'
    bad.write_text('train: {batch_size: 2, max_stpes: 3}\n')
    assert train(sim_dataset, tmp_path / 'a', config=str(bad)) == 2
    assert 'max_stpes' in capsys.readouterr().err
    no_maps = tmp_path / 'no_maps' / 'sequences'
    for seq in ('00', '01'):
        (no_maps / seq).mkdir(parents=True)
        for item in (sim_dataset / 'sequences' / seq).iterdir():
            if item.name != 'map_clean.npy':
                (no_maps / seq / item.name).symlink_to(item)
    assert train(no_maps.parent, tmp_path / 'b') == 2
    assert 'build-maps' in capsys.readouterr().err


def test_resume_with_another_model_config_is_refused(sim_dataset: Path, tmp_path: Path,
                                                     capsys) -> None:
    assert train(sim_dataset, tmp_path, '--max-steps', '1', '--set', 'train.val_every=0',
                 '--set', 'train.val_at_start=false') == 0
    assert train(sim_dataset, tmp_path, '--max-steps', '2', '--resume',
                 '--set', 'model.overrides={channel_ratio: 0.25}') == 2
    assert 'does not fit' in capsys.readouterr().err
    assert train(sim_dataset, tmp_path, '--max-steps', '2') == 2  # no silent overwrite
    assert 'already holds a training run' in capsys.readouterr().err


def test_shipped_configs_parse() -> None:
    from distdpo_training.engine.config import CONFIG_DIR, load_config

    for name in ('teacher_tiny', 'teacher_small', 'teacher_full'):
        cfg, path = load_config(TeacherConfig, name)
        cfg.validate(str(path))
        assert path == CONFIG_DIR / f'{name}.yaml'
