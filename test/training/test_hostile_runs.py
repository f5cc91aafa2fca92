"""Concurrent runs, full disks, edited states and late signals (cases of an independent probe,
issue 17): a second process on a run folder is refused naming the holder, a killed holder's
lock is taken over, a full disk is one line with the states intact, an edited state header is
refused, SIGTERM during validation stops between scans and sampler steps."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_engine import train

from distdpo_ros.errors import UserError
from distdpo_training.engine import loop as engine_loop
from distdpo_training.engine import read_log
from distdpo_training.engine.runlock import LOCK_FILE, RunLock
from distdpo_training.engine.state import load_state

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

HOLD_LOCK = '''
import os, signal, sys, time
from distdpo_training.engine.runlock import RunLock
lock = RunLock(sys.argv[1], sys.argv[2]).acquire()
print('locked', flush=True)
if sys.argv[3] == 'die':
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)
'''


def hold_lock(folder: Path, command: str, die: bool = False) -> subprocess.Popen:
    """Another process that takes the run lock of `folder` and keeps it (or is killed at once,
    leaving the lock file behind)."""
    proc = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(folder), command,
                             'die' if die else 'hold'], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    if die:
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.stdout.readline().strip() == 'locked'
    return proc


def wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            pytest.fail('timed out waiting')
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# one process per run folder
# ---------------------------------------------------------------------------------------------

def test_a_second_training_on_the_same_out_is_refused(tmp_path):
    """Two trainings into one --out once both exited 0, logging every record twice (same seed)
    or silently replacing the first run's states (other settings)."""
    out = tmp_path / 'run'
    env = dict(os.environ, TOY_STEP_SECONDS='0.2')
    first = subprocess.Popen([sys.executable, str(HERE / 'test_engine.py'), str(out), '15'],
                             env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: (out / 'log.jsonl').exists() and len(read_log(out / 'log.jsonl')) >= 1)
        with pytest.raises(UserError) as info:
            train(out, 30, seed=7)
        message = str(info.value)
        assert message.startswith(f'--out {out}: in use by `distdpo train toy` (pid '
                                  f'{first.pid}, since ') and '\n' not in message
        with pytest.raises(UserError, match=rf'in use by .* \(pid {first.pid},'):
            train(out, 30, resume='last')
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [json.loads(line)['step'] for line in (out / 'log.jsonl').read_text().splitlines()
             if json.loads(line)['kind'] == 'train']
    assert steps == list(range(1, 16))  # every record once: the second run wrote nothing
    assert load_state(out / 'state' / 'last.safetensors')['config']['train']['seed'] == 42
    assert not (out / LOCK_FILE).exists()  # released when the run ended


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / 'run'
    dead = hold_lock(out, 'distdpo train toy', die=True)
    assert json.loads((out / LOCK_FILE).read_text())['pid'] == dead.pid
    assert train(out, 3) == 0
    err = capsys.readouterr().err
    assert f'took over the lock of {out} from `distdpo train toy` (pid {dead.pid}, since ' in err
    assert 'which no longer runs' in err


def test_lock_names_its_holder_and_is_released(tmp_path):
    holder = hold_lock(tmp_path, 'distdpo evaluate')
    try:
        with pytest.raises(UserError, match=rf'in use by `distdpo evaluate` \(pid {holder.pid}, '
                                            r'since [0-9-]+ [0-9:]+\); wait for it to finish '
                                            'or choose another folder'):
            RunLock(tmp_path, 'distdpo demo').acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path, 'distdpo demo') as lock:
        assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())['pid'] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / 'file').write_text('x')
    with pytest.raises(UserError, match='is a file; give a folder'):
        RunLock(tmp_path / 'file', 'distdpo demo').acquire()


def test_a_second_demo_is_refused_and_keeps_the_first_demos_drive(tiny_model_dir, tmp_path,
                                                                   capsys):
    """The second demo's clean-up once deleted the first's drive/."""
    from distdpo_ros.cli import main as distdpo
    from distdpo_training.ros.demo import DRIVE_DIR, MARKER

    out = tmp_path / 'demo_out'
    (out / DRIVE_DIR / 'sequences').mkdir(parents=True)
    (out / MARKER).write_text('written by `distdpo demo`\n')
    (out / DRIVE_DIR / 'sequences' / 'scan.bin').write_bytes(b'first demo')
    first = hold_lock(out, 'distdpo demo')
    try:
        assert distdpo(['demo', '--model', str(tiny_model_dir), '--teacher', 'none',
                        '--frames', '2', '--out', str(out)]) == 2
    finally:
        first.kill()
        first.wait()
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'in use by `distdpo demo` (pid {first.pid}' in err
    assert (out / DRIVE_DIR / 'sequences' / 'scan.bin').read_bytes() == b'first demo'


# ---------------------------------------------------------------------------------------------
# a full disk, an edited state
# ---------------------------------------------------------------------------------------------

def test_disk_full_while_training_is_one_line_and_the_states_stay_valid(tmp_path, monkeypatch):
    from distdpo_ros.atomic import atomic_writer

    calls = []

    def disk_fills_up(path: Path, data: bytes) -> None:
        calls.append(path)
        with atomic_writer(path) as handle:
            handle.write(bytes(data)[:len(data) // 2])
            if len(calls) >= 2:  # the second state (best, at step 6) meets a full disk
                raise OSError(errno.ENOSPC, 'No space left on device')
            handle.write(bytes(data)[len(data) // 2:])

    monkeypatch.setattr('distdpo_training.engine.state.write_bytes_atomic', disk_fills_up)
    with pytest.raises(UserError) as info:
        train(tmp_path, 12)
    last = tmp_path / 'state' / 'last.safetensors'
    assert str(info.value) == (f'{tmp_path}: cannot write (No space left on device) at step 6; '
                               f'the last training state {last} is intact; free space and '
                               'continue with --resume')
    assert load_state(last)['step'] == 5
    assert [p.name for p in last.parent.iterdir()] == ['last.safetensors']  # no temporary
    monkeypatch.undo()
    assert train(tmp_path, 12, resume='last') == 0  # continues from step 5
    assert load_state(last)['step'] == 12


def _rewrite_header(path: Path, edit, keep_checksum: bool = True) -> None:
    """Edit the JSON state header of a state file (`edit` changes the parsed skeleton in place,
    or returns new JSON text for the old text) and write the file back, tensors unchanged."""
    with safe_open(str(path), framework='pt') as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    skeleton = json.loads(metadata['state'])
    text = edit(skeleton)
    metadata['state'] = text if isinstance(text, str) else json.dumps(skeleton)
    if not keep_checksum:
        del metadata['state_sha256']  # as in a state written before the header had a checksum
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize('keep_checksum', [True, False], ids=['checksum', 'older-file'])
def test_an_edited_state_header_is_refused_with_one_line(tmp_path, keep_checksum):
    """The header is JSON outside the tensors' checksum: deleting "step" once gave KeyError."""
    train(tmp_path, 5)
    last = tmp_path / 'state' / 'last.safetensors'
    _rewrite_header(last, lambda state: state.pop('step'), keep_checksum)
    pattern = ('the training state header was changed after it was written' if keep_checksum
               else 'training state field "step" is None; the file was edited')
    with pytest.raises(UserError, match=pattern) as info:
        train(tmp_path, 8, resume='last')
    assert str(info.value).startswith(f'{last}: ') and '\n' not in str(info.value)


def test_state_headers_cannot_choose_array_types_or_nest_deeply(tmp_path):
    from distdpo_training.engine.state import save_state

    path = tmp_path / 's.safetensors'
    save_state(path, {'step': 1, 'rng': np.arange(3, dtype=np.uint32)})

    def object_dtype(state: dict) -> None:
        state['rng']['dtype'] = '|O'

    _rewrite_header(path, object_dtype, keep_checksum=False)
    with pytest.raises(UserError, match=r"dtype '\|O' is not a plain number type"):
        load_state(path)
    save_state(path, {'step': 1, 'w': torch.ones(2)})

    def deep(state: dict) -> str:
        return json.dumps(state)[:-1] + ', "deep": ' + '[' * 5000 + ']' * 5000 + '}'

    _rewrite_header(path, deep, keep_checksum=False)
    with pytest.raises(UserError, match='nested 5001 levels deep'):
        load_state(path)


# ---------------------------------------------------------------------------------------------
# SIGTERM during validation
# ---------------------------------------------------------------------------------------------

SLOW_VALIDATION = '''
import sys
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, sys.argv[3])
from test_engine import ToyData, ToyTask, collate
from distdpo_ros.config import preset
from distdpo_ros.models import DiffusionNet
from distdpo_training.engine import Engine, EngineConfig
from distdpo_training.loops.common import ValidationConfig, validate_completion

out, marker = Path(sys.argv[1]), Path(sys.argv[2])
model = preset('tiny', 'teacher')
torch.manual_seed(0)
net = DiffusionNet(model).eval()
rng = np.random.default_rng(0)
scans = [(rng.normal(size=(model.scan_points, 3)) * [8, 8, 1]).astype(np.float32)
         for _ in range(4)]

class SlowValidation(ToyTask):
    best_metric = 'cd'

    def validate(self, engine, item, index):
        marker.touch()  # validation (before the first step) is under way
        return validate_completion(engine, net, model, ValidationConfig(steps=999, render=False),
                                   {'scan': scans[index], 'gt': scans[index]}, index, 'toy')

config = EngineConfig(batch_size=4, max_steps=5, log_every=1, val_scans=4, tensorboard=False,
                      device='cpu')
engine = Engine(config, out, {'model': {'toy': 1}}, None, 'toy')
try:
    sys.exit(engine.fit(SlowValidation(), ToyData(), collate, val_set=ToyData(4)))
finally:
    engine.close()
'''


def test_sigterm_during_the_first_validation_stops_within_a_sampler_step(tmp_path):
    """SIGTERM during the validation before the first step was noted but honoured only after
    the whole validation (4 guided completions of 999 steps here: minutes). The engine now asks
    between scans and the sampler between steps."""
    out, marker = tmp_path / 'run', tmp_path / 'validating'
    proc = subprocess.Popen([sys.executable, '-c', SLOW_VALIDATION, str(out), str(marker),
                             str(HERE)], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(marker.exists)
        time.sleep(0.5)  # inside the first completion
        signalled = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        stopped_after = time.perf_counter() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert stopped_after < 20, stopped_after
    assert 'validation interrupted' in err and 'continue with --resume' in err
    events = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert {'validation': 'interrupted by a signal'}.items() <= events[-1].items()
    assert not [e for e in events if e['kind'] == 'val']  # no metrics of a partial validation
    assert load_state(out / 'state' / 'last.safetensors')['step'] == 0
    assert not (out / LOCK_FILE).exists()


def test_engine_stop_flag_reaches_the_sampler(monkeypatch):
    seen = []

    def fake_sample(*args, should_stop=None, **kwargs):
        seen.append(should_stop)
        raise engine_loop.Cancelled

    from distdpo_training.loops import common

    monkeypatch.setattr(common, 'sample', fake_sample)

    class Stub:
        device = torch.device('cpu')
        is_main, step = True, 0

        def autocast(self):
            return torch.autocast('cpu', enabled=False)

        def generator(self, *parts):
            return torch.Generator()

        def stop_requested(self):
            return True

    stub = Stub()
    with pytest.raises(engine_loop.Cancelled):
        common.validate_completion(stub, None, None, common.ValidationConfig(),
                                   {'scan': np.zeros((4, 3), np.float32)}, 0, 'toy')
    assert seen == [stub.stop_requested]


# ---------------------------------------------------------------------------------------------
# an interrupted simulate
# ---------------------------------------------------------------------------------------------

def test_a_rerun_after_a_killed_simulate_mentions_overwrite(tmp_path, capsys):
    from distdpo_ros.cli import main as distdpo
    from distdpo_training.data.kitti import KittiSequence

    out = tmp_path / 'sim'
    velodyne = out / 'sequences' / '00' / 'velodyne'
    proc = subprocess.Popen([sys.executable, '-m', 'distdpo_ros.cli', 'simulate', str(out),
                             '--frames', '400', '--quiet'], cwd=REPO,
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: velodyne.is_dir() and len(list(velodyne.glob('*.bin'))) >= 2)
    finally:
        proc.kill()
        proc.wait()
    assert not (velodyne.parent / 'poses.txt').exists()
    assert distdpo(['simulate', str(out), '--frames', '2', '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{velodyne.parent}: already holds ' in err
    assert 'scan file(s) of an interrupted write (no poses.txt)' in err and '--overwrite' in err
    assert distdpo(['simulate', str(out), '--frames', '2', '--quiet', '--overwrite']) == 0
    assert len(KittiSequence(velodyne.parent)) == 2
