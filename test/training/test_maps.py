"""Static ground-truth maps: content, equality with the reference loop, resumable command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distdpo_ros.cli import main as cli_main
from distdpo_ros.errors import UserError
from distdpo_training.data.frames import Frame, semantic
from distdpo_training.data.kitti import KittiSequence, write_sequence
from distdpo_training.data.maps import (
    build_map,
    build_map_reference_loop,
    first_per_voxel,
    load_map,
    map_is_current,
    pack_index,
    voxel_keys,
)

ROAD, BUILDING, CAR, MOVING_CAR, UNLABELED = 40, 50, 10, 252, 0


def surface_points(rng: np.random.Generator, n: int, low, high) -> np.ndarray:
    return rng.uniform(low, high, size=(n, 3))


def made_up_drive(path: Path, scans: int = 8, seed: int = 0) -> Path:
    """A drive along x past a wall and a parked car, with a car overtaking (a moving class),
    unlabeled clutter and points on the ego vehicle (closer than 3.5 m)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(scans):
        x = 1.5 * i
        world = [
            (surface_points(rng, 3000, (x - 25, -8, -1.73), (x + 25, 8, -1.73)), ROAD),
            (surface_points(rng, 1500, (x - 25, 10, -1.7), (x + 25, 10.05, 6)), BUILDING),
            (surface_points(rng, 300, (12, -6, -1.7), (16.5, -4.2, -0.2)), CAR),
            (surface_points(rng, 300, (x + 8 + 1.2 * i, 3, -1.2),
                            (x + 12.5 + 1.2 * i, 4.8, -0.2)), MOVING_CAR),
            (surface_points(rng, 100, (x - 20, -20, 5), (x + 20, -15, 9)), UNLABELED),
            (surface_points(rng, 50, (x - 1, -0.8, -0.3), (x + 1, 0.8, 0.2)), CAR),  # ego car
        ]
        pose = np.eye(4)
        yaw = 0.02 * i
        pose[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]
        pose[:3, 3] = (x, 0.0, 0.0)
        xyz_world = np.concatenate([p for p, _ in world])
        labels = np.concatenate([np.full(len(p), c, dtype=np.uint32) for p, c in world])
        labels |= np.uint32(7 << 16)  # an instance id in the upper bits must not matter
        xyz = (xyz_world - pose[:3, 3]) @ pose[:3, :3]  # into the sensor frame
        points = np.column_stack((xyz, rng.uniform(0, 1, len(xyz)))).astype(np.float32)
        frames.append(Frame(i, i * 100_000_000, points, pose, labels))
    write_sequence(path, frames)
    return path


def world_points(seq: KittiSequence, i: int) -> tuple[np.ndarray, np.ndarray]:
    frame = seq[i]
    return frame.xyz.astype(np.float64) @ frame.pose[:3, :3].T + frame.pose[:3, 3], \
        semantic(frame.labels)


def test_map_holds_every_static_point_and_no_moving_object(tmp_path):
    seq = KittiSequence(made_up_drive(tmp_path / '00'))
    voxel = 0.1
    points = build_map(seq, voxel)
    assert points.dtype == np.float32 and points.shape[1] == 3
    # one point per voxel
    assert len(np.unique(voxel_keys(points, voxel))) == len(points)
    tree = cKDTree(points)
    for i in range(len(seq)):
        xyz, cls = world_points(seq, i)
        far = np.linalg.norm(seq[i].xyz, axis=1) > 3.5
        static = far & np.isin(cls, (ROAD, BUILDING, CAR))
        dist, _ = tree.query(xyz[static])
        assert dist.max() <= voxel * np.sqrt(3) + 1e-6  # within one voxel of the map
        ego_car = ~far & (cls == CAR)
        for excluded in (cls == MOVING_CAR, cls == UNLABELED, ego_car):
            dist, _ = tree.query(xyz[excluded])
            assert dist.min() > 0.3  # nothing of it entered the map


@pytest.mark.parametrize('chunk_points', [1_000, 7_000, 10_000_000])
def test_chunked_map_equals_reference_loop(tmp_path, chunk_points):
    seq = KittiSequence(made_up_drive(tmp_path / '00', scans=6, seed=1))
    fast = build_map(seq, 0.2, chunk_points=chunk_points)
    slow = build_map_reference_loop(seq, 0.2)
    assert fast.tobytes() == slow.tobytes()  # same points (first per voxel), same order


def test_build_maps_command_is_resumable(tmp_path, capsys):
    root = tmp_path / 'data'
    for name in ('00', '01'):
        made_up_drive(root / 'sequences' / name, scans=3)
    assert cli_main(['build-maps', str(root), '--voxel', '0.2']) == 0
    maps = {n: root / 'sequences' / n / 'map_clean.npy' for n in ('00', '01')}
    first = {n: path.stat().st_mtime_ns for n, path in maps.items()}
    seq = KittiSequence(root / 'sequences' / '01')
    assert map_is_current(seq, 0.2) and not map_is_current(seq, 0.1)
    np.testing.assert_array_equal(load_map(seq.path), build_map(seq, 0.2))
    capsys.readouterr()

    # a changed scan makes its sequence stale; the other one is skipped
    scan = root / 'sequences' / '01' / 'velodyne' / '000002.bin'
    scan.write_bytes(scan.read_bytes()[:-16])
    (root / 'sequences' / '01' / 'labels' / '000002.label').write_bytes(
        (root / 'sequences' / '01' / 'labels' / '000002.label').read_bytes()[:-4])
    assert cli_main(['build-maps', str(root), '--voxel', '0.2']) == 0
    err = capsys.readouterr().err
    assert '00: map is up to date' in err and '01: map is up to date' not in err
    assert maps['00'].stat().st_mtime_ns == first['00']
    assert maps['01'].stat().st_mtime_ns != first['01']
    assert map_is_current(KittiSequence(root / 'sequences' / '01'), 0.2)


def test_missing_map_says_what_to_run(tmp_path):
    seq_dir = made_up_drive(tmp_path / 'sequences' / '00', scans=1)
    with pytest.raises(UserError, match='map_clean.npy: ground-truth map is missing; run '
                                        '`distdpo build-maps'):
        load_map(seq_dir)


@pytest.mark.parametrize('spread', [50, 1 << 20])  # the packed sort, and the argsort fallback
def test_first_per_voxel_takes_the_first_point_of_each_voxel(spread):
    rng = np.random.default_rng(2)
    index = rng.integers(-spread, spread, size=(200, 3))
    index = index[rng.integers(0, 200, 5000)]  # many repeats, in random order
    keys = pack_index(index)
    unique, first = np.unique(keys, return_index=True)  # numpy returns first occurrences
    got = first_per_voxel(index)
    np.testing.assert_array_equal(got, first)
    np.testing.assert_array_equal(keys[got], unique)


def test_map_of_a_simulated_drive(tmp_path):
    pytest.importorskip('open3d')
    from distdpo_training.data.simulation.drive import simulate_dataset

    (folder,) = simulate_dataset(tmp_path, sequences=1, frames=6, seed=3, progress=False)
    seq = KittiSequence(folder)
    points = build_map(seq, 0.1)
    tree = cKDTree(points)
    map_rows = np.ascontiguousarray(points).view(np.dtype((np.void, 12))).ravel()
    moving_seen = 0
    for i in range(len(seq)):
        frame = seq[i]
        cls = semantic(frame.labels)
        far = np.linalg.norm(frame.xyz, axis=1) > 3.5
        world = (np.einsum('ij,kj->ik', frame.xyz.astype(np.float64), frame.pose[:3, :3])
                 + frame.pose[:3, 3]).astype(np.float32)  # as the map builder computes it
        static = far & (cls > 1) & (cls < 252)
        assert tree.query(world[static])[0].max() <= 0.1 * np.sqrt(3) + 1e-5
        moving = np.ascontiguousarray(world[cls >= 252])
        moving_seen += len(moving)
        rows = moving.view(np.dtype((np.void, 12))).ravel()
        assert not np.isin(rows, map_rows).any()  # no moving point is a map point
        if len(moving):  # and most of a moving object is off every static surface
            assert np.median(tree.query(moving)[0]) > 0.3
    assert moving_seen > 100  # the drive has traffic, so the check above means something


def test_bench_data_measures_both_loops_on_the_same_scans(tmp_path, capsys):
    import json

    seq_dir = made_up_drive(tmp_path / '00', scans=4)
    assert cli_main(['bench', 'data', '--json', '--sections', 'build_maps',
                     '--dataset', str(seq_dir), '--scans', '3']) == 0
    result = json.loads(capsys.readouterr().out)['build_maps']
    assert result['scans'] == 3 and result['identical_maps'] is True
    assert result['build_maps_s'] > 0 and result['reference_loop_s'] > 0
    assert result['speedup'] > 0 and result['map_points'] > 1000
