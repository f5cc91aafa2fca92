"""Poses from ROS transforms: 4x4 matrices <-> translation + quaternion, and a small TF buffer.

:class:`TfBuffer` holds the /tf and /tf_static (or odometry) samples of a bag and answers
`lookup(target, source, stamp)` like tf2 does: chains of frames, interpolation between the two
samples around the stamp (linear translation, spherical rotation), never extrapolation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def matrix_to_transform(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(translation (3,), quaternion (4,) x, y, z, w) of a 4x4 pose."""
    from scipy.spatial.transform import Rotation

    return pose[:3, 3].copy(), Rotation.from_matrix(pose[:3, :3]).as_quat()


def transform_to_matrix(translation: np.ndarray, quaternion: np.ndarray) -> np.ndarray:
    """4x4 pose of a translation and an x, y, z, w quaternion (normalised here)."""
    from scipy.spatial.transform import Rotation

    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_quat(quaternion).as_matrix()
    pose[:3, 3] = translation
    return pose


@dataclass
class _Edge:
    parent: str
    static: bool
    stamps: list[int] = field(default_factory=list)
    translations: list[np.ndarray] = field(default_factory=list)
    quaternions: list[np.ndarray] = field(default_factory=list)


class NoPose(LookupError):
    """No transform for a frame at a time; the text says why."""


class TfBuffer:
    """Transforms of a whole bag, looked up like tf2: a chain of parent edges, each sampled in
    time; between two samples translation is linear and rotation spherical-linear, an exact
    stamp returns the sample itself, outside the samples there is no transform."""

    def __init__(self) -> None:
        self._edges: dict[str, _Edge] = {}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(self, parent: str, child: str, stamp_ns: int, translation: np.ndarray,
            quaternion: np.ndarray, static: bool = False) -> None:
        parent, child = parent.lstrip('/'), child.lstrip('/')
        values = np.concatenate((np.asarray(translation, float), np.asarray(quaternion, float)))
        if not np.isfinite(values).all() or np.linalg.norm(values[3:]) < 1e-9:
            return  # a broken sample (NaN, zero quaternion) is no transform at all
        edge = self._edges.get(child)
        if edge is None or edge.parent != parent or edge.static != static:
            edge = self._edges[child] = _Edge(parent, static)  # the latest definition wins
        if static:
            edge.stamps, edge.translations, edge.quaternions = [], [], []
        edge.stamps.append(stamp_ns)
        edge.translations.append(np.asarray(translation, dtype=np.float64))
        edge.quaternions.append(np.asarray(quaternion, dtype=np.float64))
        self._arrays.pop(child, None)

    def remove(self, child: str) -> None:
        """Forget the edge that ends in `child` (before another source redefines it)."""
        self._edges.pop(child.lstrip('/'), None)
        self._arrays.pop(child.lstrip('/'), None)

    def frames(self) -> set[str]:
        return set(self._edges) | {e.parent for e in self._edges.values()}

    def root(self, frame: str) -> str:
        frame = frame.lstrip('/')
        seen = {frame}
        while frame in self._edges:
            frame = self._edges[frame].parent
            if frame in seen:
                raise NoPose(f'the TF tree has a loop through {frame!r}')
            seen.add(frame)
        return frame

    def _sample(self, child: str, stamp_ns: int) -> np.ndarray:
        edge = self._edges[child]
        if edge.static:
            return transform_to_matrix(edge.translations[0], edge.quaternions[0])
        if child not in self._arrays:
            order = np.argsort(edge.stamps, kind='stable')
            self._arrays[child] = (np.asarray(edge.stamps, dtype=np.int64)[order],
                                   np.asarray(edge.translations)[order],
                                   np.asarray(edge.quaternions)[order])
        stamps, translations, quaternions = self._arrays[child]
        i = int(np.searchsorted(stamps, stamp_ns))
        if i < len(stamps) and stamps[i] == stamp_ns:
            return transform_to_matrix(translations[i], quaternions[i])
        if i == 0 or i == len(stamps):
            raise NoPose(f'{edge.parent} -> {child} is known from {stamps[0] / 1e9:.3f} s to '
                         f'{stamps[-1] / 1e9:.3f} s only')
        from scipy.spatial.transform import Rotation, Slerp

        t0, t1 = stamps[i - 1], stamps[i]
        w = (stamp_ns - t0) / (t1 - t0)
        rotation = Slerp([0.0, 1.0], Rotation.from_quat(quaternions[i - 1:i + 1]))([w])[0]
        pose = np.eye(4)
        pose[:3, :3] = rotation.as_matrix()
        pose[:3, 3] = (1 - w) * translations[i - 1] + w * translations[i]
        return pose

    def lookup(self, target: str, source: str, stamp_ns: int) -> np.ndarray:
        """4x4 pose of `source` in `target` (maps source coordinates to target) at a time."""
        target, source = target.lstrip('/'), source.lstrip('/')

        def to_root(frame: str) -> tuple[str, np.ndarray | None]:
            pose = None
            while frame in self._edges:
                step = self._sample(frame, stamp_ns)
                pose = step if pose is None else step @ pose
                frame = self._edges[frame].parent
            return frame, pose

        if source == target:
            return np.eye(4)
        if source not in self.frames():
            raise NoPose(f'frame {source!r} is not in the TF tree')
        root_s, pose_s = to_root(source)
        root_t, pose_t = to_root(target)
        if root_s != root_t:
            raise NoPose(f'frames {source!r} and {target!r} are not connected by TF')
        if pose_t is None:  # target is the root: the chain itself, untouched
            return pose_s if pose_s is not None else np.eye(4)
        return np.linalg.inv(pose_t) @ (pose_s if pose_s is not None else np.eye(4))
