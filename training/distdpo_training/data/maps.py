"""Per-sequence static ground-truth maps (reference §1.2), built in minutes instead of hours.

The map keeps, for every 0.1 m voxel (floor quantisation of world coordinates), the first static
point that fell into it in scan order: static = labelled and not moving (1 < class < 252), and
farther than 3.5 m from the sensor on x, y, z. LiDiff appends each scan to the map and re-quantises
the whole map after every scan (2-6 h per sequence). Here voxels are int64 keys (three 21-bit
indices), a chunk of scans is de-duplicated at once with one sort, and the de-duplicated chunks
are merged like a binary counter (a part is merged into the one before it when it has grown as
large), so every point is sorted O(log n) times. Keeping the first point per voxel makes the
result identical to the reference loop with a first-point rule (:func:`build_map_reference_loop`).

Output: SS/map_clean.npy, float32 (P, 3) in the world frame of the poses, plus SS/map_clean.json
recording the settings and the input files, so that a later run skips maps that are up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distdpo_ros.atomic import atomic_writer
from distdpo_ros.errors import UserError
from distdpo_training.data.frames import static_mask
from distdpo_training.data.kitti import MAP_FILE, KittiSequence

MAP_INFO = 'map_clean.json'
MAP_FORMAT = 1
_BITS = 21
_HALF = 1 << (_BITS - 1)  # voxel indices must lie in [-_HALF, _HALF)


def voxel_index(xyz: np.ndarray, voxel: float, what: str = 'points') -> np.ndarray:
    """(N, 3) int64 voxel floor(p / voxel) of every point, checked to fit the 21-bit keys."""
    index = np.floor(np.asarray(xyz, dtype=np.float64) / voxel).astype(np.int64)
    if index.size and (index.min() < -_HALF or index.max() >= _HALF):
        raise UserError(f'{what}: points lie beyond {_HALF * voxel / 1000:.0f} km of the origin '
                        'at this voxel size (poses in UTM? re-anchor them at the first frame)')
    return index


def pack_index(index: np.ndarray) -> np.ndarray:
    """int64 key of (N, 3) voxel indices; keys order voxels like (x, y, z) lexicographically."""
    shifted = index + _HALF
    return (shifted[:, 0] << (2 * _BITS)) | (shifted[:, 1] << _BITS) | shifted[:, 2]


def voxel_keys(xyz: np.ndarray, voxel: float, what: str = 'points') -> np.ndarray:
    """int64 key of the voxel floor(p / voxel) of every point; equal keys = same voxel."""
    return pack_index(voxel_index(xyz, voxel, what))


def first_per_voxel(index: np.ndarray) -> np.ndarray:
    """Indices of the first point of each distinct voxel of (N, 3) indices, in key order.

    When the chunk's extent and size fit in 63 bits, the voxel (relative to the chunk's corner)
    and the point number share one integer and a plain sort does the work (twice as fast as an
    argsort); otherwise argsort and the smallest point number per voxel.
    """
    n = len(index)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    low = index.min(axis=0)
    bits = [int(v).bit_length() for v in index.max(axis=0) - low]
    count_bits = (n - 1).bit_length()
    if sum(bits) + count_bits > 63:
        keys = pack_index(index)
        order = np.argsort(keys)
        ordered = keys[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        return np.minimum.reduceat(order, starts)
    local = index[:, 0] - low[0]
    local <<= bits[1]
    local |= index[:, 1] - low[1]
    local <<= bits[2]
    local |= index[:, 2] - low[2]
    local <<= count_bits
    local |= np.arange(n, dtype=np.int64)
    local.sort()
    voxels = local >> count_bits
    starts = np.flatnonzero(np.concatenate(([True], voxels[1:] != voxels[:-1])))
    return local[starts] & ((1 << count_bits) - 1)


@dataclass
class _Part:
    keys: np.ndarray  # sorted, unique
    points: np.ndarray  # (len(keys), 3) float32, the first point of each voxel


def _merge(older: _Part, newer: _Part) -> _Part:
    """Union of two parts; a voxel in both keeps the older part's point."""
    pos = np.searchsorted(older.keys, newer.keys)
    found = older.keys[np.minimum(pos, len(older.keys) - 1)] == newer.keys
    keys = np.concatenate((older.keys, newer.keys[~found]))
    points = np.concatenate((older.points, newer.points[~found]))
    order = np.argsort(keys, kind='stable')  # two sorted runs: linear time
    return _Part(keys[order], points[order])


class VoxelMap:
    """Accumulates point chunks in order, keeping the first point per voxel."""

    def __init__(self, voxel: float) -> None:
        self.voxel = voxel
        self._parts: list[_Part] = []

    def add(self, points: np.ndarray, index: np.ndarray | None = None,
            what: str = 'points') -> None:
        """Add (N, 3) world points that come after everything added so far (with their
        :func:`voxel_index` when the caller has it)."""
        if index is None:
            index = voxel_index(points, self.voxel, what)
        first = first_per_voxel(index)
        self._parts.append(_Part(pack_index(index[first]),
                                 np.asarray(points, dtype=np.float32)[first]))
        while len(self._parts) > 1 and len(self._parts[-2].keys) <= 2 * len(self._parts[-1].keys):
            newer = self._parts.pop()
            self._parts[-1] = _merge(self._parts[-1], newer)

    def points(self) -> np.ndarray:
        """(P, 3) float32 map points in voxel-key order."""
        while len(self._parts) > 1:
            newer = self._parts.pop()
            self._parts[-1] = _merge(self._parts[-1], newer)
        return self._parts[0].points if self._parts else np.zeros((0, 3), dtype=np.float32)


def static_world_points(sequence: KittiSequence, i: int, min_range: float = 3.5) -> np.ndarray:
    """(M, 3) float64 world coordinates of the static points of scan i beyond `min_range`.

    Without a labels folder every point counts as static (moving objects then smear the map).
    """
    points = sequence.scan(i)
    xyz = points[:, :3]
    keep = np.einsum('ij,ij->i', xyz, xyz) > min_range * min_range  # range on x, y, z only
    labels = sequence.labels(i, len(points))
    if labels is not None:
        keep &= static_mask(labels)
    pose = sequence.poses[i]
    # einsum, not @: a BLAS call for an (N, 3) x (3, 3) product is 10x slower on a busy machine
    return np.einsum('ij,kj->ik', xyz[keep].astype(np.float64), pose[:3, :3]) + pose[:3, 3]


def build_map(sequence: KittiSequence, voxel: float = 0.1, min_range: float = 3.5,
              chunk_points: int = 2_000_000,
              progress: Callable[[int], object] | None = None,
              scans: int | None = None) -> np.ndarray:
    """The static map of a sequence (of its first `scans` scans), (P, 3) float32;
    `progress(1)` is called after each scan."""
    voxel_map = VoxelMap(voxel)
    points: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    size = 0
    count = len(sequence) if scans is None else min(scans, len(sequence))
    for i in range(count):
        world = static_world_points(sequence, i, min_range)
        indices.append(voxel_index(world, voxel, str(sequence.scan_paths[i])))
        points.append(world.astype(np.float32))
        size += len(world)
        if size >= chunk_points or i == count - 1:
            voxel_map.add(np.concatenate(points), np.concatenate(indices))
            points, indices, size = [], [], 0
        if progress is not None:
            progress(1)
    return voxel_map.points()


def build_map_reference_loop(sequence: KittiSequence, voxel: float = 0.1,
                             min_range: float = 3.5, scans: int | None = None) -> np.ndarray:
    """LiDiff's loop re-implemented plainly: append each scan, then re-quantise the whole map.

    For benchmarks and tests only (quadratic in the number of scans). With the first-point rule
    it yields exactly :func:`build_map` (same points, same order).
    """
    world = np.zeros((0, 3), dtype=np.float64)
    for i in range(len(sequence) if scans is None else min(scans, len(sequence))):
        world = np.concatenate((world, static_world_points(sequence, i, min_range)))
        index = np.floor(world / voxel)
        _, first = np.unique(index, axis=0, return_index=True)
        world = world[np.sort(first)]
    keys = voxel_keys(world, voxel)
    return world[np.argsort(keys)].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Files: map + sidecar, up-to-date check, loading
# --------------------------------------------------------------------------------------------

def _settings(sequence: KittiSequence, voxel: float, min_range: float) -> dict:
    digest = hashlib.sha256(json.dumps(sequence.fingerprint()).encode()).hexdigest()
    return {'format': MAP_FORMAT, 'voxel': voxel, 'min_range': min_range,
            'scans': len(sequence), 'labels': sequence.has_labels, 'inputs_sha256': digest}


def map_is_current(sequence: KittiSequence, voxel: float = 0.1, min_range: float = 3.5) -> bool:
    """Whether map_clean.npy exists and was built by us from these files with these settings."""
    info_path = sequence.path / MAP_INFO
    if not (sequence.map_path.is_file() and info_path.is_file()):
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return False
    recorded = {k: info.get(k) for k in ('format', 'voxel', 'min_range', 'scans', 'labels',
                                         'inputs_sha256')}
    return recorded == _settings(sequence, voxel, min_range) and info.get(
        'map_bytes') == sequence.map_path.stat().st_size


def save_map(sequence: KittiSequence, points: np.ndarray, voxel: float,
             min_range: float) -> None:
    """Write map_clean.npy, then the sidecar that marks it complete (both atomically)."""
    (sequence.path / MAP_INFO).unlink(missing_ok=True)
    with atomic_writer(sequence.map_path) as handle:
        np.save(handle, np.ascontiguousarray(points, dtype=np.float32))
    info = _settings(sequence, voxel, min_range)
    info.update(points=len(points), map_bytes=sequence.map_path.stat().st_size)
    with atomic_writer(sequence.path / MAP_INFO) as handle:
        handle.write((json.dumps(info, indent=2) + '\n').encode())


def load_map(sequence_dir: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """(P, 3) float32 map of a sequence folder; a clear error when it has not been built."""
    path = Path(sequence_dir) / MAP_FILE
    if not path.is_file():
        raise UserError(f'{path}: ground-truth map is missing; run `distdpo build-maps '
                        f'{Path(sequence_dir).parent}` first')
    try:
        points = np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        message = f'{path}: unreadable map ({exc}); rebuild it with distdpo build-maps'
        raise UserError(message) from None
    if points.ndim != 2 or points.shape[1] != 3:
        raise UserError(f'{path}: map must be (P, 3), got {points.shape}')
    return points.astype(np.float32, copy=False)
