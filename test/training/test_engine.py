"""The training engine on a toy task: exact resume, SIGTERM, DDP equivalence, corrupt states.

This file is also a script (`python test/test_engine.py OUT STEPS`), so that torchrun can run
the very same toy task in several processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from distdpo_ros.errors import UserError
from distdpo_training.engine import Engine, EngineConfig, read_log
from distdpo_training.engine.data import GlobalBatchSampler, rng_from_tensor, rng_to_tensor
from distdpo_training.engine.runlog import plot_log
from distdpo_training.engine.state import load_state, save_state

REPO = Path(__file__).resolve().parents[2]


class ToyData(Dataset):
    """y = sum(w * x) with a random (np.random) augmentation per item, like a real dataset."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        scale = float(np.random.uniform(0.9, 1.1))
        return {'x': self.x[i] * scale, 'y': self.y[i] * scale}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class ToyTask:
    best_metric, lower_is_better = 'mse', True

    def setup(self, engine: Engine) -> None:
        net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                            nn.Linear(16, 1))
        self.net = engine.add_module('net', net)
        opt = torch.optim.Adam(net.parameters(), lr=3e-2)
        engine.add_optimizer('net', opt, torch.optim.lr_scheduler.StepLR(opt, 10, 0.5))
        self.slowdown = float(os.environ.get('TOY_STEP_SECONDS', '0'))

    def train_step(self, engine: Engine, batch: Any, gens: list[torch.Generator]
                   ) -> dict[str, torch.Tensor]:
        noise = torch.stack([torch.randn(8, generator=g) for g in gens]) * 0.1
        pred = self.net(batch['x'] + noise).squeeze(1)
        loss = ((pred - batch['y']) ** 2).mean()
        engine.optimize(loss, 'net')
        time.sleep(self.slowdown)
        return {'loss': loss}

    def validate(self, engine: Engine, item: Any, index: int) -> dict[str, float]:
        pred = engine.unwrap('net')(item['x'][None]).squeeze()
        return {'mse': float((pred - item['y']) ** 2)}

    def export(self, engine: Engine, out_dir: Path, info: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'info.json').write_text(json.dumps(info))


def train(out: Path, max_steps: int, resume: str | None = None, **cfg: Any) -> int:
    config = EngineConfig(batch_size=4, max_steps=max_steps, log_every=1, ckpt_every=5,
                          val_every=6, val_scans=3, tensorboard=False, device='cpu', **cfg)
    engine = Engine(config, out, {'model': {'toy': 1}, 'train': vars(config)}, resume, 'toy')
    try:
        return engine.fit(ToyTask(), ToyData(), collate, val_set=ToyData(6))
    finally:
        engine.close()


def run_torchrun(cmd: list[str], timeout: float = 240) -> None:
    """Run a torchrun command on the loopback interface; on a timeout kill all its processes."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f'torchrun did not finish in {timeout} s: {err[-3000:]}')
    assert proc.returncode == 0, err[-3000:]


def losses(out: Path) -> dict[int, float]:
    return {r['step']: r['loss'] for r in read_log(out / 'log.jsonl')}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_state(out / 'state' / 'last.safetensors')['modules']['net']


def test_loss_falls_and_resume_gives_the_same_losses(tmp_path: Path) -> None:
    assert train(tmp_path / 'full', 20) == 0
    full = losses(tmp_path / 'full')
    assert sorted(full) == list(range(1, 21))
    assert np.mean([full[s] for s in range(16, 21)]) < 0.5 * np.mean([full[s] for s in (1, 2, 3)])
    assert train(tmp_path / 'part', 7) == 0  # stops mid-epoch (12 batches per epoch)
    assert train(tmp_path / 'part', 20, resume='last') == 0
    part = losses(tmp_path / 'part')
    assert part == full  # bit-identical, including across the epoch boundary
    for key, value in weights(tmp_path / 'full').items():
        assert torch.equal(value, weights(tmp_path / 'part')[key]), key
    val = read_log(tmp_path / 'full' / 'log.jsonl', kind='val')
    assert [r['step'] for r in val] == [0, 6, 12, 18, 20]
    assert (tmp_path / 'full' / 'state' / 'best.safetensors').is_file()
    best_info = json.loads((tmp_path / 'full' / 'model' / 'best' / 'info.json').read_text())
    assert best_info['best'] == min(r['mse'] for r in val if r['step'] > 0)  # trained only
    png = plot_log(tmp_path / 'full' / 'log.jsonl', tmp_path / 'curve.png', val_keys=('mse',))
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (tmp_path / 'full' / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    train(tmp_path, 3)
    with pytest.raises(UserError, match='already holds a training run'):
        train(tmp_path, 5)


def test_sigterm_writes_a_checkpoint_and_resume_continues_exactly(tmp_path: Path) -> None:
    assert train(tmp_path / 'full', 12) == 0
    env = dict(os.environ, TOY_STEP_SECONDS='0.3')
    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, __file__, str(out), '12'], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / 'log.jsonl').exists() or \
            len(read_log(out / 'log.jsonl')) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 'continue with --resume' in err
    stopped = load_state(out / 'state' / 'last.safetensors')['step']
    assert 3 <= stopped < 12
    assert train(out, 12, resume='last') == 0
    assert losses(out) == losses(tmp_path / 'full')


def test_sigterm_to_the_whole_process_group_with_data_workers_still_saves(tmp_path: Path
                                                                         ) -> None:
    """`kill` of the group (a launcher's shutdown, Ctrl-C in a terminal) reaches the data-loading
    workers too; they leave the signal to the trainer, which saves its state and exits."""
    out = tmp_path / 'group'
    env = dict(os.environ, TOY_STEP_SECONDS='0.3', TOY_WORKERS='1')
    proc = subprocess.Popen([sys.executable, __file__, str(out), '40'], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / 'log.jsonl').exists() or \
            len(read_log(out / 'log.jsonl')) < 3:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('the trainer did not stop after SIGTERM to its group')
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 'Traceback' not in err and 'continue with --resume' in err
    assert 3 <= load_state(out / 'state' / 'last.safetensors')['step'] < 40


def test_corrupt_or_truncated_state_is_refused_and_previous_kept(tmp_path: Path) -> None:
    train(tmp_path, 10)  # checkpoints at 5 and 10
    last = tmp_path / 'state' / 'last.safetensors'
    previous = tmp_path / 'state' / 'previous.safetensors'
    assert load_state(previous)['step'] == 5
    data = bytearray(last.read_bytes())
    data[-20] ^= 0xFF  # flip bits in a tensor
    last.write_bytes(bytes(data))
    with pytest.raises(UserError, match='corrupted'):
        train(tmp_path, 12, resume='last')
    last.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match='truncated'):
        train(tmp_path, 12, resume='last')
    assert train(tmp_path, 12, resume=str(previous)) == 0  # the previous state is intact


def test_interrupted_write_leaves_the_old_state(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / 'state.safetensors'
    save_state(path, {'step': 1, 'w': torch.ones(3)})

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError('disk full')

    monkeypatch.setattr(os, 'fsync', fail)
    with pytest.raises(OSError):
        save_state(path, {'step': 2, 'w': torch.zeros(3)})
    assert load_state(path)['step'] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_state_roundtrip_of_nested_python_and_rng() -> None:
    import random

    random.random()
    np.random.normal()
    from distdpo_training.engine.data import capture_rng

    state = capture_rng(cuda=False)
    back = rng_from_tensor(rng_to_tensor(state))
    assert back['python'] == state['python']
    assert np.array_equal(back['numpy'][1], state['numpy'][1])
    assert back['numpy'][2:] == state['numpy'][2:]
    assert torch.equal(back['torch'], state['torch'])


def test_sampler_shares_global_batches_over_ranks() -> None:
    one = list(GlobalBatchSampler(10, 4, seed=3))
    two = [list(GlobalBatchSampler(10, 4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(one) == 8  # two whole batches, the remainder of the epoch dropped
    for b in range(2):
        assert sorted(one[4 * b:4 * b + 4]) == sorted(two[0][2 * b:2 * b + 2]
                                                      + two[1][2 * b:2 * b + 2])
    late = GlobalBatchSampler(10, 4, seed=3)
    late.set_position(0, 1)
    assert list(late) == one[4:]


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    assert train(tmp_path / 'one', 8) == 0
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
           '2', __file__, str(tmp_path / 'two'), '8']
    run_torchrun(cmd)
    one, two = weights(tmp_path / 'one'), weights(tmp_path / 'two')
    for key in one:
        assert torch.allclose(one[key].float(), two[key].float(), atol=1e-5, rtol=1e-4), key
    la, lb = losses(tmp_path / 'one'), losses(tmp_path / 'two')
    assert np.allclose([la[s] for s in sorted(la)], [lb[s] for s in sorted(lb)], rtol=1e-5)


def test_torchrun_sigterm_stops_all_ranks_at_one_step_and_resumes(tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its workers: they agree on the step, save, and a resumed
    2-process run repeats the losses of one uninterrupted process."""
    assert train(tmp_path / 'one', 12) == 0
    out = tmp_path / 'two'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
           '2', __file__, str(out), '12']
    env = dict(os.environ, GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1', TOY_STEP_SECONDS='0.4')
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / 'log.jsonl').exists() or \
            len(read_log(out / 'log.jsonl')) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('torchrun did not stop after SIGTERM')
    assert 'continue with --resume' in err
    state = load_state(out / 'state' / 'last.safetensors')
    assert state['world_size'] == 2 and 3 <= state['step'] < 12
    run_torchrun(cmd + ['last'])
    one, two = losses(tmp_path / 'one'), losses(out)
    assert sorted(two) == list(range(1, 13))
    assert np.allclose([one[s] for s in one], [two[s] for s in one], rtol=1e-5)


if __name__ == '__main__':
    sys.exit(train(Path(sys.argv[1]), int(sys.argv[2]),
                   resume=sys.argv[3] if len(sys.argv) > 3 else None,
                   num_workers=int(os.environ.get('TOY_WORKERS', '0'))))
