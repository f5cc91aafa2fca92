"""`distdpo bench pointcloud`: PointCloud2 <-> numpy speed and the node's own per-scan overhead.

Conversion is measured on a Velodyne-layout cloud (x, y, z, intensity float32, ring uint16, time
float32, point_step 22, every float unaligned) against a per-point `struct` implementation in the
same run. The node overhead is receive-to-publish minus the model's time (scans are sent one at a
time, so none waits for an earlier one), measured inside a real `distdpo_completion` node fed over
DDS (loopback only) with a model of fixed cost.
"""

from __future__ import annotations

import argparse
import json
import struct
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from distdpo_ros import pointcloud
from distdpo_ros.errors import UserError

VELODYNE_FIELDS = [('x', 0, pointcloud.FLOAT32), ('y', 4, pointcloud.FLOAT32),
                   ('z', 8, pointcloud.FLOAT32), ('intensity', 12, pointcloud.FLOAT32),
                   ('ring', 16, pointcloud.UINT16), ('time', 18, pointcloud.FLOAT32)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--points', type=int, default=120_000,
                        help='points in the benchmark cloud (default: 120000, one HDL-64E scan)')
    parser.add_argument('--repeats', type=int, default=20,
                        help='timed repetitions of each fast conversion; the median is reported '
                             '(default: 20)')
    parser.add_argument('--scans', type=int, default=20,
                        help='scans sent through the node for its overhead (default: 20; 0 skips '
                             'the node, which needs rclpy)')
    parser.add_argument('--output-points', type=int, default=180_000,
                        help='points the stand-in model returns per scan, i.e. what the node '
                             'publishes (default: 180000, the full-scale student)')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')


def velodyne_cloud(n: int, seed: int = 0) -> Any:
    """A duck-typed PointCloud2 in the Velodyne driver's packed layout (point_step 22)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype({'names': [f[0] for f in VELODYNE_FIELDS],
                      'formats': ['<f4', '<f4', '<f4', '<f4', '<u2', '<f4'],
                      'offsets': [f[1] for f in VELODYNE_FIELDS], 'itemsize': 22})
    points = np.zeros(n, dtype)
    radius, angle = rng.uniform(3, 80, n), rng.uniform(-np.pi, np.pi, n)
    points['x'], points['y'] = radius * np.cos(angle), radius * np.sin(angle)
    points['z'] = rng.normal(-1.0, 1.0, n)
    points['intensity'] = rng.uniform(0, 255, n)
    points['ring'] = rng.integers(0, 64, n)
    points['time'] = np.linspace(0, 0.1, n)
    fields = [SimpleNamespace(name=name, offset=offset, datatype=code, count=1)
              for name, offset, code in VELODYNE_FIELDS]
    return SimpleNamespace(header=None, height=1, width=n, fields=fields, is_bigendian=False,
                           point_step=22, row_step=22 * n, data=points.tobytes(), is_dense=True)


def reference_to_xyz(msg: Any) -> np.ndarray:
    """Per-point Python: struct.unpack_from for every point, the usual hand-written loop."""
    offsets = {f.name: f.offset for f in msg.fields}
    ox, oy, oz = offsets['x'], offsets['y'], offsets['z']
    out = []
    data, step = msg.data, msg.point_step
    for i in range(msg.width * msg.height):
        base = i * step
        x, = struct.unpack_from('<f', data, base + ox)
        y, = struct.unpack_from('<f', data, base + oy)
        z, = struct.unpack_from('<f', data, base + oz)
        out.append((x, y, z))
    return np.array(out, dtype=np.float32)


def reference_from_xyz(xyz: np.ndarray) -> bytes:
    """Per-point Python: struct.pack_into for every point of an x, y, z float32 cloud."""
    buf = bytearray(12 * len(xyz))
    for i, (x, y, z) in enumerate(xyz.tolist()):
        struct.pack_into('<fff', buf, 12 * i, x, y, z)
    return bytes(buf)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def bench_conversion(n: int, repeats: int) -> dict[str, Any]:
    msg = velodyne_cloud(n)
    xyz = pointcloud.cloud_to_xyz(msg)
    if not np.array_equal(xyz, reference_to_xyz(msg)):
        raise AssertionError('vectorised and per-point readers disagree')
    packed = pointcloud.pack_points(xyz)
    if packed.data.tobytes() != reference_from_xyz(xyz):
        raise AssertionError('vectorised and per-point writers disagree')
    read = _median_ms(lambda: pointcloud.cloud_to_xyz(msg), repeats)
    read_extra = _median_ms(lambda: pointcloud.cloud_to_arrays(msg, ('intensity', 'ring')),
                            repeats)
    write = _median_ms(lambda: pointcloud.pack_points(xyz), repeats)
    ref_read = _median_ms(lambda: reference_to_xyz(msg), 3)
    ref_write = _median_ms(lambda: reference_from_xyz(xyz), 3)
    result = {
        'points': n, 'point_step': 22,
        'to_xyz': {'ms': read, 'reference_ms': ref_read, 'speedup': ref_read / read},
        'to_xyz_intensity_ring_ms': read_extra,
        'from_xyz': {'ms': write, 'reference_ms': ref_write, 'speedup': ref_write / write},
    }
    try:
        from std_msgs.msg import Header
    except ImportError:
        return result
    header = Header(frame_id='velodyne')
    result['from_xyz_rclpy_message_ms'] = _median_ms(
        lambda: pointcloud.make_cloud(xyz, header), repeats)
    return result


class _FixedCostModel:
    """Stand-in model: a fixed output cloud after a fixed sleep (the node times it itself)."""

    def __init__(self, output: np.ndarray, seconds: float) -> None:
        self.output, self.seconds = output, seconds

    def complete(self, points: np.ndarray, steps: int | None = None,
                 guidance: float | None = None, refine: bool = False,
                 seed: int | None = None) -> np.ndarray:
        time.sleep(self.seconds)
        return self.output


def bench_node(n: int, scans: int, output_points: int) -> dict[str, Any]:
    """Publish `scans` Velodyne clouds to a real node; report its receive-to-publish overhead."""
    from distdpo_ros.ros_env import use_local_ros_network

    use_local_ros_network()
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2, PointField
    from std_msgs.msg import Header

    from distdpo_ros.node import CompletionNode
    from distdpo_ros.node_support import INPUT_TOPIC, OUTPUT_TOPIC

    plain = velodyne_cloud(n)
    msg = PointCloud2(header=Header(frame_id='velodyne'), height=1, width=n,
                      fields=[PointField(name=f.name, offset=f.offset, datatype=f.datatype,
                                         count=1) for f in plain.fields],
                      is_bigendian=False, point_step=22, row_step=22 * n, data=plain.data,
                      is_dense=True)
    output = np.random.default_rng(1).normal(size=(output_points, 3)).astype(np.float32)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = client = executor = None
    try:
        node = CompletionNode(_FixedCostModel(output, 0.05), context=context,
                              parameter_overrides=[Parameter('reliability', value='reliable'),
                                                   Parameter('log_period', value=0.0)])
        client = rclpy.create_node('distdpo_bench_client', context=context)
        received = []
        client.create_subscription(PointCloud2, OUTPUT_TOPIC, received.append, 5)
        pub = client.create_publisher(PointCloud2, INPUT_TOPIC,
                                      QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        executor.add_node(client)
        threading.Thread(target=executor.spin, daemon=True).start()
        node.ready.wait(30)
        deadline = time.time() + 10
        while pub.get_subscription_count() == 0 and time.time() < deadline:
            time.sleep(0.01)
        for i in range(scans):  # one at a time: no drops, each scan measured alone
            msg.header.stamp.sec = i
            pub.publish(msg)
            deadline = time.time() + 10
            while node.stats.completed < i + 1 and time.time() < deadline:
                time.sleep(0.002)
        summary = node.stats.summary()
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=2)
        for each in (node, client):
            if each is not None:
                each.destroy_node()
        rclpy.try_shutdown(context=context)
    if summary['completed'] < scans:
        raise UserError(f'the node completed {summary["completed"]} of {scans} scans')
    return {'scans': summary['completed'], 'input_points': n, 'output_points': output_points,
            'overhead_ms': summary['overhead_ms'], 'latency_ms': summary['latency_ms'],
            'model_ms': summary['model_ms'], 'queued_ms': summary['queued_ms']}


def run(args: argparse.Namespace) -> int:
    if args.points < 1 or args.repeats < 1 or args.scans < 0 or args.output_points < 1:
        raise UserError('--points, --repeats and --output-points must be >= 1, --scans >= 0')
    result: dict[str, Any] = {'conversion': bench_conversion(args.points, args.repeats)}
    if args.scans:
        result['node'] = bench_node(args.points, args.scans, args.output_points)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    conv = result['conversion']
    print(f'{conv["points"]}-point Velodyne cloud (point_step 22):')
    for key, label in (('to_xyz', 'PointCloud2 -> (N, 3)'), ('from_xyz', '(N, 3) -> bytes')):
        c = conv[key]
        print(f'  {label:<22} {c["ms"]:8.2f} ms   per-point Python {c["reference_ms"]:8.1f} ms'
              f'   x{c["speedup"]:.0f}')
    if 'node' in result:
        node = result['node']
        print(f'node overhead per scan (receive -> publish minus model, {node["scans"]} scans, '
              f'{node["output_points"]} points out): median {node["overhead_ms"]["median"]:.2f}'
              f' ms, p95 {node["overhead_ms"]["p95"]:.2f} ms')
    return 0
