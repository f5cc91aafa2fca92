"""SemanticKITTI sequences: read them and write them.

Layout of one sequence folder (SemanticKITTI / KITTI odometry)::

    SS/velodyne/NNNNNN.bin    float32 rows (x, y, z, remission)
    SS/labels/NNNNNN.label    uint32 per point; semantic class = label & 0xFFFF (optional)
    SS/poses.txt              one 3x4 row-major pose per frame, camera-0 frame; line i = frame i
    SS/calib.txt              `Tr:` velodyne -> camera 0 (3x4); P0..P3 are kept but unused
    SS/times.txt              seconds per frame; line i = frame i (optional)

Frames are addressed by the number in their file name, so a subset of a sequence (a few .bin files
next to the poses of every frame) reads correctly. Poses are returned in the LiDAR frame,
T_velo = inv(Tr) @ P_cam @ Tr, as LiDiff's `load_poses` does; the writer stores the inverse
conversion, so writer and reader agree.

:class:`KittiSequence` is the random-access :class:`~.frames.FrameSource` (see :mod:`.frames` for
the interface every format implements); :func:`write_sequence` writes any frames in this layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from distdpo_ros.atomic import write_bytes_atomic
from distdpo_ros.errors import UserError
from distdpo_training.data.frames import Frame

MAP_FILE = 'map_clean.npy'


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _read_array(path: Path, dtype: np.dtype, row: int, what: str) -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f'{path}: {what} file is missing') from None
    except OSError as exc:
        raise UserError(f'{path}: cannot read {what} file ({exc.strerror})') from None
    if len(data) % row:
        raise UserError(f'{path}: truncated {what} file ({len(data)} bytes is not a multiple of '
                        f'{row})')
    return np.frombuffer(data, dtype=dtype)


def read_scan(path: str | os.PathLike) -> np.ndarray:
    """(N, 4) float32 x, y, z, remission of a KITTI .bin file."""
    return _read_array(Path(path), np.dtype('<f4'), 16, 'scan').reshape(-1, 4)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """(N,) uint32 raw labels of a SemanticKITTI .label file (see :func:`semantic`)."""
    return _read_array(Path(path), np.dtype('<u4'), 4, 'label')


def _read_rows(path: Path, width: int, what: str) -> np.ndarray:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f'{path}: {what} file is missing') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f'{path}: cannot read {what} file ({exc})') from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            raise UserError(f'{path}:{number}: not a row of numbers: {line[:60]!r}') from None
        if len(values) != width:
            raise UserError(f'{path}:{number}: expected {width} numbers, found {len(values)}')
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, width)


def read_calib(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`name: 12 numbers` lines of a KITTI calib.txt as 4x4 matrices; `Tr` is required."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f'{path}: calibration file is missing') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f'{path}: cannot read calibration file ({exc})') from None
    calib: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(':')
        try:
            values = [float(v) for v in rest.split()]
        except ValueError:
            values = []
        if not sep or len(values) != 12:
            raise UserError(f'{path}:{number}: expected "NAME: 12 numbers", got {line[:60]!r}')
        calib[key.strip()] = _homogeneous(np.array(values).reshape(3, 4))
    if 'Tr' not in calib:
        raise UserError(f'{path}: no "Tr:" line (velodyne -> camera transform)')
    return calib


def _homogeneous(rows3x4: np.ndarray) -> np.ndarray:
    out = np.zeros(rows3x4.shape[:-2] + (4, 4))
    out[..., :3, :] = rows3x4
    out[..., 3, 3] = 1.0
    return out


def camera_to_lidar(poses_cam: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """KITTI camera-0 poses (F, 4, 4) to LiDAR-frame poses: inv(Tr) @ P @ Tr."""
    return np.linalg.inv(tr) @ poses_cam @ tr


def lidar_to_camera(poses: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """The inverse of :func:`camera_to_lidar`: Tr @ T @ inv(Tr)."""
    return tr @ poses @ np.linalg.inv(tr)


def read_poses(path: str | os.PathLike, tr: np.ndarray) -> np.ndarray:
    """(F, 4, 4) float64 LiDAR-frame poses of a KITTI poses.txt (camera frame, 3x4 rows)."""
    return camera_to_lidar(_homogeneous(_read_rows(Path(path), 12, 'poses').reshape(-1, 3, 4)),
                           tr)


def read_times(path: str | os.PathLike) -> np.ndarray:
    """(F,) float64 seconds of a KITTI times.txt."""
    return _read_rows(Path(path), 1, 'times')[:, 0]


def seconds_to_ns(seconds: float) -> int:
    return int(round(float(seconds) * 1e9))


# --------------------------------------------------------------------------------------------
# Reading a sequence
# --------------------------------------------------------------------------------------------

def _frame_files(folder: Path, suffix: str) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for path in folder.iterdir():
        if path.suffix != suffix or path.name.startswith('.'):
            continue
        if not path.stem.isdigit():
            raise UserError(f'{path}: file name is not a frame number (like 000042{suffix})')
        files[int(path.stem)] = path
    return files


class KittiSequence:
    """One SemanticKITTI sequence folder; `len()` and indexing go over its scans in frame order.

    Everything that can be checked without reading the scans is checked on construction: missing
    folders or files, poses.txt/times.txt too short for the highest frame number, a scan without
    its label file. Truncated scans and label files of the wrong length raise when read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = self.path.name
        velodyne = self.path / 'velodyne'
        if not velodyne.is_dir():
            raise UserError(f'{velodyne}: scan folder is missing (not a SemanticKITTI sequence)')
        scans = _frame_files(velodyne, '.bin')
        if not scans:
            raise UserError(f'{velodyne}: no .bin scans')
        self.frame_ids = np.array(sorted(scans), dtype=np.int64)
        self.scan_paths = [scans[i] for i in self.frame_ids]
        last = int(self.frame_ids[-1])

        self.calib = read_calib(self.path / 'calib.txt')
        poses = read_poses(self.path / 'poses.txt', self.calib['Tr'])
        if len(poses) <= last:
            raise UserError(f'{self.path / "poses.txt"}: {len(poses)} poses, but scan '
                            f'{self.scan_paths[-1].name} needs frame {last}')
        self.poses = poses[self.frame_ids]

        times_path = self.path / 'times.txt'
        if times_path.exists():
            times = read_times(times_path)
            if len(times) <= last:
                raise UserError(f'{times_path}: {len(times)} times, but scan '
                                f'{self.scan_paths[-1].name} needs frame {last}')
            self.stamps_ns = np.array([seconds_to_ns(t) for t in times[self.frame_ids]])
        else:  # KITTI records at 10 Hz
            self.stamps_ns = self.frame_ids * 100_000_000

        labels_dir = self.path / 'labels'
        self.label_paths: list[Path] | None = None
        if labels_dir.is_dir():
            labels = _frame_files(labels_dir, '.label')
            missing = [i for i in self.frame_ids if i not in labels]
            if missing:
                raise UserError(f'{labels_dir}: {len(missing)} of {len(self.frame_ids)} scans '
                                f'have no label file, first {missing[0]:06d}.label')
            self.label_paths = [labels[i] for i in self.frame_ids]

    @property
    def has_labels(self) -> bool:
        return self.label_paths is not None

    @property
    def map_path(self) -> Path:
        return self.path / MAP_FILE

    def __len__(self) -> int:
        return len(self.frame_ids)

    def scan(self, i: int) -> np.ndarray:
        """(N, 4) float32 points of the i-th scan (in frame order)."""
        return read_scan(self.scan_paths[i])

    def labels(self, i: int, n_points: int | None = None) -> np.ndarray | None:
        """(N,) uint32 raw labels of the i-th scan, None without a labels folder."""
        if self.label_paths is None:
            return None
        labels = read_labels(self.label_paths[i])
        if n_points is not None and len(labels) != n_points:
            raise UserError(f'{self.label_paths[i]}: {len(labels)} labels for '
                            f'{n_points} points in {self.scan_paths[i].name}')
        return labels

    def check_files(self) -> None:
        """Check every scan and label file by its size (no reading): truncated files and label
        counts that do not match the scan raise UserError before any long work starts."""
        label_paths = self.label_paths or [None] * len(self)
        for scan_path, label_path in zip(self.scan_paths, label_paths, strict=True):
            size = scan_path.stat().st_size
            if size % 16:
                raise UserError(f'{scan_path}: truncated scan file ({size} bytes is not a '
                                'multiple of 16)')
            if label_path is not None:
                labels = label_path.stat().st_size
                if labels % 4:
                    raise UserError(f'{label_path}: truncated label file ({labels} bytes is not '
                                    'a multiple of 4)')
                if labels // 4 != size // 16:
                    raise UserError(f'{label_path}: {labels // 4} labels for {size // 16} '
                                    f'points in {scan_path.name}')

    def __getitem__(self, i: int) -> Frame:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        points = self.scan(i)
        return Frame(index=int(self.frame_ids[i]), stamp_ns=int(self.stamps_ns[i]),
                     points=points, pose=self.poses[i], labels=self.labels(i, len(points)),
                     origin=str(self.scan_paths[i]))

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self[i]

    def fingerprint(self) -> list[list]:
        """(name, size, mtime) of every input file: tells whether derived files are stale."""
        files = [self.path / 'poses.txt', self.path / 'calib.txt', *self.scan_paths,
                 *(self.label_paths or [])]
        out = []
        for path in files:
            stat = path.stat()
            out.append([str(path.relative_to(self.path)), stat.st_size, stat.st_mtime_ns])
        return out


def find_sequences(root: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Sequence folders of a dataset: ROOT/sequences/SS, ROOT/dataset/sequences/SS, or ROOT
    itself when it is one sequence. `names` selects and orders them (e.g. ['00', '08'])."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f'{root}: dataset folder does not exist')
    if (root / 'velodyne').is_dir():
        found = {root.name: root}
    else:
        base = next((b for b in (root / 'sequences', root / 'dataset' / 'sequences', root)
                     if b.is_dir() and any((p / 'velodyne').is_dir() for p in b.iterdir())),
                    None)
        if base is None:
            raise UserError(f'{root}: no sequence folders (expected {root}/sequences/SS/velodyne)')
        found = {p.name: p for p in sorted(base.iterdir()) if (p / 'velodyne').is_dir()}
    if names is None:
        return list(found.values())
    names = list(names)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise UserError(f'{root}: no sequence {unknown[0]!r} (found: {", ".join(found)})')
    return [found[n] for n in names]


# --------------------------------------------------------------------------------------------
# Writing a sequence
# --------------------------------------------------------------------------------------------

def _format_row(values: Iterable[float]) -> str:
    return ' '.join(repr(float(v)) for v in values)  # shortest text that reads back exactly


class KittiWriter:
    """Write frames into a sequence folder: scans and labels as they come, then poses, times and
    calibration on :meth:`close`. Frames are numbered 0, 1, 2, ... in the order written.

    `tr` is the velodyne -> camera transform recorded in calib.txt (identity by default, so
    poses.txt holds the LiDAR poses themselves). Every file is written atomically. A folder that
    already holds scans is refused unless `overwrite`, which first deletes its scans and labels.
    """

    def __init__(self, path: str | os.PathLike, tr: np.ndarray | None = None,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        self.tr = np.eye(4) if tr is None else np.asarray(tr, dtype=np.float64)
        old = sorted((self.path / 'velodyne').glob('*.bin')) + sorted(
            (self.path / 'labels').glob('*.label'))
        if old and not overwrite:
            what = ('a sequence' if (self.path / 'poses.txt').is_file() else
                    f'{len(old)} scan file(s) of an interrupted write (no poses.txt)')
            raise UserError(f'{self.path}: already holds {what} ({old[0].name}, ...); choose an '
                            'empty folder, or pass --overwrite to replace its scans')
        for path_old in old:
            path_old.unlink()
        (self.path / MAP_FILE).unlink(missing_ok=True)  # derived from the old scans
        (self.path / 'velodyne').mkdir(parents=True, exist_ok=True)
        self._poses: list[np.ndarray] = []
        self._stamps: list[int] = []
        self._labels: bool | None = None

    def __len__(self) -> int:
        return len(self._poses)

    def write(self, frame: Frame) -> int:
        """Write one frame as the next frame number; return that number."""
        index = len(self._poses)
        points = np.ascontiguousarray(frame.points, dtype='<f4')
        if points.ndim != 2 or points.shape[1] != 4:
            raise ValueError(f'frame points must be (N, 4) float32, got {points.shape}')
        has_labels = frame.labels is not None
        if self._labels is None:
            self._labels = has_labels
            if has_labels:
                (self.path / 'labels').mkdir(exist_ok=True)
        elif self._labels != has_labels:
            raise ValueError('either every frame of a sequence has labels or none has')
        write_bytes_atomic(self.path / 'velodyne' / f'{index:06d}.bin', points.tobytes())
        if has_labels:
            labels = np.ascontiguousarray(frame.labels, dtype='<u4')
            if labels.shape != (len(points),):
                raise ValueError(f'{len(labels)} labels for {len(points)} points')
            write_bytes_atomic(self.path / 'labels' / f'{index:06d}.label', labels.tobytes())
        self._poses.append(np.asarray(frame.pose, dtype=np.float64))
        self._stamps.append(int(frame.stamp_ns))
        return index

    def close(self) -> None:
        """Write poses.txt (camera frame), times.txt and calib.txt."""
        poses = lidar_to_camera(np.array(self._poses).reshape(-1, 4, 4), self.tr)
        text = ''.join(_format_row(p[:3].ravel()) + '\n' for p in poses)
        write_bytes_atomic(self.path / 'poses.txt', text.encode())
        text = ''.join(repr(ns / 1e9) + '\n' for ns in self._stamps)
        write_bytes_atomic(self.path / 'times.txt', text.encode())
        projection = _format_row(np.eye(3, 4).ravel())  # no camera: identity projections
        lines = [f'P{i}: {projection}' for i in range(4)] + [
            f'Tr: {_format_row(self.tr[:3].ravel())}']
        write_bytes_atomic(self.path / 'calib.txt', ('\n'.join(lines) + '\n').encode())

    def __enter__(self) -> KittiWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_sequence(path: str | os.PathLike, frames: Iterable[Frame],
                   tr: np.ndarray | None = None, overwrite: bool = False) -> int:
    """Write all frames into a sequence folder; return how many were written."""
    with KittiWriter(path, tr, overwrite) as writer:
        for frame in frames:
            writer.write(frame)
    return len(writer)
