"""`distdpo demo`: a simulated drive through the node, recorded, scored and drawn."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('rclpy')
pytest.importorskip('rosbags')
pytest.importorskip('open3d')

from distdpo_ros import checkpoint as ckpt  # noqa: E402
from distdpo_ros.cli import main as distdpo  # noqa: E402
from distdpo_ros.node_support import OUTPUT_TOPIC  # noqa: E402

FRAMES = 3


@pytest.fixture(scope='module')
def demo_run(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, str]:
    """One demo run (tiny random model, also as the pictured 'teacher'): (out folder, stdout)."""
    out = tmp_path_factory.mktemp('demo') / 'demo_out'
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = distdpo(['demo', '--model', str(tiny_model_dir), '--teacher', str(tiny_model_dir),
                        '--frames', str(FRAMES), '--out', str(out)])
    assert code == 0
    return out, stdout.getvalue()


def test_summary_has_latency_and_quality(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['frames'] == {'simulated': FRAMES, 'published': FRAMES,
                                 'completed': FRAMES, 'scored': FRAMES}
    latency = summary['latency_ms']
    assert 0 < latency['median'] <= latency['p95'] <= latency['max']
    model = summary['node_stats']['model_ms']
    assert 0 < model['median'] <= latency['max']
    quality = summary['quality']
    assert math.isfinite(quality['cd']) and quality['cd'] > 0
    assert 0 <= quality['fscore'] <= 100 and 0 <= quality['jsd'] <= 1
    per_frame = summary['quality_per_frame']
    assert [r['frame'] for r in per_frame] == list(range(FRAMES))
    assert quality['cd'] == pytest.approx(np.mean([r['cd'] for r in per_frame]))
    assert summary['model']['steps'] == 8 and summary['model']['scale'] == 'tiny'
    # The printed table names the numbers and where the outputs are.
    assert f'{FRAMES} of {FRAMES}' in printed and 'latency [ms]' in printed
    assert f'CD {quality["cd"]:.3f} m' in printed
    inputs = summary['inputs']  # the input baselines of the same scans sit beside the model
    assert set(inputs) == {'raw', 'cond', 'jit', 'sub'}
    assert all(v['cd'] > 0 and 0 <= v['fscore'] <= 100 for v in inputs.values())
    assert 'input: conditioning points' in printed
    assert f'CD {inputs["cond"]["cd"]:.3f} m' in printed
    for name in ('summary.json', 'completed', 'demo.png'):
        assert str(out / name) in printed


def test_picture_shows_what_the_node_published(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    summary = json.loads((out / 'summary.json').read_text())
    picture = summary['picture']
    assert picture['frame'] == FRAMES // 2
    # The same model and seed completed in this process scores exactly like the node's output
    # that went over DDS: the picture shows the completion the node really published.
    assert picture['teacher']['cd'] == pytest.approx(picture['cd'], rel=1e-6)
    png = (out / 'demo.png').read_bytes()
    assert png.startswith(b'\x89PNG\r\n\x1a\n')
    width, height = int.from_bytes(png[16:20], 'big'), int.from_bytes(png[20:24], 'big')
    assert width == 2400 and 800 < height < 1600


def test_recorded_bag_holds_every_completed_cloud(demo_run: tuple[Path, str]) -> None:
    from rosbags.highlevel import AnyReader

    out, _ = demo_run
    summary = json.loads((out / 'summary.json').read_text())
    stamps, topics = [], set()
    with AnyReader([out / 'completed']) as reader:
        for conn, _, raw in reader.messages():
            topics.add(conn.topic)
            if conn.topic == OUTPUT_TOPIC:
                msg = reader.deserialize(raw, conn.msgtype)
                assert msg.width * msg.height > 0
                stamps.append(msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)
    assert stamps == [r['stamp_ns'] for r in summary['quality_per_frame']]
    assert '/tf' in topics
    assert not (out / 'drive').exists()  # the simulated drive is removed without --keep


def test_missing_default_model_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(ckpt, 'DEFAULT_MODELS_DIR', tmp_path / 'default_models')
    out = tmp_path / 'demo_out'
    assert distdpo(['demo', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'default model' in err and '--model DIR' in err
    assert not out.exists()  # nothing simulated before the failure


def test_refuses_an_output_folder_it_did_not_write(tiny_model_dir: Path, tmp_path: Path,
                                                   capsys) -> None:
    (tmp_path / 'mine.txt').write_text('user data')
    assert distdpo(['demo', '--model', str(tiny_model_dir), '--out', str(tmp_path)]) == 2
    assert 'not written by `distdpo demo`' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mine.txt']
