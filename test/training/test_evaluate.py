"""`distdpo evaluate` on a tiny SemanticKITTI-layout dataset with tiny random-weight models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distdpo_ros import cli, metrics
from distdpo_ros.checkpoint import ModelBundle, save_model
from distdpo_ros.completion import Completer
from distdpo_ros.config import preset
from distdpo_training.data.frames import Frame
from distdpo_training.data.kitti import write_sequence
from distdpo_training.evaluation import evaluate as ev

FRAMES = 3


def _street(rng: np.random.Generator, points: int) -> np.ndarray:
    """A small static street in the world frame: ground and two walls along x."""
    kind = rng.random(points)
    x = rng.uniform(-10, 40, points)
    y = np.where(kind < 0.6, rng.uniform(-8, 8, points), np.where(kind < 0.8, -8.0, 8.0))
    z = np.where(kind < 0.6, -1.73, rng.uniform(-1.73, 3.0, points))
    return np.column_stack([x, y, z])


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
    """Sequence 08 with FRAMES scans driving along x and its ground-truth map."""
    root = tmp_path_factory.mktemp('kitti')
    rng = np.random.default_rng(0)
    world = _street(rng, 20_000)
    frames = []
    for i in range(FRAMES):
        pose = np.eye(4)
        pose[0, 3] = 2.0 * i
        local = world - pose[:3, 3]
        seen = local[np.linalg.norm(local, axis=1) < 25.0][::4]
        points = np.column_stack([seen, np.full(len(seen), 0.5)]).astype(np.float32)
        frames.append(Frame(index=i, stamp_ns=i * 100_000_000, points=points, pose=pose))
    sequence = root / 'sequences' / '08'
    write_sequence(sequence, frames)
    np.save(sequence / 'map_clean.npy', world.astype(np.float32))
    return root


def _tiny_with_refine(folder: Path, role: str, seed: int) -> Path:
    from distdpo_ros.models import DiffusionNet, RefineNet

    config = preset('tiny', role)
    torch.manual_seed(seed)
    return save_model(folder, ModelBundle(config=config, diffusion=DiffusionNet(config),
                                          refine=RefineNet(config)))


@pytest.fixture(scope='module')
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny student and teacher with refinement weights (random weights, seeds 1 and 2)."""
    folder = tmp_path_factory.mktemp('models')
    return (_tiny_with_refine(folder / 'tiny-student', 'student', 1),
            _tiny_with_refine(folder / 'tiny-teacher', 'teacher', 2))


class CountingCompleter:
    """Counts Completer.complete calls (warm-ups included) through monkeypatch."""

    def __init__(self, monkeypatch, fail_after: int | None = None) -> None:
        self.calls = 0
        original = Completer.complete
        counter = self

        def complete(self, *args, **kwargs):
            counter.calls += 1
            if fail_after is not None and counter.calls > fail_after:
                raise KeyboardInterrupt  # as if the run were killed here
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Completer, 'complete', complete)


def _evaluate(*argv: str) -> int:
    return cli.main(['evaluate', *argv])


def test_evaluate_writes_everything_and_resumes_from_the_cache(
        dataset, models, tiny_model_dir, tmp_path, monkeypatch, capsys):
    student, teacher = models
    out = tmp_path / 'eval'
    common = ['--data', str(dataset), '--split', 'val', '--limit', '2', '--out', str(out),
              '--device', 'cpu', '--renders', '1', '--refine']
    assert _evaluate('--model', str(student), '--teacher', str(tiny_model_dir), *common) == 2
    assert 'has no refinement weights' in capsys.readouterr().err

    args = ['--model', str(student), '--name', 'student', '--steps', '1,2',
            '--teacher', str(teacher), '--teacher-name', 'teacher', '--teacher-steps', '1',
            *common]
    counter = CountingCompleter(monkeypatch)
    assert _evaluate(*args) == 0
    printed = capsys.readouterr().out
    first_calls = counter.calls
    # one warm-up + 2 scans for each of (student 1 step, student 2 steps, teacher 1 step);
    # refined rows reuse the unrefined sample
    assert first_calls == 3 * (1 + 2)

    every = json.loads((out / 'results.json').read_text())
    inputs, rows = every[:4], every[4:]
    assert [r['model'] for r in inputs] == [
        'input: raw scan', 'input: conditioning points', 'input: jittered conditioning',
        'input: raw scan subsampled']
    assert [(r['model'], r['steps'], r['refine']) for r in rows] == [
        ('student', 1, False), ('student', 1, True), ('student', 2, False),
        ('student', 2, True), ('teacher', 1, False), ('teacher', 1, True)]
    for row in every:
        for key in ('cd', 'jsd', 'emd', 'precision', 'recall', 'fscore', 'iou_0.5', 'iou_0.2',
                    'iou_0.1', 'iou_legacy_0.5', 'seconds_per_scan'):
            assert isinstance(row[key], float), key
        assert row['scans'] == 2 and row['failed'] == 0 and row['cd'] > 0
    for row in rows:
        assert row['seconds_per_scan'] > 0
        assert set(row['beats_inputs']) == {r['baseline'] for r in inputs}
        for name, (cd_better, f_better) in row['beats_inputs'].items():
            base = next(r for r in inputs if r['baseline'] == name)
            assert cd_better == (row['cd'] < base['cd'])
            assert f_better == (row['fscore'] > base['fscore'])
    # the tiny model's output is K x M = 800 points before the crop; the subsampled scan has as
    # many, the conditioning points M = 200, the raw scan all its points in range
    points = {r['baseline']: r['points_pred'] for r in inputs}
    assert points['conditioning points'] == 200 and points['jittered conditioning'] == 800
    assert points['raw scan subsampled'] == 800 < points['raw scan']
    raw, refined = rows[0], rows[1]
    assert refined['points_pred'] == 6 * raw['points_pred']  # x6 up-sampling of the same sample
    assert refined['seconds_per_scan'] > raw['seconds_per_scan']
    with open(out / 'results.csv', newline='') as handle:
        table = list(csv.DictReader(handle))
    assert [float(r['cd']) for r in table] == pytest.approx([r['cd'] for r in every])
    markdown = (out / 'results.md').read_text()
    assert '| Model | NFE | CD ↓ | JSD ↓ | EMD ↓ | P ↑ | R ↑ | F ↑ |' in markdown
    assert '| input: conditioning points | - |' in markdown and 'beats inputs' in markdown
    assert '| student (Refined) | 2 |' in markdown and '| teacher | 1 |' in markdown
    assert markdown in printed
    for name in ('quality_vs_steps.png', 'time_vs_steps.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    renders = list((out / 'renders').glob('*.png'))
    assert len(renders) == 1 and renders[0].stat().st_size > 10_000

    # the same command again: everything comes from the cache, no model runs
    assert _evaluate(*args) == 0
    assert counter.calls == first_calls
    assert json.loads((out / 'results.json').read_text()) == every


def test_killed_run_continues_where_it_stopped(dataset, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / 'eval'
    args = ['--model', str(tiny_model_dir), '--data', str(dataset), '--steps', '1',
            '--out', str(out), '--device', 'cpu', '--renders', '0', '--no-warmup']
    CountingCompleter(monkeypatch, fail_after=2)  # 2 scans, then killed
    assert _evaluate(*args) == 130
    cached = [p.relative_to(out / 'cache').parts[0] for p in (out / 'cache').rglob('*.json')]
    assert sum(not folder.startswith('input-') for folder in cached) == 2
    assert len(cached) == 2 + 4 * 3  # the inputs of the third scan came before the model
    assert not (out / 'results.json').exists()
    monkeypatch.undo()
    counter = CountingCompleter(monkeypatch)
    assert _evaluate(*args) == 0
    assert counter.calls == 1  # the one scan that was missing
    assert json.loads((out / 'results.json').read_text())[-1]['scans'] == FRAMES


def test_two_shards_merge_into_the_metrics_of_a_direct_computation(dataset, tiny_model_dir,
                                                                   tmp_path):
    """Rank 1 then rank 0 of two: the merged row is the mean of per-scan metrics and the
    sequence-level IoU of the completions the Completer returns for the same seeds."""
    scans = ev.KittiScans(dataset, 'val', max_range=30.0)
    evaluation = ev.Evaluation(models=[ev.ModelSpec('m', str(tiny_model_dir), (1,))],
                               scans=scans.scan_refs(), dataset=scans, out=tmp_path,
                               settings=ev.Settings(seed=5), renders=0, warmup=False,
                               baselines=False)
    assert ev.run_evaluation(evaluation, rank=1, world_size=2) is None  # its shard, no merge
    assert len(list((tmp_path / 'cache').rglob('*.json'))) == FRAMES // 2
    row = ev.run_evaluation(evaluation, rank=0, world_size=2)[0]

    completer = Completer.from_pretrained(tiny_model_dir, device='cpu')
    cds, counts = [], metrics.IoUCounts(0, 0, 0)
    for ref in scans.scan_refs():
        points, gt = scans.scan_and_ground_truth(ref)
        pred = completer.complete(points, steps=1, seed=5 + ref.order)
        cds.append(metrics.chamfer_distance(pred, gt))
        counts = counts + metrics.iou_counts(pred, gt, 0.2)
    assert row['scans'] == FRAMES
    assert row['cd'] == pytest.approx(np.mean(cds), rel=1e-6)
    assert row['iou_0.2'] == pytest.approx(100 * counts.iou)


@pytest.mark.skipif(shutil.which('torchrun', path=str(Path(sys.executable).parent)) is None,
                    reason='torchrun is not installed next to this Python')
def test_torchrun_two_processes(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / 'eval'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    torchrun = str(Path(sys.executable).parent / 'torchrun')
    result = subprocess.run(
        [torchrun, '--standalone', '--nproc_per_node', '2', '-m', 'distdpo_ros.cli', 'evaluate',
         '--model', str(tiny_model_dir), '--data', str(dataset), '--steps', '1', '--out',
         str(out), '--device', 'cpu', '--renders', '0', '--no-warmup'],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / 'results.json').read_text())
    assert rows[0]['scans'] == FRAMES and rows[0]['failed'] == 0
    assert 'evaluate rank 1' in result.stderr  # both ranks worked


def test_bad_arguments_give_one_line(dataset, tiny_model_dir, tmp_path, capsys):
    assert _evaluate('--model', str(tiny_model_dir), '--data', str(dataset), '--split', 'test',
                     '--out', str(tmp_path)) == 2
    assert 'split' in capsys.readouterr().err
    assert _evaluate('--model', str(tiny_model_dir), '--data', str(tmp_path / 'missing'),
                     '--out', str(tmp_path)) == 2
    assert 'does not exist' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _evaluate('--model', str(tiny_model_dir), '--data', str(dataset), '--steps', '0',
                  '--out', str(tmp_path))


def test_a_second_evaluation_into_the_same_out_is_refused(dataset, tiny_model_dir, tmp_path,
                                                          capsys):
    from test_hostile_runs import hold_lock

    out = tmp_path / 'eval'
    first = hold_lock(out, 'distdpo evaluate')
    try:
        assert _evaluate('--model', str(tiny_model_dir), '--data', str(dataset), '--out',
                         str(out), '--device', 'cpu', '--limit', '1') == 2
    finally:
        first.kill()
        first.wait()
    err = capsys.readouterr().err
    assert f'distdpo: error: --out {out}: in use by `distdpo evaluate` (pid {first.pid}' in err
    assert not (out / 'cache').exists()


def test_a_sampler_for_every_model_is_its_own_cached_evaluation(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / 'eval'
    common = ['--model', str(tiny_model_dir), '--data', str(dataset), '--steps', '1',
              '--limit', '1', '--out', str(out), '--device', 'cpu', '--renders', '0',
              '--no-warmup', '--no-inputs']
    assert _evaluate(*common) == 0
    own = json.loads((out / 'results.json').read_text())[0]
    assert _evaluate(*common, '--sampler', 've-ddim') == 0
    other = json.loads((out / 'results.json').read_text())[0]
    assert other['cd'] != own['cd']  # LiDiff's sampler (the tiny model's own) vs VE DDIM
    assert len({p.parent for p in (out / 'cache').rglob('*.json')}) == 2  # one cache each
    with pytest.raises(SystemExit):  # argparse refuses an unknown sampler name
        _evaluate(*common, '--sampler', 'euler')
