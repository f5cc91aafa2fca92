"""rosbag2 tools: kitti2bag -> bag2kitti round trips, Velodyne layout, TF chains, odometry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from distdpo_ros.cli import main as cli_main
from distdpo_ros.errors import UserError
from distdpo_ros.pointcloud import make_cloud
from distdpo_training.data.bags import BagFrames, write_sequence_bag
from distdpo_training.data.frames import Frame
from distdpo_training.data.kitti import KittiSequence, write_sequence

pytest.importorskip('rosbags')


def labelled_frames(n: int = 4, points: int = 500) -> list[Frame]:
    rng = np.random.default_rng(3)
    frames = []
    for i in range(n):
        pose = np.eye(4)
        pose[:3, :3] = Rotation.from_euler('zyx', rng.uniform(-0.5, 0.5, 3)).as_matrix()
        pose[:3, 3] = rng.uniform(-100, 100, 3)
        pts = rng.normal(scale=20, size=(points, 4)).astype(np.float32)
        frames.append(Frame(i, 1_600_000_000_000_000_000 + 100_000_017 * i, pts, pose,
                            rng.integers(0, 1 << 20, points).astype(np.uint32)))
    return frames


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_kitti2bag_bag2kitti_round_trip(tmp_path, storage, capsys):
    write_sequence(tmp_path / 'seq', labelled_frames())
    bag, out = tmp_path / 'bag', tmp_path / 'out'
    assert cli_main(['kitti2bag', str(tmp_path / 'seq'), str(bag), '--storage', storage]) == 0
    assert (bag / f'bag.{"mcap" if storage == "mcap" else "db3"}').is_file()
    assert cli_main(['bag2kitti', str(bag), str(out), '--origin', 'world']) == 0
    a, b = KittiSequence(tmp_path / 'seq'), KittiSequence(out)
    assert len(a) == len(b) == 4
    for fa, fb in zip(a, b, strict=True):
        assert fa.points.tobytes() == fb.points.tobytes()  # bit-identical points
        assert fa.labels.tobytes() == fb.labels.tobytes()
        assert fa.stamp_ns == fb.stamp_ns
        assert np.array_equal(fa.pose[:3, 3], fb.pose[:3, 3])  # translations exact
        # rotations go through a quaternion: equal to the last bits of float64
        np.testing.assert_allclose(fa.pose, fb.pose, rtol=0, atol=2e-15)
    assert 'skipped' not in capsys.readouterr().err
    with pytest.raises(UserError, match='already exists'):
        write_sequence_bag(bag, a, storage)


def real_subset(shared_data: Path, tmp_path: Path) -> Path:
    src, seq = shared_data / 'kitti_seq00_subset', tmp_path / 'real'
    (seq / 'velodyne').mkdir(parents=True)
    for scan in sorted((src / 'velodyne').glob('*.bin'))[:2]:
        os.symlink(scan, seq / 'velodyne' / scan.name)
    for name, target in (('calib.txt', 'calib.txt'), ('poses_all_frames.txt', 'poses.txt'),
                         ('times_all_frames.txt', 'times.txt')):
        os.symlink(src / name, seq / target)
    return seq


def test_real_kitti_round_trip(shared_data, tmp_path):
    seq = KittiSequence(real_subset(shared_data, tmp_path))
    write_sequence_bag(tmp_path / 'bag', seq)
    frames = list(BagFrames(tmp_path / 'bag', origin='world'))
    for fa, fb in zip(seq, frames, strict=True):
        assert fa.points.tobytes() == fb.points.tobytes() and fb.labels is None
        assert fa.stamp_ns == fb.stamp_ns
        assert np.array_equal(fa.pose[:3, 3], fb.pose[:3, 3])
        # KITTI's printed rotations are orthonormal to ~1e-7 only; TF carries the nearest rotation
        np.testing.assert_allclose(fa.pose, fb.pose, rtol=0, atol=2e-7)


def read_raw_clouds(bag: Path) -> list:
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == '/velodyne_points']
        return [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(conns)]


def test_velodyne_layout_and_first_frame_origin(tmp_path):
    rng = np.random.default_rng(0)
    frames = []
    for i, frame in enumerate(labelled_frames(2, 300)):
        frame.labels = None
        frame.extra = {'ring': rng.integers(0, 64, 300).astype(np.uint16),
                       'time': rng.uniform(0, 0.1, 300).astype(np.float32)}
        frame.index = i
        frames.append(frame)
    write_sequence_bag(tmp_path / 'bag', frames, storage='sqlite3')
    msg = read_raw_clouds(tmp_path / 'bag')[0]
    assert msg.header.frame_id == 'velodyne' and msg.point_step == 22 and msg.height == 1
    assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [
        ('x', 0, 7), ('y', 4, 7), ('z', 8, 7), ('intensity', 12, 7), ('ring', 16, 4),
        ('time', 18, 7)]
    read = list(BagFrames(tmp_path / 'bag'))  # origin='first'
    assert np.array_equal(read[0].pose, np.eye(4))
    expected = np.linalg.inv(frames[0].pose) @ frames[1].pose
    np.testing.assert_allclose(read[1].pose, expected, atol=1e-12)
    assert read[1].points.tobytes() == frames[1].points.tobytes()


class BagBuilder:
    """Write arbitrary messages with rosbags, for bags that kitti2bag would never make."""

    def __init__(self, path: Path) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        self.store = get_typestore(Stores.ROS2_HUMBLE)
        self.t = self.store.types
        self.writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.conns: dict[str, object] = {}

    def header(self, ns: int, frame: str):
        stamp = self.t['builtin_interfaces/msg/Time'](sec=ns // 10**9, nanosec=ns % 10**9)
        return self.t['std_msgs/msg/Header'](stamp=stamp, frame_id=frame)

    def write(self, topic: str, msgtype: str, ns: int, msg) -> None:
        if topic not in self.conns:
            self.conns[topic] = self.writer.add_connection(topic, msgtype, typestore=self.store)
        self.writer.write(self.conns[topic], ns, self.store.serialize_cdr(msg, msgtype))

    def tf(self, ns: int, parent: str, child: str, xyz, yaw: float, static=False) -> None:
        t = self.t
        q = Rotation.from_euler('z', yaw).as_quat()
        stamped = t['geometry_msgs/msg/TransformStamped'](
            header=self.header(ns, parent), child_frame_id=child,
            transform=t['geometry_msgs/msg/Transform'](
                translation=t['geometry_msgs/msg/Vector3'](x=xyz[0], y=xyz[1], z=xyz[2]),
                rotation=t['geometry_msgs/msg/Quaternion'](x=q[0], y=q[1], z=q[2], w=q[3])))
        self.write('/tf_static' if static else '/tf', 'tf2_msgs/msg/TFMessage', ns,
                   t['tf2_msgs/msg/TFMessage'](transforms=[stamped]))

    def odom(self, ns: int, xyz, yaw: float) -> None:
        t = self.t
        q = Rotation.from_euler('z', yaw).as_quat()
        pose = t['geometry_msgs/msg/Pose'](
            position=t['geometry_msgs/msg/Point'](x=xyz[0], y=xyz[1], z=xyz[2]),
            orientation=t['geometry_msgs/msg/Quaternion'](x=q[0], y=q[1], z=q[2], w=q[3]))
        zero = t['geometry_msgs/msg/Vector3'](x=0.0, y=0.0, z=0.0)
        msg = t['nav_msgs/msg/Odometry'](
            header=self.header(ns, 'map'), child_frame_id='base_link',
            pose=t['geometry_msgs/msg/PoseWithCovariance'](pose=pose, covariance=np.zeros(36)),
            twist=t['geometry_msgs/msg/TwistWithCovariance'](
                twist=t['geometry_msgs/msg/Twist'](linear=zero, angular=zero),
                covariance=np.zeros(36)))
        self.write('/odom', 'nav_msgs/msg/Odometry', ns, msg)

    def cloud(self, ns: int, xyz: np.ndarray, extra=None, frame='lidar_top') -> None:
        msg = make_cloud(xyz, self.header(ns, frame), extra,
                         cloud_type=self.t['sensor_msgs/msg/PointCloud2'],
                         field_type=self.t['sensor_msgs/msg/PointField'])
        self.write('/points', 'sensor_msgs/msg/PointCloud2', ns, msg)

    def close(self) -> None:
        self.writer.close()


def pose_of(x: float, yaw: float, z: float = 0.0) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler('z', yaw).as_matrix()
    pose[:3, 3] = (x, 0.0, z)
    return pose


def test_tf_chain_interpolation_and_frames_without_pose(tmp_path, capsys):
    s = 10**9
    bag = BagBuilder(tmp_path / 'bag')
    bag.tf(0, 'base_link', 'lidar_top', (1.0, 0.0, 1.8), 0.0, static=True)
    for k in range(3):  # odom -> base_link at 1 Hz from t = 10 s to 12 s, driving along x
        bag.tf(10 * s + k * s, 'odom', 'base_link', (2.0 * k, 0.0, 0.0), 0.1 * k)
    bag.tf(11 * s + s // 2, 'odom', 'base_link', (np.nan, 0.0, 0.0), 0.0)  # ignored
    xyz = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    ouster = {'intensity': np.arange(50, dtype=np.uint16), 'ring': np.zeros(50, np.uint8)}
    for ns in (9 * s, 10 * s, 10 * s + s // 2, 11 * s + s // 2, 12 * s, 13 * s):
        bag.cloud(ns, xyz, ouster)
    bag.close()

    frames = BagFrames(tmp_path / 'bag', '/points', origin='world')
    read = list(frames)
    assert [f.stamp_ns for f in read] == [10 * s, 10 * s + s // 2, 11 * s + s // 2, 12 * s]
    assert [(k.index, k.stamp_ns) for k in frames.skipped] == [(0, 9 * s), (5, 13 * s)]
    assert 'odom -> base_link is known from 10.000 s to 12.000 s only' in frames.skipped[0].reason
    mount = pose_of(1.0, 0.0, 1.8)
    np.testing.assert_allclose(read[0].pose, mount, atol=1e-12)
    np.testing.assert_allclose(read[1].pose, pose_of(1.0, 0.05) @ mount, atol=1e-12)  # halfway
    np.testing.assert_allclose(read[2].pose, pose_of(3.0, 0.15) @ mount, atol=1e-12)
    np.testing.assert_allclose(read[3].pose, pose_of(4.0, 0.2) @ mount, atol=1e-12)
    np.testing.assert_array_equal(read[0].points[:, 3], np.arange(50))  # uint16 intensity

    # the command reports the skipped clouds and writes the rest
    assert cli_main(['bag2kitti', str(tmp_path / 'bag'), str(tmp_path / 'out'),
                     '--topic', '/points']) == 0
    err = capsys.readouterr().err
    assert 'skipped 2 of 6 clouds' in err and 'cloud 0 at 9.000 s' in err
    assert len(KittiSequence(tmp_path / 'out')) == 4


def test_odometry_topic_gives_poses(tmp_path):
    s = 10**9
    bag = BagBuilder(tmp_path / 'bag')
    bag.tf(0, 'base_link', 'lidar_top', (0.5, 0.0, 1.5), 0.0, static=True)
    bag.tf(0, 'map', 'base_link', (100.0, 0.0, 0.0), 0.0)  # a wrong /tf the odometry overrides
    for k in range(3):
        bag.odom(k * s, (3.0 * k, 0.0, 0.0), 0.0)
        bag.cloud(k * s, np.ones((5, 3), np.float32))
    bag.close()
    read = list(BagFrames(tmp_path / 'bag', '/points', odom_topic='/odom', origin='world'))
    np.testing.assert_allclose([f.pose[0, 3] for f in read], [0.5, 3.5, 6.5])
    np.testing.assert_allclose([f.pose[2, 3] for f in read], [1.5] * 3)


def test_bag_errors_name_what_is_wrong(tmp_path, capsys):
    write_sequence(tmp_path / 'seq', labelled_frames(1, 10))
    write_sequence_bag(tmp_path / 'bag', KittiSequence(tmp_path / 'seq'))
    with pytest.raises(UserError, match=r"no PointCloud2 topic '/points' \(PointCloud2 topics: "
                                        r'/velodyne_points\)'):
        BagFrames(tmp_path / 'bag', '/points')
    with pytest.raises(UserError, match='no nav_msgs/Odometry topic'):
        BagFrames(tmp_path / 'bag', odom_topic='/odom')
    assert cli_main(['bag2kitti', str(tmp_path / 'nothing'), str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.strip() == (f'distdpo: error: {tmp_path / "nothing"}: bag '
                                               'does not exist')


def test_bag_without_tf_is_one_line(tmp_path, capsys):
    """A bag with clouds but no /tf: rosbags reads every message for an empty connection list,
    which once reached the TF parser with clouds (AttributeError 'transforms')."""
    bag = BagBuilder(tmp_path / 'bag')
    for k in range(3):
        bag.cloud(k * 10**8, np.ones((5, 3), np.float32))
    bag.close()
    frames = BagFrames(tmp_path / 'bag', '/points')
    assert list(frames) == [] and len(frames.skipped) == 3
    assert cli_main(['bag2kitti', str(tmp_path / 'bag'), str(tmp_path / 'out'),
                     '--topic', '/points']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'distdpo: error: {tmp_path / "bag"}: ')
    assert 'no /tf or /tf_static transforms' in err and '--odom-topic' in err
    assert not (tmp_path / 'out').exists()
