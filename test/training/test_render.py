"""Fig.-1-style renders and the evaluation plots: real PNGs of the expected size."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from distdpo_ros import cli
from distdpo_ros.pointio import write_points
from distdpo_training.evaluation import render


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG file'
    return struct.unpack('>II', data[16:24])


def _scene(rng: np.random.Generator, points: int) -> np.ndarray:
    ground = np.column_stack([rng.uniform(-25, 25, (points, 2)), np.full(points, -1.7)])
    wall = np.column_stack([rng.uniform(-25, 25, points), np.full(points, 9.0),
                            rng.uniform(-1.7, 4.0, points)])
    return np.concatenate([ground, wall])[rng.permutation(2 * points)[:points]]


def _ink(path: Path) -> float:
    """Fraction of pixels that are not white background (the picture is not blank)."""
    from matplotlib.image import imread

    image = imread(path)[..., :3]
    return float((image.min(axis=-1) < 0.9).mean())


def test_render_figure_writes_the_requested_width(tmp_path):
    rng = np.random.default_rng(0)
    gt = _scene(rng, 20_000)
    panels = [render.Panel('Input scan', gt[::10]), render.Panel('Ground truth', gt),
              render.Panel('Teacher', gt + rng.normal(0, 0.1, gt.shape), 'CD 0.100 m · 1.0 s'),
              render.Panel('Student', gt + rng.normal(0, 0.2, gt.shape))]
    out = render.render_figure(panels, tmp_path / 'fig.png', title='test', width_px=1600)
    width, height = _png_size(out)
    assert width == 1600 and 700 < height < 1000
    assert 0.03 < _ink(out) < 0.8
    assert not list(tmp_path.glob('*.tmp*'))  # written atomically, nothing left behind


def test_common_view_shares_limits_and_colour_range():
    near = np.tile([[1.0, 0, -2], [2, 1, 0]], (50, 1))
    far = np.tile([[-31.0, 4, 3], [0, 0, 1]], (50, 1))
    view = render.common_view([near, far])
    assert view.extent == 35.0  # 5 m steps covering the widest cloud
    assert view.z_low < -1.9 and view.z_high > 2.9
    assert render.common_view([near], extent=12.0).extent == 12.0
    with pytest.raises(ValueError, match='empty'):
        render.common_view([np.zeros((0, 3))])


def test_plot_versus_steps(tmp_path):
    rows = [{'model': m, 'steps': s, 'refine': False, 'cd': 1.0 / s + k, 'seconds_per_scan': s}
            for k, m in enumerate(('a', 'b')) for s in (1, 2, 8)]
    out = render.plot_versus_steps(rows, tmp_path / 'q.png',
                                   [('cd', 'CD'), ('seconds_per_scan', 'time')], panel_px=450)
    assert _png_size(out)[0] == 900 and _ink(out) > 0.01


def test_render_command_from_point_files(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gt = _scene(rng, 8000).astype(np.float32)
    write_points(tmp_path / 'scan.ply', gt[::8])
    np.save(tmp_path / 'gt.npy', gt)
    write_points(tmp_path / 'student.pcd', gt + rng.normal(0, 0.05, gt.shape).astype(np.float32))
    out = tmp_path / 'fig.png'
    assert cli.main(['render', '--scan', str(tmp_path / 'scan.ply'), '--gt',
                     str(tmp_path / 'gt.npy'), '--student-points', str(tmp_path / 'student.pcd'),
                     '--width', '1200', '--out', str(out)]) == 0
    assert _png_size(out)[0] == 1200 and out.stat().st_size > 20_000
    assert cli.main(['render', '--scan', str(tmp_path / 'missing.bin'), '--out', str(out)]) == 2
    assert 'missing.bin' in capsys.readouterr().err


def test_render_command_runs_a_model(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(2)
    scan = _scene(rng, 3000).astype(np.float32)
    write_points(tmp_path / 'scan.bin', scan)
    out = tmp_path / 'fig.png'
    assert cli.main(['render', '--scan', str(tmp_path / 'scan.bin'), '--model',
                     str(tiny_model_dir), '--steps', '1', '--device', 'cpu', '--width', '1000',
                     '--out', str(out)]) == 0
    assert _png_size(out)[0] == 1000
