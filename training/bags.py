"""rosbag2 <-> frames with the `rosbags` package (no ROS installation needed).

Writing (:func:`write_sequence_bag`, used by `kitti2bag` and `simulate --bag`): one
sensor_msgs/PointCloud2 per frame on `/velodyne_points` (frame `velodyne`; fields x, y, z,
intensity float32, then the frame's extra fields such as ring uint16 and time float32, packed like
the Velodyne driver, then `label` uint32 when the frame has labels) and a tf2_msgs/TFMessage on
`/tf` with the pose world -> velodyne at the same stamp, written just before the cloud.

Reading (:class:`BagFrames`, used by `bag2kitti`): rosbag2 (MCAP or sqlite3) or ROS 1 bags, any
PointCloud2 field layout; the pose of each cloud comes from the TF tree (/tf and /tf_static,
chains such as odom -> base_link -> velodyne, interpolated between samples like tf2 does, never
extrapolated) or from a nav_msgs/Odometry topic. Clouds without a pose are skipped and reported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros.errors import UserError
from distdpo_ros.pointcloud import CloudError, cloud_to_arrays, field_names, make_cloud
from distdpo_training.kitti import Frame

STORAGES = ('mcap', 'sqlite3')
CLOUD_TYPE = 'sensor_msgs/msg/PointCloud2'
TF_TYPE = 'tf2_msgs/msg/TFMessage'
ODOM_TYPE = 'nav_msgs/msg/Odometry'
INTENSITY_NAMES = ('intensity', 'i', 'remission', 'reflectivity')  # first one present is used
LABEL_FIELD = 'label'


def _typestore() -> Any:
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _qos(depth: int, transient_local: bool = False) -> Any:
    """A reliable QoS profile to record as `offered` (what `ros2 bag play` re-offers)."""
    from rosbags.interfaces import (
        Qos,
        QosDurability,
        QosHistory,
        QosLiveliness,
        QosReliability,
        QosTime,
    )

    infinite = QosTime(sec=0x7FFFFFFF, nsec=0xFFFFFFFF)
    return Qos(history=QosHistory.KEEP_LAST, depth=depth, reliability=QosReliability.RELIABLE,
               durability=(QosDurability.TRANSIENT_LOCAL if transient_local
                           else QosDurability.VOLATILE),
               deadline=infinite, lifespan=infinite, liveliness=QosLiveliness.AUTOMATIC,
               liveliness_lease_duration=infinite, avoid_ros_namespace_conventions=False)


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_sequence_bag(out_path: str | os.PathLike, frames: Iterable[Frame],
                       storage: str = 'mcap', topic: str = '/velodyne_points',
                       frame_id: str = 'velodyne', world_frame: str = 'odom',
                       with_labels: bool = True,
                       progress: Callable[[int], object] | None = None) -> int:
    """Write frames as a rosbag2 folder at `out_path` (which must not exist); return the count.

    Each frame becomes a TFMessage (world_frame -> frame_id, the frame's pose) and a PointCloud2
    stamped `frame.stamp_ns`: x, y, z, intensity from `frame.points`, then `frame.extra` in its
    order (e.g. ring uint16 and time float32 for a Velodyne-like cloud), then `label` (uint32)
    when `with_labels` and the frame has labels. The bag appears at `out_path` only when complete.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    if storage not in STORAGES:
        raise UserError(f'unknown bag storage {storage!r}; choose one of {", ".join(STORAGES)}')
    out_path = Path(out_path)
    if out_path.exists():
        raise UserError(f'{out_path}: already exists; choose a new bag path')
    out_path.parent.mkdir(parents=True, exist_ok=True)
    store = _typestore()
    types = store.types
    cloud_type, field_type = types[CLOUD_TYPE], types['sensor_msgs/msg/PointField']
    header_type, time_type = types['std_msgs/msg/Header'], types['builtin_interfaces/msg/Time']
    tf_type, stamped_type = types[TF_TYPE], types['geometry_msgs/msg/TransformStamped']
    transform_type = types['geometry_msgs/msg/Transform']
    vector_type, quaternion_type = types['geometry_msgs/msg/Vector3'], types[
        'geometry_msgs/msg/Quaternion']

    staging = Path(tempfile.mkdtemp(prefix=f'.{out_path.name}.', dir=out_path.parent))
    count = 0
    try:
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        with Writer(staging / out_path.name, version=9, storage_plugin=plugin) as writer:
            tf_conn = writer.add_connection('/tf', TF_TYPE, typestore=store,
                                            offered_qos_profiles=[_qos(100)])
            cloud_conn = writer.add_connection(topic, CLOUD_TYPE, typestore=store,
                                               offered_qos_profiles=[_qos(10)])
            for frame in frames:
                stamp = time_type(sec=frame.stamp_ns // 1_000_000_000,
                                  nanosec=frame.stamp_ns % 1_000_000_000)
                translation, quat = matrix_to_transform(np.asarray(frame.pose, np.float64))
                tf = tf_type(transforms=[stamped_type(
                    header=header_type(stamp=stamp, frame_id=world_frame),
                    child_frame_id=frame_id,
                    transform=transform_type(
                        translation=vector_type(x=translation[0], y=translation[1],
                                                z=translation[2]),
                        rotation=quaternion_type(x=quat[0], y=quat[1], z=quat[2], w=quat[3])))])
                writer.write(tf_conn, frame.stamp_ns, store.serialize_cdr(tf, TF_TYPE))
                extra = {'intensity': frame.points[:, 3], **frame.extra}
                if with_labels and frame.labels is not None:
                    extra[LABEL_FIELD] = np.asarray(frame.labels, dtype=np.uint32)
                cloud = make_cloud(frame.points[:, :3], header_type(stamp=stamp,
                                                                    frame_id=frame_id),
                                   extra, cloud_type=cloud_type, field_type=field_type)
                writer.write(cloud_conn, frame.stamp_ns, store.serialize_cdr(cloud, CLOUD_TYPE))
                count += 1
                if progress is not None:
                    progress(1)
        os.replace(staging / out_path.name, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return count


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

@dataclass
class Skipped:
    """A cloud that did not become a frame."""

    index: int
    stamp_ns: int
    reason: str


class BagFrames:
    """The clouds of one topic of a bag as frames with poses (a FrameSource).

    `world_frame=None` takes the root of the cloud frame's TF tree. With `origin='first'` poses
    are re-anchored so that the first frame is the identity (the KITTI convention, and it keeps
    maps of UTM-scale coordinates accurate in float32); `origin='world'` keeps them as recorded.
    Clouds without a pose or without readable points are skipped and listed in `skipped`.
    """

    def __init__(self, bag_path: str | os.PathLike, topic: str = '/velodyne_points',
                 odom_topic: str | None = None, world_frame: str | None = None,
                 origin: str = 'first') -> None:
        self.path = Path(bag_path)
        self.name = self.path.name
        self.topic, self.odom_topic, self.world_frame = topic, odom_topic, world_frame
        if origin not in ('first', 'world'):
            raise UserError(f'origin must be "first" or "world", got {origin!r}')
        self.origin = origin
        self.skipped: list[Skipped] = []
        self.notes: list[str] = []
        if not self.path.exists():
            raise UserError(f'{self.path}: bag does not exist')
        with self._open() as reader:
            topics = {c.topic: c.msgtype for c in reader.connections}
            clouds = sorted(t for t, m in topics.items() if m == CLOUD_TYPE)
            if topics.get(topic) != CLOUD_TYPE:
                raise UserError(f'{self.path}: no PointCloud2 topic {topic!r} (PointCloud2 '
                                f'topics: {", ".join(clouds) or "none"})')
            if odom_topic is not None and topics.get(odom_topic) != ODOM_TYPE:
                odoms = sorted(t for t, m in topics.items() if m == ODOM_TYPE)
                raise UserError(f'{self.path}: no nav_msgs/Odometry topic {odom_topic!r} '
                                f'(Odometry topics: {", ".join(odoms) or "none"})')
            self._count = sum(c.msgcount for c in reader.connections if c.topic == topic)
            self.tf = self._read_transforms(reader)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        from rosbags.highlevel import AnyReader

        try:
            reader = AnyReader([self.path], default_typestore=_typestore())
            reader.open()
        except Exception as exc:  # rosbags raises several unrelated types for unreadable bags
            raise UserError(f'{self.path}: cannot open bag ({exc})') from None
        try:
            yield reader
        finally:
            reader.close()

    def _read_transforms(self, reader: Any) -> TfBuffer:
        tf = TfBuffer()
        odom_children: set[str] = set()
        wanted = [c for c in reader.connections
                  if (c.msgtype == TF_TYPE and c.topic in ('/tf', '/tf_static'))
                  or (c.topic == self.odom_topic)]
        odom_msgs = []
        for conn, _, raw in reader.messages(connections=wanted):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.msgtype == ODOM_TYPE:
                odom_msgs.append(msg)
                continue
            for t in msg.transforms:
                tr, q = t.transform.translation, t.transform.rotation
                tf.add(t.header.frame_id, t.child_frame_id, _stamp_ns(t.header),
                       (tr.x, tr.y, tr.z), (q.x, q.y, q.z, q.w), static=conn.topic == '/tf_static')
        for msg in odom_msgs:  # added last: odometry overrides /tf for the same child frame
            child = msg.child_frame_id.lstrip('/')
            if child not in odom_children:
                tf.remove(child)
                odom_children.add(child)
            p, q = msg.pose.pose.position, msg.pose.pose.orientation
            tf.add(msg.header.frame_id, child, _stamp_ns(msg.header), (p.x, p.y, p.z),
                   (q.x, q.y, q.z, q.w))
        self._odom_children = odom_children
        return tf

    def __len__(self) -> int:
        return self._count

    def pose(self, cloud_frame: str, stamp_ns: int) -> np.ndarray:
        """Pose of the sensor frame in the world frame at a time; raises NoPose."""
        source = cloud_frame.lstrip('/')
        if not source:
            raise NoPose('the cloud has an empty frame_id')
        if source not in self.tf.frames() and len(self._odom_children) == 1:
            # Odometry of the sensor itself published under another name (e.g. base_link).
            (child,) = self._odom_children
            note = (f'no TF connects {child!r} to the cloud frame {source!r}: the odometry '
                    'pose is taken as the sensor pose')
            if note not in self.notes:
                self.notes.append(note)
            source = child
        target = self.world_frame or self.tf.root(source)
        return self.tf.lookup(target, source, stamp_ns)

    def __iter__(self) -> Iterator[Frame]:
        anchor: np.ndarray | None = None
        with self._open() as reader:
            conns = [c for c in reader.connections if c.topic == self.topic]
            for index, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
                msg = reader.deserialize(raw, conn.msgtype)
                stamp = _stamp_ns(msg.header)
                try:
                    pose = self.pose(msg.header.frame_id, stamp)
                    names = field_names(msg)
                    extra = [n for n in INTENSITY_NAMES if n in names][:1]
                    extra += [LABEL_FIELD] if LABEL_FIELD in names else []
                    xyz, values = cloud_to_arrays(msg, extra)
                except (NoPose, CloudError) as exc:
                    self.skipped.append(Skipped(index, stamp, str(exc)))
                    continue
                intensity = (values[extra[0]].astype(np.float32).reshape(len(xyz), -1)[:, 0]
                             if extra and extra[0] != LABEL_FIELD
                             else np.zeros(len(xyz), np.float32))
                points = np.empty((len(xyz), 4), dtype=np.float32)
                points[:, :3], points[:, 3] = xyz, intensity
                labels = values.get(LABEL_FIELD)
                if self.origin == 'first':
                    if anchor is None:
                        anchor, pose = np.linalg.inv(pose), np.eye(4)
                    else:
                        pose = anchor @ pose
                yield Frame(index=index, stamp_ns=stamp, points=points, pose=pose,
                            labels=None if labels is None else labels.astype(np.uint32))
