"""Training samples and evaluation ground truth from a dataset with maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from test_maps import MOVING_CAR, made_up_drive

from distdpo_ros.config import preset
from distdpo_ros.errors import UserError
from distdpo_training.data.dataset import (
    CompletionDataset,
    MapIndex,
    collate,
    evaluation_ground_truth,
    fixed_size,
    random_linear_map,
    viewpoint_mask,
)
from distdpo_training.data.frames import semantic
from distdpo_training.data.kitti import KittiSequence
from distdpo_training.data.maps import build_map, save_map


def test_viewpoint_mask_matches_open3d_voxel_grid():
    o3d = pytest.importorskip('open3d')
    rng = np.random.default_rng(0)
    view = rng.uniform(-30, 30, (400, 3)) * (1, 1, 0.1)
    queries = rng.uniform(-50, 50, (3000, 3))
    grid = o3d.geometry.VoxelGrid.create_from_point_cloud(
        o3d.geometry.PointCloud(o3d.utility.Vector3dVector(view)), 10.0)
    expected = np.array(grid.check_if_included(o3d.utility.Vector3dVector(queries)))
    assert 50 < expected.sum() < 3000
    np.testing.assert_array_equal(viewpoint_mask(queries, view), expected)
    # a view too wide for a lookup table takes the sorted-key path, with the same answer
    far = np.vstack([view, [[5e4, 5e4, 100.0]]])
    grid = o3d.geometry.VoxelGrid.create_from_point_cloud(
        o3d.geometry.PointCloud(o3d.utility.Vector3dVector(far)), 10.0)
    expected = np.array(grid.check_if_included(o3d.utility.Vector3dVector(queries)))
    np.testing.assert_array_equal(viewpoint_mask(queries, far), expected)


def test_map_index_crop_equals_brute_force():
    rng = np.random.default_rng(1)
    points = rng.uniform(-200, 200, (20000, 3)).astype(np.float32)
    index = MapIndex(points, cell=7.0)
    for center in ([0, 0, 0], [150, -190, 3], [500, 500, 0]):
        got = index.within(np.array(center, float), 40.0)
        want = points[np.linalg.norm(points - np.array(center, np.float32), axis=1) < 40.0]
        assert sorted(map(tuple, got)) == sorted(map(tuple, want))


def test_fixed_size_uses_every_point_evenly():
    points = np.arange(30, dtype=np.float32).reshape(10, 3)
    out = fixed_size(points, 25, np.random.default_rng(0))
    counts = np.bincount(out[:, 0].astype(int) // 3, minlength=10)
    assert out.shape == (25, 3) and set(counts) == {2, 3}
    assert len(np.unique(fixed_size(points, 4, np.random.default_rng(0)), axis=0)) == 4


def test_augmentation_is_a_scaled_rotation_with_optional_flip():
    for seed in range(20):
        a = random_linear_map(np.random.default_rng(seed))
        scale = np.cbrt(abs(np.linalg.det(a)))
        assert 0.95 <= scale <= 1.05
        np.testing.assert_allclose(a @ a.T, scale**2 * np.eye(3), atol=1e-12)
        assert abs(a[2, 2]) > scale * np.cos(0.26)  # the tilt stays small


@pytest.fixture(scope='module')
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    for name in ('00', '01'):
        seq = KittiSequence(made_up_drive(root / 'sequences' / name, scans=4, seed=int(name)))
        save_map(seq, build_map(seq, 0.1), 0.1, 3.5)
    return root


def test_items_have_the_config_sizes_and_are_deterministic(dataset_root):
    config = preset('tiny')
    data = CompletionDataset(dataset_root, ['00', '01'], config, augment=True, seed=5)
    assert len(data) == 8
    item = data[3]
    assert item['scan'].shape == (config.scan_points, 3) and item['scan'].dtype == np.float32
    assert item['gt'].shape == (config.full_points, 3) and item['gt'].dtype == np.float32
    assert (item['sequence'], item['frame']) == ('00', 3)
    again = CompletionDataset(dataset_root, ['00', '01'], config, augment=True, seed=5)[3]
    assert np.array_equal(item['scan'], again['scan']) and np.array_equal(item['gt'], again['gt'])
    other = CompletionDataset(dataset_root, ['00', '01'], config, augment=True, seed=6)[3]
    assert not np.array_equal(item['gt'], other['gt'])
    data.set_epoch(1)
    assert not np.array_equal(item['scan'], data[3]['scan'])
    # scan and ground truth moved together: with a GT larger than the crop (every map point in
    # it), each scan point is within one 0.1 m map voxel of the ground truth
    dense = CompletionDataset(dataset_root, ['00'], config.replace(replication=100), augment=True)
    dense_item = dense[3]
    dist, _ = cKDTree(dense_item['gt']).query(dense_item['scan'])
    assert dist.max() < 0.1 * np.sqrt(3) * 1.05

    batch = collate([data[0], data[5]])
    assert batch['scan'].shape == (2, config.scan_points, 3)
    assert batch['gt'].shape == (2, config.full_points, 3) and batch['gt'].dtype == torch.float32
    assert batch['sequence'] == ['00', '01'] and batch['frame'].tolist() == [0, 1]


def test_scan_is_static_and_ground_truth_is_cropped(dataset_root):
    config = preset('tiny').replace(max_range=20.0)
    data = CompletionDataset(dataset_root, ['00'], config)
    seq = data.sequences[0]
    frame = seq[2]
    item = data[2]
    moving = frame.xyz[semantic(frame.labels) == MOVING_CAR]
    assert cKDTree(moving).query(item['scan'])[0].min() > 0.05  # moving objects left out
    for cloud in (item['scan'], item['gt']):
        r = np.linalg.norm(cloud, axis=1)
        assert r.max() < 20.0 and cloud[:, 2].min() > config.min_z
    assert np.linalg.norm(item['scan'], axis=1).min() > config.min_range
    # the ground truth is made of map points only
    map_tree = cKDTree(data.map_index(0).points)
    world = item['gt'] @ frame.pose[:3, :3].T.astype(np.float32) + frame.pose[:3, 3]
    assert map_tree.query(world)[0].max() < 1e-3


def test_evaluation_ground_truth(dataset_root):
    data = CompletionDataset(dataset_root, ['01'], preset('tiny'))
    seq, index = data.sequences[0], data.map_index(0)
    gt = evaluation_ground_truth(seq, 1, index, max_range=15.0, z_window=(-1.0, 4.4))
    assert len(gt) > 100
    assert np.linalg.norm(gt, axis=1).max() < 15.0 and gt[:, 2].min() > -1.0
    raw = seq.scan(1)[:, :3]
    assert viewpoint_mask(gt, raw[np.linalg.norm(raw, axis=1) < 15.0]).all()
    full = evaluation_ground_truth(seq, 1, index, max_range=15.0)
    assert len(full) > len(gt)  # the road at -1.73 m is inside the default window


def test_dataset_without_maps_says_what_to_run(tmp_path):
    made_up_drive(tmp_path / 'sequences' / '00', scans=1)
    with pytest.raises(UserError, match='map_clean.npy: ground-truth map is missing; run '
                                        '`distdpo build-maps'):
        CompletionDataset(tmp_path, ['00'], preset('tiny'))
    with pytest.raises(UserError, match="unknown split 'test'"):
        CompletionDataset(tmp_path, 'test', preset('tiny'))
