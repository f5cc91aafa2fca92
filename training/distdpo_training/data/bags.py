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

Raw access for replay (:class:`BagStream`, :class:`BagRecorder`): the clouds of a topic and the
TF messages as stored CDR bytes in bag order, and a recorder that writes raw messages from any
thread. Every bag is written into a hidden folder beside its path and moved there only when
complete (:class:`StagedBag`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros.errors import UserError
from distdpo_ros.pointcloud import CloudError, cloud_to_arrays, field_names, make_cloud
from distdpo_training.data.frames import Frame
from distdpo_training.data.transforms import NoPose, TfBuffer, matrix_to_transform

STORAGES = ('mcap', 'sqlite3')
CLOUD_TYPE = 'sensor_msgs/msg/PointCloud2'
TF_TYPE = 'tf2_msgs/msg/TFMessage'
ODOM_TYPE = 'nav_msgs/msg/Odometry'
INTENSITY_NAMES = ('intensity', 'i', 'remission', 'reflectivity')  # first one present is used
LABEL_FIELD = 'label'


TF_TOPICS = ('/tf', '/tf_static')


def typestore() -> Any:
    """The message definitions bags are read and written with (ROS 2 Kilted)."""
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


def stamp_ns(header: Any) -> int:
    """A std_msgs/Header's stamp in nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


@contextlib.contextmanager
def open_bag(path: Path, store: Any = None) -> Iterator[Any]:
    """An open rosbags AnyReader (rosbag2 or ROS 1); unreadable bags raise UserError."""
    from rosbags.highlevel import AnyReader

    if not path.exists():
        raise UserError(f'{path}: bag does not exist')
    try:
        reader = AnyReader([path], default_typestore=store or typestore())
        reader.open()
    except Exception as exc:  # rosbags raises several unrelated types for unreadable bags
        raise UserError(f'{path}: cannot open bag ({exc})') from None
    try:
        yield reader
    finally:
        reader.close()


def require_topic(reader: Any, path: Path, topic: str, msgtype: str, what: str) -> None:
    """Raise UserError unless the bag has `topic` of `msgtype`, listing the topics it has."""
    topics = {c.topic: c.msgtype for c in reader.connections}
    if topics.get(topic) != msgtype:
        have = sorted(t for t, m in topics.items() if m == msgtype)
        raise UserError(f'{path}: no {what} topic {topic!r} ({what} topics: '
                        f'{", ".join(have) or "none"})')


class StagedBag:
    """A new bag at `out`, written into a hidden folder beside it and moved there by commit().

    `out` must not exist; `storage` is 'mcap' or 'sqlite3'. Call :meth:`discard` in a `finally`
    (after a commit it only removes the empty staging folder).
    """

    def __init__(self, out: str | os.PathLike, storage: str) -> None:
        if storage not in STORAGES:
            raise UserError(f'unknown bag storage {storage!r}; choose one of '
                            f'{", ".join(STORAGES)}')
        self.out, self.storage = Path(out), storage
        if self.out.exists():
            raise UserError(f'{self.out}: already exists; choose a new bag path')
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix=f'.{self.out.name}.', dir=self.out.parent))

    def writer(self) -> Any:
        """A rosbags Writer on the staged bag (use it as a context manager)."""
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugin = StoragePlugin.MCAP if self.storage == 'mcap' else StoragePlugin.SQLITE3
        return Writer(self._staging / self.out.name, version=9, storage_plugin=plugin)

    def commit(self) -> Path:
        """Move the finished bag to `out`."""
        os.replace(self._staging / self.out.name, self.out)
        self.discard()
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


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
    staged = StagedBag(out_path, storage)
    store = typestore()
    types = store.types
    cloud_type, field_type = types[CLOUD_TYPE], types['sensor_msgs/msg/PointField']
    header_type, time_type = types['std_msgs/msg/Header'], types['builtin_interfaces/msg/Time']
    tf_type, stamped_type = types[TF_TYPE], types['geometry_msgs/msg/TransformStamped']
    transform_type = types['geometry_msgs/msg/Transform']
    vector_type, quaternion_type = types['geometry_msgs/msg/Vector3'], types[
        'geometry_msgs/msg/Quaternion']

    count = 0
    try:
        with staged.writer() as writer:
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
        staged.commit()
    finally:
        staged.discard()
    return count


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
        with open_bag(self.path) as reader:
            require_topic(reader, self.path, topic, CLOUD_TYPE, 'PointCloud2')
            if odom_topic is not None:
                require_topic(reader, self.path, odom_topic, ODOM_TYPE, 'nav_msgs/Odometry')
            self._count = sum(c.msgcount for c in reader.connections if c.topic == topic)
            self.tf = self._read_transforms(reader)

    def _read_transforms(self, reader: Any) -> TfBuffer:
        tf = TfBuffer()
        odom_children: set[str] = set()
        wanted = [c for c in reader.connections
                  if (c.msgtype == TF_TYPE and c.topic in TF_TOPICS)
                  or (c.topic == self.odom_topic)]
        odom_msgs = []
        if not wanted:  # rosbags reads every message for an empty connection list
            self._odom_children = odom_children
            return tf
        for conn, _, raw in reader.messages(connections=wanted):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.msgtype == ODOM_TYPE:
                odom_msgs.append(msg)
                continue
            for t in msg.transforms:
                tr, q = t.transform.translation, t.transform.rotation
                tf.add(t.header.frame_id, t.child_frame_id, stamp_ns(t.header),
                       (tr.x, tr.y, tr.z), (q.x, q.y, q.z, q.w), static=conn.topic == '/tf_static')
        for msg in odom_msgs:  # added last: odometry overrides /tf for the same child frame
            child = msg.child_frame_id.lstrip('/')
            if child not in odom_children:
                tf.remove(child)
                odom_children.add(child)
            p, q = msg.pose.pose.position, msg.pose.pose.orientation
            tf.add(msg.header.frame_id, child, stamp_ns(msg.header), (p.x, p.y, p.z),
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
        if not self.tf.frames():
            raise NoPose('the bag has no /tf or /tf_static transforms to take poses from; '
                         'give --odom-topic TOPIC if it has odometry')
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
        with open_bag(self.path) as reader:
            conns = [c for c in reader.connections if c.topic == self.topic]
            for index, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
                msg = reader.deserialize(raw, conn.msgtype)
                stamp = stamp_ns(msg.header)
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


# --------------------------------------------------------------------------------------------
# Raw messages (replay)
# --------------------------------------------------------------------------------------------

class BagStream:
    """The clouds of one topic (raw CDR, bag time, stamp) and the TF messages, in bag order."""

    def __init__(self, path: str | os.PathLike, topic: str) -> None:
        self.path, self.topic = Path(path), topic
        self.store = typestore()
        self._bag = open_bag(self.path, self.store)
        self.reader = self._bag.__enter__()
        try:
            require_topic(self.reader, self.path, topic, CLOUD_TYPE, 'PointCloud2')
        except UserError:
            self.close()
            raise
        self.clouds = [c for c in self.reader.connections if c.topic == topic]
        self.tf = [c for c in self.reader.connections if c.topic in TF_TOPICS]
        self.count = sum(c.msgcount for c in self.clouds)

    def messages(self) -> Iterator[tuple[Any, int, bytes, int | None]]:
        """(connection, bag time ns, CDR bytes, header stamp ns for clouds else None)."""
        for conn, bag_ns, raw in self.reader.messages(connections=self.clouds + self.tf):
            raw = bytes(raw)
            if not self.reader.is2:  # ROS 1 bag: its own serialisation
                raw = self.store.ros1_to_cdr(raw, conn.msgtype)
            stamp = None
            if conn.topic == self.topic:
                stamp = stamp_ns(self.store.deserialize_cdr(raw, CLOUD_TYPE).header)
            yield conn, bag_ns, raw, stamp

    def close(self) -> None:
        self._bag.__exit__(None, None, None)


class BagRecorder:
    """Writes the completed clouds (raw CDR) and the copied TF into a new bag, atomically.

    One thread owns the bag writer (sqlite3 connections are bound to their thread); the DDS
    callbacks and the player only queue messages, so recording never blocks them.
    """

    def __init__(self, out: str | os.PathLike, storage: str, topic: str,
                 tf_connections: list[Any]) -> None:
        self.out, self.topic = Path(out), topic
        self._staged = StagedBag(self.out, storage)
        self._queue: queue.SimpleQueue[tuple[Any, int, bytes] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_all, args=(tf_connections,),
                                        name='distdpo-replay-recorder', daemon=True)
        self._thread.start()

    def _write_all(self, tf_connections: list[Any]) -> None:
        store = typestore()
        try:
            with self._staged.writer() as bag:
                targets = {CLOUD_TYPE: bag.add_connection(self.topic, CLOUD_TYPE,
                                                          typestore=store)}
                for conn in tf_connections:  # keep the offered QoS: /tf_static is transient local
                    qos = getattr(conn.ext, 'offered_qos_profiles', ()) or ()
                    targets[conn.id] = bag.add_connection(
                        conn.topic, conn.msgtype, typestore=store,
                        offered_qos_profiles=() if isinstance(qos, str) else qos)
                while (item := self._queue.get()) is not None:
                    key, stamp_ns, raw = item
                    bag.write(targets[key], stamp_ns, raw)
        except BaseException as exc:  # reported by finish()
            self._error = exc
            while self._queue.get() is not None:  # keep draining so producers never block
                pass

    def write_cloud(self, stamp_ns: int, raw: bytes) -> None:
        self._queue.put((CLOUD_TYPE, stamp_ns, raw))

    def write_tf(self, conn: Any, bag_ns: int, raw: bytes) -> None:
        self._queue.put((conn.id, bag_ns, raw))

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def finish(self) -> Path:
        """Close the bag and move it into place; raise what went wrong while writing."""
        self._stop()
        if self._error is not None:
            self._staged.discard()
            raise UserError(f'{self.out}: recording failed: {self._error}') from self._error
        return self._staged.commit()

    def abort(self) -> None:
        self._stop()
        self._staged.discard()
