"""The HDL-64E street simulator: realism against a real KITTI scan, determinism, moving objects,
and files the SemanticKITTI and bag readers accept."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distdpo_ros.cli import main as cli_main
from distdpo_training.data.frames import semantic
from distdpo_training.data.kitti import KittiSequence, read_scan
from distdpo_training.data.simulation import make_sequence, save_preview, simulate_dataset
from distdpo_training.data.simulation import materials as M
from distdpo_training.data.simulation.drive import KITTI_TR
from distdpo_training.data.simulation.sensor import ELEVATIONS_DEG, N_AZIMUTH

REAL_SCAN = 'kitti_seq00_subset/velodyne/000094.bin'


def _rings(points: np.ndarray) -> list[np.ndarray]:
    """Rings of a scan stored in KITTI order (ring by ring, azimuth rising, each ring starting
    just past azimuth 0): split where the azimuth crosses from negative to positive."""
    az = np.arctan2(points[:, 1], points[:, 0])
    starts = np.flatnonzero((az[:-1] < 0) & (az[1:] >= 0) & (az[:-1] > -np.pi / 2)) + 1
    return np.split(np.arange(len(points)), starts)


def _scan_facts(points: np.ndarray) -> dict:
    """What a KITTI scan looks like in numbers: point count, rings, median elevation per ring,
    the fraction of laser firings that returned, the ground height near the car and the
    remission of the ground there (the rest depends on what happens to be around)."""
    rings = _rings(points)
    rng = np.linalg.norm(points[:, :3], axis=1)
    elevation = np.degrees(np.arcsin(points[:, 2] / rng))
    azimuth = np.degrees(np.arctan2(points[:, 1], points[:, 0]))
    steps = np.concatenate([np.diff(azimuth[r]) for r in rings])
    step = np.median(steps[(steps > 0) & (steps < 1)])          # degrees between firings
    horizontal = np.hypot(points[:, 0], points[:, 1])
    near = (horizontal > 5) & (horizontal < 15)
    hist, edges = np.histogram(points[near, 2], bins=np.arange(-3.0, 1.0, 0.05))
    ground = edges[hist.argmax()] + 0.025
    on_ground = near & (np.abs(points[:, 2] - ground) < 0.15)
    return {
        'points': len(points),
        'rings': len(rings),
        'ring_elevation': np.array([np.median(elevation[r]) for r in rings]),
        'returned': len(points) / (len(rings) * 360.0 / step),
        'ground': ground,
        'max_range': rng.max(),
        'ground_remission': np.median(points[on_ground, 3]),
    }


@pytest.fixture(scope='module')
def drives():
    """One urban and one suburban drive of a few frames."""
    return {urban: make_sequence(seed=11, index=0, frames=12, urban=urban)
            for urban in (True, False)}


@pytest.mark.parametrize('urban', [True, False], ids=['urban', 'suburban'])
def test_simulated_scan_looks_like_real_kitti(shared_data, drives, urban):
    """Point count, returned rays, ring elevations, ground height, range cut and ground remission
    of simulated scans (three frames of a drive, median) against a real KITTI scan of
    sequence 00."""
    real = _scan_facts(read_scan(shared_data / REAL_SCAN))
    facts = [_scan_facts(drives[urban].frame(f).points) for f in (2, 6, 10)]
    assert real['rings'] == 64 and all(f['rings'] == 64 for f in facts)

    def median(key: str) -> float:
        return float(np.median([f[key] for f in facts]))

    assert abs(median('points') / real['points'] - 1) < 0.15, (median('points'), real['points'])
    assert abs(median('returned') - real['returned']) < 0.06, (median('returned'),
                                                               real['returned'])
    # Ring by ring the same beam elevations (neighbouring rings are 0.33-0.5 deg apart).
    diff = np.abs(np.median([f['ring_elevation'] for f in facts], 0) - real['ring_elevation'])
    assert diff.max() < 0.3, diff.round(2)
    assert abs(median('ground') - real['ground']) < 0.12, (median('ground'), real['ground'])
    assert all(75 < f['max_range'] <= 80.0 for f in facts)
    assert abs(median('ground_remission') - real['ground_remission']) < 0.06


def test_beam_constants_match_the_measured_kitti_rings(shared_data):
    measured = np.loadtxt(shared_data / 'sensor' / 'kitti_seq00_000000_ring_elevations_deg.txt')
    np.testing.assert_allclose(ELEVATIONS_DEG, measured[:64])


def test_same_seed_same_scan_other_seed_other_scan():
    a = make_sequence(seed=3, index=1, frames=3).frame(2)
    b = make_sequence(seed=3, index=1, frames=3).frame(2)
    c = make_sequence(seed=4, index=1, frames=3).frame(2)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.pose, b.pose)
    assert len(a.points) != len(c.points) or not np.array_equal(a.points, c.points)


def _world_points(frame) -> np.ndarray:
    return frame.points[:, :3] @ frame.pose[:3, :3].T + frame.pose[:3, 3]


def test_moving_classes_are_on_objects_that_move(drives):
    """Points labelled with a moving class belong to objects that moved between two frames 1.1 s
    apart (walkers about 1 m, cars several); static instances (parked cars) stay put."""
    seq = drives[False]
    first, last = seq.frame(0), seq.frame(11)
    classes = set(np.unique(semantic(np.concatenate([first.labels, last.labels]))).tolist())
    assert classes & {M.ROAD, M.SIDEWALK, M.BUILDING, M.VEGETATION, M.TERRAIN}
    assert classes & set(M.MOVING.values()), 'no moving object in view'
    # Moving classes exactly on the agents (instance ids after the static world's), and each
    # such point on its own agent (within its bounding sphere, plus glass penetration).
    for f, frame in ((0, first), (11, last)):
        moving = semantic(frame.labels) >= M.FIRST_MOVING
        agent = (frame.labels >> 16) > seq.world.instances
        np.testing.assert_array_equal(moving, agent)
        rot, trans, _ = seq.agents.poses(seq.world.street, f)
        centers = np.einsum('nij,nj->ni', rot, seq.agents.centers) + trans
        owner = (frame.labels[moving] >> 16).astype(int) - seq.world.instances - 1
        world = frame.points[moving, :3] @ seq.poses[f][:3, :3].T + seq.poses[f][:3, 3]
        gap = np.linalg.norm(world - centers[owner], axis=1) - seq.agents.radii[owner]
        assert gap.max() < 2.5, gap.max()
    checked = {'moving': 0, 'static': 0}
    xyz_a = _world_points(first)
    for inst in np.unique(first.labels >> 16):
        in_a = (first.labels >> 16) == inst
        in_b = (last.labels >> 16) == inst
        if inst == 0 or in_a.sum() < 30 or in_b.sum() < 30:
            continue
        classes_of_instance = np.unique(semantic(first.labels[in_a]))
        assert len(classes_of_instance) == 1            # one class per object
        moving = classes_of_instance[0] >= M.FIRST_MOVING
        # How far its points in the last frame are from where it was (10th percentile: the
        # views differ, so a static object shares only part of its surface between frames).
        gap = np.percentile(cKDTree(xyz_a[in_a]).query(_world_points(last)[in_b])[0], 10)
        if moving:
            assert gap > 0.4, (inst, classes_of_instance, gap)
        else:
            assert gap < 0.25, (inst, classes_of_instance, gap)
        checked['moving' if moving else 'static'] += 1
    assert checked['moving'] >= 1 and checked['static'] >= 1, checked
    # The agents' tracks themselves: every moving agent changes place during the drive.
    assert (np.abs(seq.agents.track[:, -1] - seq.agents.track[:, 0]) > 0.5).all()


def test_dataset_files_read_back_with_the_kitti_and_bag_readers(tmp_path):
    from rosbags.highlevel import AnyReader

    from distdpo_ros.pointcloud import cloud_to_arrays, field_names
    from distdpo_training.data.bags import BagFrames, typestore

    folders = simulate_dataset(tmp_path, sequences=1, frames=3, seed=5, bag=True, first=2,
                               progress=False)
    assert [f.name for f in folders] == ['02']
    seq = KittiSequence(tmp_path / 'sequences' / '02')
    seq.check_files()
    assert len(seq) == 3 and seq.has_labels
    np.testing.assert_allclose(seq.calib['Tr'], KITTI_TR)
    expected = make_sequence(seed=5, index=2, frames=3)
    for i, frame in enumerate(seq):
        reference = expected.frame(i)
        np.testing.assert_array_equal(frame.points, reference.points)
        np.testing.assert_array_equal(frame.labels, reference.labels)
        np.testing.assert_allclose(frame.pose, reference.pose, atol=1e-9)
    assert np.allclose(seq.poses[0], np.eye(4))
    assert seq.poses[2][0, 3] > 0.5                       # drives forward along its x axis
    bag = list(BagFrames(tmp_path / 'bags' / '02'))
    assert len(bag) == 3
    np.testing.assert_array_equal(bag[1].points, seq[1].points)
    np.testing.assert_array_equal(bag[1].labels, seq[1].labels)
    np.testing.assert_allclose(bag[2].pose, seq.poses[2], atol=1e-6)
    with AnyReader([tmp_path / 'bags' / '02'], default_typestore=typestore()) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
        assert topics == {'/velodyne_points': 'sensor_msgs/msg/PointCloud2',
                          '/tf': 'tf2_msgs/msg/TFMessage'}
        conn = next(c for c in reader.connections if c.topic == '/velodyne_points')
        _, _, raw = next(reader.messages(connections=[conn]))
        msg = reader.deserialize(raw, conn.msgtype)
    assert msg.header.frame_id == 'velodyne'
    assert field_names(msg)[:6] == ['x', 'y', 'z', 'intensity', 'ring', 'time']
    _, values = cloud_to_arrays(msg, ['ring', 'time'])
    assert values['ring'].dtype == np.uint16 and values['ring'].max() <= 63
    assert values['time'].dtype == np.float32
    assert 0 <= values['time'].min() and values['time'].max() < 0.1
    assert len(np.unique(values['ring'])) == 64


def test_cli_simulate_with_preview_and_bad_input(tmp_path, shared_data, capsys):
    png = tmp_path / 'preview.png'
    code = cli_main(['simulate', str(tmp_path / 'sim'), '--frames', '2', '--seed', '1',
                     '--quiet', '--preview', str(png), '--compare',
                     str(shared_data / REAL_SCAN)])
    assert code == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert len(KittiSequence(tmp_path / 'sim' / 'sequences' / '00')) == 2
    # The same folder again is refused (one line), then accepted with --overwrite.
    capsys.readouterr()
    assert cli_main(['simulate', str(tmp_path / 'sim'), '--frames', '2', '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('distdpo: error:') and '\n' not in err and 'sequences/00' in err
    assert cli_main(['simulate', str(tmp_path / 'sim'), '--frames', '2', '--quiet',
                     '--overwrite']) == 0
    assert cli_main(['simulate', str(tmp_path / 'x'), '--frames', '0']) == 2
    assert '--frames' in capsys.readouterr().err


def test_preview_function_draws_any_sequence(tmp_path):
    simulate_dataset(tmp_path, frames=1, seed=2, progress=False)
    out = save_preview(tmp_path / 'pics' / 'bev.png', tmp_path / 'sequences' / '00')
    assert out.stat().st_size > 10_000


def test_ray_grid_is_the_kitti_firing_pattern():
    from distdpo_training.data.simulation.sensor import ray_grid

    directions, ring, azimuth = ray_grid()
    assert len(directions) == 64 * N_AZIMUTH
    elevation = np.degrees(np.arcsin(directions[:, 2]))
    for r in (0, 31, 32, 63):
        np.testing.assert_allclose(elevation[ring == r], ELEVATIONS_DEG[r], atol=1e-4)
    assert np.all(np.diff(ELEVATIONS_DEG[1:]) < 0)                       # top to bottom
    steps = np.diff(np.unwrap(np.arctan2(directions[ring == 5, 1], directions[ring == 5, 0])))
    np.testing.assert_allclose(steps, 2 * np.pi / N_AZIMUTH, rtol=1e-3)


def test_bench_data_reports_simulator_speed(tmp_path, capsys):
    import json

    assert cli_main(['bench', 'data', '--json', '--sections', 'simulate', '--sim-frames', '3',
                     '--sim-sequences', '1']) == 0
    report = json.loads(capsys.readouterr().out)['simulate']
    assert report['frames'] == 3 and 100_000 < report['points_per_scan'] < 140_000
    assert report['scans_per_s'] > 0 and report['scans_per_s_after_world_build'] > 0
    assert set(report['ms_per_scan']) == {'agents', 'cast_static', 'cast_agents', 'returns',
                                          'write'}
