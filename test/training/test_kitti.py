"""SemanticKITTI reader and writer: pose convention on real frames, labels, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distdpo_ros.cli import main as cli_main
from distdpo_ros.errors import UserError
from distdpo_training.data.frames import Frame, semantic, static_mask
from distdpo_training.data.kitti import (
    KittiSequence,
    find_sequences,
    read_labels,
    read_scan,
    write_sequence,
)


def real_sequence(shared_data: Path, tmp_path: Path) -> Path:
    """A sequence folder over the real subset: 4 scans, poses and times of all 4541 frames."""
    src = shared_data / 'kitti_seq00_subset'
    seq = tmp_path / 'sequences' / '00'
    (seq / 'velodyne').mkdir(parents=True)
    for scan in (src / 'velodyne').glob('*.bin'):
        os.symlink(scan, seq / 'velodyne' / scan.name)
    os.symlink(src / 'calib.txt', seq / 'calib.txt')
    os.symlink(src / 'poses_all_frames.txt', seq / 'poses.txt')
    os.symlink(src / 'times_all_frames.txt', seq / 'times.txt')
    return seq


def median_nn_distance(seq: KittiSequence, moving: int, fixed: int) -> float:
    """Median distance of the non-ground points of scan `moving`, registered onto scan `fixed`
    with the loaded poses, to their nearest neighbour in `fixed`."""
    a, b = seq[moving], seq[fixed]
    pts = a.xyz[a.xyz[:, 2] > -1.3].astype(np.float64)  # ground is at about -1.73 m
    relative = np.linalg.inv(b.pose) @ a.pose
    moved = pts @ relative[:3, :3].T + relative[:3, 3]
    dist, _ = cKDTree(b.xyz[b.xyz[:, 2] > -1.3]).query(moved)
    return float(np.median(dist))


def test_real_subset_poses_register_consecutive_frames(shared_data, tmp_path):
    seq = KittiSequence(real_sequence(shared_data, tmp_path))
    assert list(seq.frame_ids) == [94, 95, 198, 199]
    assert not seq.has_labels
    assert seq[0].points.shape[1] == 4 and 115_000 < len(seq[0].points) < 130_000
    times = (shared_data / 'kitti_seq00_subset' / 'times_all_frames.txt').read_text().split()
    assert seq[1].stamp_ns == round(float(times[95]) * 1e9)  # line i is frame i
    np.testing.assert_allclose(seq.poses[0][:3, 3], [81.638, 5.261, 2.273], atol=1e-3)  # x forward
    assert median_nn_distance(seq, 1, 0) < 0.05  # 95 onto 94; identity gives 0.15 m
    assert median_nn_distance(seq, 3, 2) < 0.05  # 199 onto 198
    # The camera-frame poses used directly (the wrong convention) miss by far more.
    cam = seq.calib['Tr'] @ seq.poses @ np.linalg.inv(seq.calib['Tr'])
    wrong = KittiSequence(seq.path)
    wrong.poses = cam
    assert median_nn_distance(wrong, 1, 0) > 0.1


def test_fifty_labelled_points(shared_data):
    src = shared_data / 'real_scans'
    points = read_scan(src / 'semantickitti_00_000000_50pts.bin')
    labels = read_labels(src / 'semantickitti_00_000000_50pts.label')
    assert points.shape == (50, 4) and labels.shape == (50,)
    classes = semantic(labels)
    assert set(classes.tolist()) == {0, 50, 52, 70, 71, 80}
    # unlabeled (0) is dropped by the static filter, buildings/vegetation/poles stay
    assert not static_mask(labels)[classes == 0].any()
    assert static_mask(labels)[classes == 50].all()


def small_frames(n: int, labels: bool = True) -> list[Frame]:
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        pose = np.eye(4)
        pose[:3, 3] = (2.0 * i, 0.1 * i, 0.0)
        points = rng.normal(size=(100 + i, 4)).astype(np.float32)
        frames.append(Frame(i, 100_000_000 * i + 7, points, pose,
                            rng.integers(0, 260, 100 + i).astype(np.uint32) if labels else None))
    return frames


def test_writer_round_trip_with_calibration(tmp_path):
    frames = small_frames(3)
    tr = np.array([[0, -1, 0, 0.1], [0, 0, -1, -0.05], [1, 0, 0, -0.3], [0, 0, 0, 1.0]])
    assert write_sequence(tmp_path / '05', frames, tr) == 3
    seq = KittiSequence(tmp_path / '05')
    assert len(seq) == 3 and seq.has_labels
    for frame, read in zip(frames, seq, strict=True):
        assert read.points.tobytes() == frame.points.tobytes()
        assert np.array_equal(read.labels, frame.labels)
        assert read.stamp_ns == frame.stamp_ns
        np.testing.assert_allclose(read.pose, frame.pose, atol=1e-12)
    with pytest.raises(UserError, match='already holds a sequence'):
        write_sequence(tmp_path / '05', frames)


def test_find_sequences_layouts(tmp_path):
    write_sequence(tmp_path / 'dataset' / 'sequences' / '00', small_frames(1))
    write_sequence(tmp_path / 'dataset' / 'sequences' / '08', small_frames(1))
    assert [p.name for p in find_sequences(tmp_path)] == ['00', '08']
    assert [p.name for p in find_sequences(tmp_path, ['08'])] == ['08']
    assert find_sequences(tmp_path / 'dataset' / 'sequences' / '08')[0].name == '08'
    with pytest.raises(UserError, match="no sequence '03'"):
        find_sequences(tmp_path, ['03'])


def broken(tmp_path: Path, damage) -> Path:
    seq = tmp_path / 'sequences' / '00'
    write_sequence(seq, small_frames(3))
    damage(seq)
    return seq


@pytest.mark.parametrize('damage, culprit, words', [
    (lambda s: (s / 'velodyne' / '000001.bin').write_bytes(b'x' * 17),
     'velodyne/000001.bin', 'truncated scan file (17 bytes is not a multiple of 16)'),
    (lambda s: (s / 'labels' / '000002.label').write_bytes(b'x' * 6),
     'labels/000002.label', 'truncated label file'),
    (lambda s: (s / 'labels' / '000000.label').write_bytes(b'x' * 8),
     'labels/000000.label', '2 labels for 100 points'),
    (lambda s: (s / 'poses.txt').unlink(), 'poses.txt', 'poses file is missing'),
    (lambda s: (s / 'poses.txt').write_text('1 0 0 0 0 1 0 0 0 0 1 0\n'),
     'poses.txt', '1 poses, but scan 000002.bin needs frame 2'),
    (lambda s: (s / 'poses.txt').write_text('1 0 0\n'), 'poses.txt:1', 'expected 12 numbers'),
    (lambda s: (s / 'labels' / '000001.label').unlink(),
     'labels', 'have no label file, first 000001.label'),
    (lambda s: (s / 'calib.txt').write_text('P0: 1 2 3\n'), 'calib.txt:1', 'expected'),
    (lambda s: (s / 'velodyne' / 'scan.bin').write_bytes(b''), 'scan.bin', 'not a frame number'),
])
def test_damaged_files_give_one_line_naming_the_file(tmp_path, capsys, damage, culprit, words):
    seq_dir = broken(tmp_path, damage)
    with pytest.raises(UserError) as info:
        for _ in KittiSequence(seq_dir):
            pass
    assert culprit in str(info.value) and words in str(info.value)
    # through the command line: exit code 2 and exactly one line on stderr
    assert cli_main(['build-maps', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('distdpo: error: ') and culprit in err[0]
