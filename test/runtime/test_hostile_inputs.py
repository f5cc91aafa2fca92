"""Bad configs, bad scans, bad output paths and killed writes (cases of an independent probe,
issue 17): each is one line naming the file or field with exit 2 (or works), never a traceback,
never lost data. Hostile checkpoints are in test_checkpoint.py, point-file shapes in
test_pointio.py."""

from __future__ import annotations

import dataclasses
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

from distdpo_ros import atomic
from distdpo_ros import checkpoint as ckpt
from distdpo_ros.cli import main as distdpo
from distdpo_ros.completion import synthetic_scan
from distdpo_ros.config import FIELD_RULES, ModelConfig, preset
from distdpo_ros.errors import UserError
from distdpo_ros.validation import check_seed, json_depth, loads_json

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def scan_file(tmp_path) -> Path:
    path = tmp_path / '000042.bin'
    path.write_bytes(synthetic_scan(seed=3, beams=16).tobytes())
    return path


def one_error_line(err: str) -> str:
    """The single line of a refused command's stderr (no traceback, no second line)."""
    assert err.count('\n') == 1 and err.startswith('distdpo: error: '), err
    return err


def final_error_line(err: str) -> str:
    """The error that ends a command after its progress lines: one line, no traceback."""
    lines = err.splitlines()
    assert 'Traceback' not in err and lines[-1].startswith('distdpo: error: '), err
    assert sum(line.startswith('distdpo: error: ') for line in lines) == 1, err
    return lines[-1]


# ---------------------------------------------------------------------------------------------
# configs: type and range of every field, in one table; JSON depth bounded
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('field, value, message', [
    ('scan_points', 200.5, 'must be a whole number, got 200.5'),
    ('scan_points', 1e15, 'must be a whole number, got 1000000000000000.0'),
    ('scan_points', 10**15, 'must be <= 1000000'),
    ('replication', 10**9, 'must be <= 100'),
    ('num_train_timesteps', 10**12, 'must be <= 100000'),
    ('channel_ratio', 1e6, 'must be <= 8'),
    ('resolution', 1e-30, 'must be >= 0.001'),
    ('min_z', float('nan'), 'must be a finite number, got nan'),
    ('max_range', float('inf'), 'must be a finite number'),
    ('guidance', -1.0, 'must be >= 0'),
    ('steps', True, 'must be a whole number, got True'),
    ('has_refine', 'yes', "must be a bool, got 'yes'"),
    ('role', 'critic', 'must be one of'),
    ('notes', [], 'must be a dict'),
])
def test_config_json_fields_are_checked_by_type_and_range(tmp_path, field, value, message):
    config = preset('tiny', 'student')
    net_tensors = {k: torch.zeros(s) for k, s in ckpt.expected_shapes(config).items()}
    out = ckpt.save_checkpoint(tmp_path / 'm', config, net_tensors)
    data = json.loads((out / ckpt.CONFIG_FILE).read_text())
    data[field] = value
    (out / ckpt.CONFIG_FILE).write_text(json.dumps(data))  # NaN and Infinity as Python writes
    with pytest.raises(UserError) as info:
        ckpt.load_config(out)
    text = str(info.value)
    assert text.startswith(f'{out / ckpt.CONFIG_FILE}: config field "{field}" ')
    assert message in text and '\n' not in text


def test_every_config_field_has_a_rule():
    """A field added to ModelConfig needs its line in FIELD_RULES (type and range)."""
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert sorted(names) == sorted(FIELD_RULES)
    for scale in ('full', 'small', 'tiny'):
        for role in ('teacher', 'student', 'refine'):
            preset(scale, role)  # the presets pass their own rules


def test_points_diffused_per_scene_are_bounded():
    with pytest.raises(UserError, match=r'"scan_points" x "replication" must be <= 10,000,000, '
                                        r'got 100,000,000'):
        preset('full').replace(scan_points=1_000_000, replication=100)


def test_deep_json_is_one_line_and_fast(tmp_path, scan_file, capsys):
    """100k-deep JSON once ended in RecursionError (a traceback)."""
    model = tmp_path / 'deep'
    model.mkdir()
    (model / ckpt.CONFIG_FILE).write_text('[' * 100_000 + ']' * 100_000)
    started = time.perf_counter()
    assert distdpo(['complete', '--model', str(model), str(scan_file)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert 'JSON nested 100000 levels deep (at most 64 are allowed)' in err
    assert str(model / ckpt.CONFIG_FILE) in err
    assert time.perf_counter() - started < 10


def test_json_depth_skips_strings():
    assert json_depth('{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth('"\\"[[["') == 0 and json_depth('') == 0
    with pytest.raises(UserError, match=r'src: not valid JSON \(Expecting value at line 1\)'):
        loads_json('[1,', 'src')


# ---------------------------------------------------------------------------------------------
# `distdpo complete`: output checked before the work; scans and results that name the file
# ---------------------------------------------------------------------------------------------

def test_complete_refuses_a_directory_as_out_before_the_work(tiny_model_dir, scan_file, tmp_path,
                                                            capsys, monkeypatch):
    from distdpo_ros import completion

    monkeypatch.setattr(completion.Completer, 'from_pretrained', lambda *a, **k: pytest.fail(
        'the model was loaded before the output was checked'))
    target = tmp_path / 'existing.ply'
    target.mkdir()
    (target / 'keep.txt').write_text('user data')
    assert distdpo(['complete', '--model', str(tiny_model_dir), str(scan_file), '--out',
                    str(target)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f'--out {target}: is a directory' in err
    assert (target / 'keep.txt').read_text() == 'user data'


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot create files in: mode 0555, and for root (who ignores the
    mode) the immutable attribute where the file system and capabilities allow it."""
    folder = tmp_path / 'ro'
    folder.mkdir()
    os.chmod(folder, 0o555)
    immutable = False
    if os.geteuid() == 0:
        immutable = subprocess.run(['chattr', '+i', str(folder)], capture_output=True
                                   ).returncode == 0
    try:
        try:
            (folder / 'probe').touch()
        except OSError:
            yield folder
        else:
            pytest.skip('no way to make a folder read-only for this user here')
    finally:
        if immutable:
            subprocess.run(['chattr', '-i', str(folder)], check=True)
        os.chmod(folder, 0o755)


def test_complete_refuses_a_read_only_folder_before_the_work(tiny_model_dir, scan_file,
                                                             read_only_folder, capsys,
                                                             monkeypatch):
    """Once it failed only after the whole completion."""
    from distdpo_ros import completion

    monkeypatch.setattr(completion.Completer, 'from_pretrained', lambda *a, **k: pytest.fail(
        'the model was loaded before the output was checked'))
    out = read_only_folder / 'completed.ply'
    assert distdpo(['complete', '--model', str(tiny_model_dir), str(scan_file), '--out',
                    str(out)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f'--out {out}: cannot write in {read_only_folder} (' in err
    assert list(read_only_folder.iterdir()) == []


@pytest.mark.parametrize('content', ['empty', 'nan'])
def test_empty_or_nan_scans_name_the_file(tiny_model_dir, tmp_path, capsys, content):
    path = tmp_path / f'{content}.npy'
    points = np.zeros((0, 3), np.float32) if content == 'empty' else \
        np.full((5000, 3), np.nan, np.float32)
    np.save(path, points)
    assert distdpo(['complete', '--model', str(tiny_model_dir), str(path), '--out',
                    str(tmp_path / 'out.ply')]) == 2
    err = one_error_line(capsys.readouterr().err)
    count = len(points)
    assert err.startswith(f'distdpo: error: {path}: 0 of {count} points are finite')
    assert not (tmp_path / 'out.ply').exists()


def test_nan_weights_are_refused_not_an_empty_cloud(tmp_path, scan_file, capsys):
    config = preset('tiny', 'student')
    tensors = {k: torch.zeros(s) for k, s in ckpt.expected_shapes(config).items()}
    tensors['denoiser.stem.0.kernel'] = torch.full_like(tensors['denoiser.stem.0.kernel'],
                                                         float('nan'))
    model = ckpt.save_checkpoint(tmp_path / 'nan-model', config, tensors)
    out = tmp_path / 'out.ply'
    assert distdpo(['complete', '--model', str(model), str(scan_file), '--out', str(out)]) == 2
    err = final_error_line(capsys.readouterr().err)
    assert "tensor 'denoiser.stem.0.kernel' holds" in err and 'NaN or infinite' in err
    assert not out.exists()


def test_an_empty_completion_is_not_written(tiny_model_dir, scan_file, tmp_path, capsys,
                                            monkeypatch):
    from distdpo_ros import completion

    monkeypatch.setattr(completion.Completer, 'complete',
                        lambda self, *a, **k: np.zeros((0, 3), np.float32))
    out = tmp_path / 'out.ply'
    assert distdpo(['complete', '--model', str(tiny_model_dir), str(scan_file), '--out',
                    str(out), '--steps', '1']) == 2
    err = final_error_line(capsys.readouterr().err)
    assert f'{scan_file}: the completion is empty' in err and str(out) in err
    assert not out.exists()


def test_disk_full_while_writing_the_completion_is_one_line(tiny_model_dir, scan_file, tmp_path,
                                                            capsys, monkeypatch):
    out = tmp_path / 'out.ply'
    out.write_bytes(b'previous result')
    real_fsync = os.fsync

    def disk_full(fd):
        if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith('.out.ply.'):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_fsync(fd)

    monkeypatch.setattr(os, 'fsync', disk_full)
    assert distdpo(['complete', '--model', str(tiny_model_dir), str(scan_file), '--out',
                    str(out), '--steps', '1']) == 2
    err = final_error_line(capsys.readouterr().err)
    assert err == f'distdpo: error: {out}: cannot write (No space left on device); no file was ' \
                  'written'
    assert out.read_bytes() == b'previous result'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['000042.bin', 'out.ply']


@pytest.mark.parametrize('seed', [str(2**64), str(2**70), '-2'])
def test_seeds_beyond_64_bits_are_one_line(tiny_model_dir, scan_file, capsys, seed):
    assert distdpo(['complete', '--model', str(tiny_model_dir), str(scan_file), '--seed',
                    seed]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f'--seed must be a whole number from 0 to 2**63 - 1 (or -1 for a random one), got ' \
           f'{seed}' in err


def test_seed_range():
    assert check_seed(2**63 - 1) == 2**63 - 1 and check_seed(-1, allow_random=True) == -1
    with pytest.raises(UserError, match='--seed'):
        check_seed(-1)


# ---------------------------------------------------------------------------------------------
# temporaries of killed writers: removed (with a message) by the next write in their folder
# ---------------------------------------------------------------------------------------------

KILLED_WRITER = '''
import os, signal, sys
from pathlib import Path
import torch
import safetensors.torch
from distdpo_ros import atomic, checkpoint as ckpt
from distdpo_ros.config import preset

what, target = sys.argv[1], Path(sys.argv[2])
config = preset('tiny', 'student')
tensors = {k: torch.ones(s) for k, s in ckpt.expected_shapes(config).items()}

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if what == 'file':
    with atomic.atomic_writer(target) as handle:
        handle.write(b'half a state')
        handle.flush()
        die()
elif what == 'partial':
    safetensors.torch.save_file = lambda *a, **k: (Path(a[1]).write_bytes(b'half'), die())
    ckpt.save_checkpoint(target, config, tensors)
elif what == 'between-renames':
    real_replace = os.replace
    def replace(src, dst):
        if '.partial-' in str(src):
            die()  # the previous checkpoint is already moved aside
        real_replace(src, dst)
    os.replace = replace
    ckpt.save_checkpoint(target, config, {k: 2 * v for k, v in tensors.items()}, overwrite=True)
'''


def kill_a_writer(what: str, target: Path) -> None:
    result = subprocess.run([sys.executable, '-c', KILLED_WRITER, what, str(target)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def test_a_killed_file_write_leaves_a_temporary_the_next_write_removes(tmp_path, capsys):
    target = tmp_path / 'state' / 'last.safetensors'
    kill_a_writer('file', target)
    (left,) = target.parent.iterdir()
    assert left.name.startswith('.last.safetensors.') and left.name.endswith('.tmp')
    assert not target.exists()
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:  # a temporary of a writer that still runs is not touched
        busy = target.parent / f'.last.safetensors.{atomic.HOST_TAG}-{live.pid}.abc.tmp'
        busy.write_bytes(b'being written')
        atomic.write_bytes_atomic(target, b'new state')
        err = capsys.readouterr().err
        assert f'removed 1 temporary file(s) left in {target.parent} by an interrupted write: ' \
               f'{left.name}' in err
        assert sorted(p.name for p in target.parent.iterdir()) == [busy.name, target.name]
        assert target.read_bytes() == b'new state'
    finally:
        live.kill()
        live.wait()


def test_a_killed_checkpoint_write_is_cleaned_or_restored(tmp_path, capsys, monkeypatch):
    config = preset('tiny', 'student')
    tensors = {k: torch.ones(s) for k, s in ckpt.expected_shapes(config).items()}
    target = tmp_path / 'model'
    kill_a_writer('partial', target)
    (left,) = tmp_path.iterdir()
    assert left.name.startswith('.model.partial-')
    ckpt.save_checkpoint(target, config, tensors)
    assert 'removed 1 temporary file(s)' in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ['model']

    kill_a_writer('between-renames', target)  # killed after moving the good one aside
    assert not target.exists()
    aside, partial = sorted(tmp_path.iterdir())
    assert aside.name.startswith('.model.old-') and partial.name.startswith('.model.partial-')
    monkeypatch.setattr(atomic, '_cleared', set())  # as in the next process
    with pytest.raises(UserError, match='already holds a checkpoint'):
        ckpt.save_checkpoint(target, config, tensors)  # the next write first puts it back
    err = capsys.readouterr().err
    assert f'restored {target} from {aside.name}' in err and partial.name in err
    assert [p.name for p in tmp_path.iterdir()] == ['model']
    assert all(torch.equal(v, tensors[k]) for k, v in ckpt.load_checkpoint(target)[1].items())
