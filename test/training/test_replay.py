"""`distdpo replay`: a bag through the completion node over DDS into a recorded bag, with GT."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('rclpy')
pytest.importorskip('rosbags')

from distdpo_ros import cli  # noqa: E402
from distdpo_ros.errors import UserError  # noqa: E402
from distdpo_ros.node_support import OUTPUT_TOPIC  # noqa: E402
from distdpo_training.data.bags import write_sequence_bag  # noqa: E402
from distdpo_training.data.frames import Frame  # noqa: E402
from distdpo_training.data.kitti import KittiSequence, write_sequence  # noqa: E402
from distdpo_training.ros.replay import ReplayOptions, replay  # noqa: E402

FRAMES = 4


def street_frames(count: int, points: int = 3000, seed: int = 0) -> list[Frame]:
    """A straight street (ground, two facades) seen from a sensor moving 1 m per frame."""
    rng = np.random.default_rng(seed)
    n = points // 3
    ground = np.c_[rng.uniform(-25, 35, n), rng.uniform(-7, 7, n), np.full(n, -1.73)]
    walls = np.concatenate([np.c_[rng.uniform(-25, 35, n), np.full(n, side),
                                  rng.uniform(-1.7, 4, n)] for side in (-7.0, 7.0)])
    world = np.concatenate([ground, walls])
    labels = np.r_[np.full(n, 40), np.full(2 * n, 50)].astype(np.uint32)  # road, building
    frames = []
    for i in range(count):
        pose = np.eye(4)
        pose[0, 3] = float(i)
        local = world - pose[:3, 3]
        keep = np.linalg.norm(local, axis=1) < 28
        pts = np.c_[local[keep], rng.random(keep.sum())].astype(np.float32)
        frames.append(Frame(index=i, stamp_ns=1_600_000_000_000_000_000 + i * 100_000_000,
                            points=pts, pose=pose, labels=labels[keep]))
    return frames


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(sequence folder with its ground-truth map, bag made from it like kitti2bag does)."""
    from distdpo_training.data.maps import build_map, save_map

    root = tmp_path_factory.mktemp('replay')
    seq_dir = root / 'sequences' / '00'
    write_sequence(seq_dir, street_frames(FRAMES))
    sequence = KittiSequence(seq_dir)
    save_map(sequence, build_map(sequence, voxel=0.2), voxel=0.2, min_range=3.5)
    bag = root / 'drive'
    write_sequence_bag(bag, iter(sequence))
    return seq_dir, bag


def read_bag(path: Path) -> dict[str, list]:
    from rosbags.highlevel import AnyReader

    out: dict[str, list] = {}
    with AnyReader([path]) as reader:
        for conn, bag_ns, raw in reader.messages():
            out.setdefault(conn.topic, []).append((bag_ns, reader.deserialize(raw, conn.msgtype)))
    return out


class SlowEcho:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.config = None

    def complete(self, points, steps=None, guidance=None, refine=False, seed=None):
        time.sleep(self.delay)
        return np.concatenate([points, points + 0.05]).astype(np.float32)


def test_in_process_lockstep_replay_records_every_scan_with_its_stamp(dataset, tmp_path,
                                                                      tiny_model_dir):
    from distdpo_ros.completion import Completer
    from distdpo_ros.pointcloud import cloud_to_xyz

    seq_dir, bag = dataset
    completer = Completer.from_pretrained(tiny_model_dir, device='cpu')
    out = tmp_path / 'completed'
    report = replay(ReplayOptions(bag=bag, record=out, lockstep=True, steps=1), completer)
    summary = report.summary()
    assert summary['published'] == summary['completed'] == FRAMES
    assert 0 < summary['latency_ms']['median'] <= summary['latency_ms']['max'] < 30_000
    assert summary['node']['completed'] == FRAMES and summary['node']['rejected'] == 0
    recorded = read_bag(out)
    stamps = [int(s) for s in KittiSequence(seq_dir).stamps_ns]
    clouds = recorded[OUTPUT_TOPIC]
    assert [ns for ns, _ in clouds] == stamps
    for ns, msg in clouds:
        assert msg.header.frame_id == 'velodyne'
        assert msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec == ns
        xyz = cloud_to_xyz(msg)
        assert 0 < len(xyz) <= completer.config.full_points
        assert np.linalg.norm(xyz, axis=1).max() <= completer.config.max_range + 1e-3
    assert len(recorded['/tf']) == FRAMES  # poses travel with the completions
    assert not list(tmp_path.glob('.completed.*')), 'staging folder left behind'


def test_paced_replay_keeps_only_the_newest_scan_when_the_model_is_slow(dataset):
    _, bag = dataset
    report = replay(ReplayOptions(bag=bag, rate=2.0, wait=10), SlowEcho(delay=0.4))
    summary = report.summary()
    # 4 scans 50 ms apart at rate 2 against a 0.4 s model: the first and the last get done.
    # Every scan the node received was completed or dropped for a newer one; on a loaded
    # machine the subscription's keep-last history may also replace one before it arrives.
    assert summary['published'] == FRAMES
    assert summary['completed'] < FRAMES
    assert summary['node']['dropped'] == summary['node']['received'] - summary['completed']
    assert report.completed[-1].stamp_ns == report.last_stamp


def test_cli_separate_process_with_ground_truth_prints_json(dataset, tmp_path, capsys,
                                                            tiny_model_dir):
    seq_dir, bag = dataset
    code = cli.main(['replay', str(bag), '--separate-process', '--model', str(tiny_model_dir),
                     '--device', 'cpu', '--steps', '1', '--lockstep', '--storage', 'sqlite3',
                     '--record', str(tmp_path / 'rec'), '--gt', str(seq_dir.parents[1]),
                     '--json'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary['completed'] == summary['published'] == FRAMES
    assert summary['metrics']['frames'] == FRAMES
    frames = [row['frame'] for row in summary['metrics_per_frame']]
    assert frames == list(range(FRAMES))
    for row in summary['metrics_per_frame']:
        assert np.isfinite(row['cd']) and row['cd'] > 0 and 0 <= row['fscore'] <= 100  # %
        assert row['points_gt'] > 100
    assert len(read_bag(tmp_path / 'rec')[OUTPUT_TOPIC]) == FRAMES
    assert 'latency_ms' in summary and 'node' not in summary  # the node ran elsewhere


def test_bad_arguments_give_one_clear_error(dataset, tmp_path):
    _, bag = dataset
    with pytest.raises(UserError, match=r"no PointCloud2 topic '/points' \(PointCloud2 topics: "
                                        r'/velodyne_points\)'):
        replay(ReplayOptions(bag=bag, topic='/points'), SlowEcho(0))
    with pytest.raises(UserError, match='already exists'):
        replay(ReplayOptions(bag=bag, record=bag), SlowEcho(0))
    with pytest.raises(UserError, match='does not exist'):
        replay(ReplayOptions(bag=tmp_path / 'nothing'), SlowEcho(0))
    with pytest.raises(UserError, match='--rate must be > 0'):
        replay(ReplayOptions(bag=bag, rate=0), SlowEcho(0))
