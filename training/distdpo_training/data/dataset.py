"""Training samples (reference §1.3) and evaluation ground truth (reference §5) from a dataset.

A training item pairs the conditioning scan with a fixed-size ground-truth crop of the static map:

1. scan: static points only (labels 1 < l < 252, when the sequence has labels), then the model's
   range and height window (:func:`distdpo_ros.completion.valid_points`);
2. ground truth: map points within `max_range` (3-D) of the sensor, moved into the scan frame,
   z > min_z (:class:`MapIndex` makes the crop a few slices instead of a pass over the map);
3. training only: one random linear map applied to both, yaw U[0, 2 pi), tilt about x, y, z
   N(0, 0.06^2) clipped to +-0.18 rad, isotropic scale U[0.95, 1.05], y flipped with p = 0.5;
4. the ground truth is cut to the 10 m cells the scan sees (:func:`viewpoint_mask`, Open3D's
   VoxelGrid semantics), the scan is reduced to `scan_points` exactly as the Completer does
   (:func:`distdpo_ros.completion.subsample_scan`), and the ground truth is brought to
   `full_points` by a random permutation tiled to length (every point appears
   floor(N / |G|) or one more times; LiDiff's repeat-then-truncate drops part of the crop).

Sizes come from the model config (full / small / tiny). Items are deterministic per
(seed, epoch, index), whichever worker computes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from distdpo_ros.completion import subsample_scan, valid_points
from distdpo_ros.config import ModelConfig
from distdpo_ros.errors import UserError
from distdpo_training.data.frames import static_mask
from distdpo_training.data.kitti import KittiSequence, find_sequences
from distdpo_training.data.maps import load_map

# SemanticKITTI splits of the reference (§1.1).
SPLITS: dict[str, tuple[str, ...]] = {
    'train': ('00', '01', '02', '03', '04', '05', '06', '07', '09', '10'),
    'val': ('08',),
}
VIEWPOINT_VOXEL = 10.0  # metres, the cells of the scan that keep ground truth
EVAL_Z_WINDOW = (-4.0, 4.4)  # reference §5


def viewpoint_mask(points: np.ndarray, view: np.ndarray,
                   voxel: float = VIEWPOINT_VOXEL) -> np.ndarray:
    """Which `points` fall into a voxel occupied by `view`, with Open3D's VoxelGrid semantics:
    origin = min(view) - voxel / 2, cell = floor((p - origin) / voxel)."""
    if len(view) == 0 or len(points) == 0:
        return np.zeros(len(points), dtype=bool)
    origin = view.min(axis=0).astype(np.float64) - voxel / 2
    occupied = np.floor((view - origin) / voxel).astype(np.int64)
    dims = occupied.max(axis=0) + 1
    cells = np.floor((points - origin) / voxel).astype(np.int64)
    inside = ((cells >= 0) & (cells < dims)).all(axis=1)
    mask = np.zeros(len(points), dtype=bool)
    if int(np.prod(dims)) <= 1 << 24:  # a scan within range spans a few hundred cells: a table
        table = np.zeros(tuple(dims), dtype=bool)
        table[tuple(occupied.T)] = True
        mask[inside] = table[tuple(cells[inside].T)]
    else:
        def key(c: np.ndarray) -> np.ndarray:
            return (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]

        mask[inside] = np.isin(key(cells[inside]), np.unique(key(occupied)))
    return mask


class MapIndex:
    """A map sorted by square columns on x, y, so that a range crop reads a few contiguous
    slices of it instead of computing the distance of every map point."""

    def __init__(self, points: np.ndarray, cell: float = 10.0) -> None:
        self.cell = cell
        columns = np.floor(np.asarray(points)[:, :2] / cell).astype(np.int64)
        self.low = columns.min(axis=0) if len(columns) else np.zeros(2, dtype=np.int64)
        columns -= self.low
        self.shape = (columns.max(axis=0) + 1) if len(columns) else np.ones(2, dtype=np.int64)
        keys = columns[:, 0] * self.shape[1] + columns[:, 1]
        order = np.argsort(keys, kind='stable')
        self.keys = keys[order]
        self.points = np.ascontiguousarray(np.asarray(points, dtype=np.float32)[order])

    def __len__(self) -> int:
        return len(self.points)

    def within(self, center: np.ndarray, radius: float) -> np.ndarray:
        """(K, 3) float32 map points closer than `radius` (3-D) to `center`."""
        center = np.asarray(center, dtype=np.float64)
        lo = np.floor((center[:2] - radius) / self.cell).astype(np.int64) - self.low
        hi = np.floor((center[:2] + radius) / self.cell).astype(np.int64) - self.low
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape - 1)
        if len(self.points) == 0 or (lo > hi).any():
            return np.zeros((0, 3), dtype=np.float32)
        rows = np.arange(lo[0], hi[0] + 1) * self.shape[1]
        starts = np.searchsorted(self.keys, rows + lo[1], side='left')
        ends = np.searchsorted(self.keys, rows + hi[1], side='right')
        near = np.concatenate([self.points[s:e] for s, e in zip(starts, ends, strict=True)])
        offset = near - center.astype(np.float32)
        return near[np.einsum('ij,ij->i', offset, offset) < radius * radius]


def to_scan_frame(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points into the sensor frame of `pose` (float32)."""
    rotation, translation = pose[:3, :3], pose[:3, 3]
    local = np.einsum('ij,jk->ik', points.astype(np.float64) - translation, rotation)
    return local.astype(np.float32)


def random_linear_map(rng: np.random.Generator) -> np.ndarray:
    """3x3 matrix A of the joint augmentation, applied as points @ A (reference order: yaw,
    tilt, scale, flip)."""
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    yaw = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])
    ax, ay, az = np.clip(0.06 * rng.standard_normal(3), -0.18, 0.18)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    scale = rng.uniform(0.95, 1.05)
    flip = np.diag([1.0, -1.0 if rng.uniform() < 0.5 else 1.0, 1.0])
    return yaw @ (rz @ ry @ rx) * scale @ flip


def fixed_size(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly `count` points: a random permutation, tiled when there are fewer points."""
    order = rng.permutation(len(points))
    return np.ascontiguousarray(points[order[np.arange(count) % len(points)]])


def split_sequences(root: str | os.PathLike, split: str | Sequence[str]) -> list[Path]:
    """The sequence folders of a split ('train' / 'val') or of a list of sequence names."""
    if isinstance(split, str):
        if split not in SPLITS:
            raise UserError(f'unknown split {split!r}: use {" / ".join(SPLITS)} or a list of '
                            'sequence names')
        split = SPLITS[split]
    return find_sequences(root, split)


class CompletionDataset(torch.utils.data.Dataset):
    """(scan, ground truth) pairs of the scans of some sequences, see the module docstring.

    Frames are read through the random-access reader interface
    (:class:`~distdpo_training.data.frames.IndexedFrameSource`); the sequences are
    SemanticKITTI-layout folders, where `build-maps` keeps their ground-truth maps.

    `split` is 'train' / 'val' (the SemanticKITTI splits) or a list of sequence names. Maps are
    loaded on first use per sequence; call :meth:`preload` before forking DataLoader workers to
    share one copy between them. :meth:`set_epoch` changes the augmentation draws per epoch.
    """

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str], config: ModelConfig,
                 *, augment: bool = False, seed: int = 0, stride: int = 1) -> None:
        if stride < 1:
            raise UserError(f'stride must be >= 1, got {stride}')
        self.config, self.augment, self.seed, self.epoch = config, augment, seed, 0
        self.sequences = [KittiSequence(p) for p in split_sequences(root, split)]
        for seq in self.sequences:
            if not seq.map_path.is_file():
                raise UserError(f'{seq.map_path}: ground-truth map is missing; run '
                                f'`distdpo build-maps {root}` first')
        self.items = [(s, i) for s, seq in enumerate(self.sequences)
                      for i in range(0, len(seq), stride)]
        self._maps: dict[int, MapIndex] = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def preload(self) -> CompletionDataset:
        for s in range(len(self.sequences)):
            self.map_index(s)
        return self

    def map_index(self, s: int) -> MapIndex:
        if s not in self._maps:
            self._maps[s] = MapIndex(load_map(self.sequences[s].path))
        return self._maps[s]

    def __getitem__(self, item: int) -> dict:
        s, i = self.items[item]
        seq, config = self.sequences[s], self.config
        rng = np.random.default_rng((self.seed, self.epoch, item))
        frame = seq[i]
        name = frame.origin or f'{seq.name} frame {frame.index}'
        points = frame.points if frame.labels is None else frame.points[static_mask(frame.labels)]
        scan = valid_points(points, config, name)
        pose = frame.pose
        gt = to_scan_frame(self.map_index(s).within(pose[:3, 3], config.max_range), pose)
        gt = gt[gt[:, 2] > config.min_z]
        if self.augment:
            linear = random_linear_map(rng).astype(np.float32)
            scan, gt = (np.einsum('ij,jk->ik', cloud, linear) for cloud in (scan, gt))
        gt = gt[viewpoint_mask(gt, scan)]
        if len(gt) == 0:
            raise UserError(f'{name}: no map point within {config.max_range} m in the cells '
                            'the scan sees; was the map built from these poses?')
        item = {'scan': subsample_scan(scan, config.scan_points),
                'gt': fixed_size(gt, config.full_points, rng),
                'sequence': seq.name, 'frame': frame.index}
        if not self.augment:  # validation: the scan's points in range, for the input baselines
            item['raw'] = scan
        return item


def collate(items: list[dict]) -> dict:
    """Stack items: scan (B, scan_points, 3), gt (B, full_points, 3), sequence names, frames."""
    return {'scan': torch.from_numpy(np.stack([it['scan'] for it in items])),
            'gt': torch.from_numpy(np.stack([it['gt'] for it in items])),
            'sequence': [it['sequence'] for it in items],
            'frame': torch.tensor([it['frame'] for it in items], dtype=torch.int64)}


def evaluation_ground_truth(sequence: KittiSequence, i: int, map_index: MapIndex,
                            max_range: float = 50.0,
                            z_window: tuple[float, float] = EVAL_Z_WINDOW) -> np.ndarray:
    """The evaluation GT of scan i (reference §5): map points within `max_range` (3-D) of the
    sensor, in the scan frame, z inside `z_window` (open), in the 10 m cells of the raw scan's
    points within `max_range` (no label, height or minimum-range filter on the scan)."""
    pose = sequence.poses[i]
    gt = to_scan_frame(map_index.within(pose[:3, 3], max_range), pose)
    gt = gt[(gt[:, 2] > z_window[0]) & (gt[:, 2] < z_window[1])]
    raw = sequence.scan(i)[:, :3]
    raw = raw[np.einsum('ij,ij->i', raw, raw) < max_range * max_range]
    return np.ascontiguousarray(gt[viewpoint_mask(gt, raw)])

