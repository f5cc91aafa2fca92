"""Replay a rosbag2 through the completion node over DDS, without a ROS installation.

The pip-only equivalent of `ros2 bag play BAG` + `ros2 launch distdpo_ros complete.launch.py` +
`ros2 bag record /distdpo/completed_points`: a player node publishes the bag's PointCloud2 clouds
as the raw CDR bytes stored in the bag (paced by their bag times / `rate`, or one at a time with
`lockstep`), the `distdpo_completion` node completes them (in this process, or in its own with
`separate_process`), and a recorder node writes every completed cloud into a new bag, raw as it
arrives, together with the input bag's /tf and /tf_static so that the poses travel along.

Latency is measured by the player's clock from publishing a scan to receiving its completion (the
node copies the header, so the stamp identifies the scan). With a ground-truth dataset each
completed frame is then scored with :func:`distdpo_ros.metrics.scan_metrics`.

Everything runs under the ROS network rule (loopback discovery, a private domain, logs in a
temporary folder, LARGE_DATA transport) unless the user has set those variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros.config import ModelConfig
from distdpo_ros.errors import UserError
from distdpo_ros.ros_env import use_local_ros_network
from distdpo_training.data.bags import CLOUD_TYPE, BagRecorder, BagStream, stamp_ns, typestore

NODE_TIMEOUT = 120.0  # seconds to wait for the node to load its model and warm up


@dataclass
class ReplayOptions:
    """What `distdpo replay` does; see commands/replay.py for the meaning of each."""

    bag: Path
    topic: str = '/velodyne_points'
    rate: float = 1.0
    lockstep: bool = False
    record: Path | None = None
    storage: str = 'mcap'
    model: str = 'default'
    device: str = 'auto'
    steps: int = 0
    guidance: float = -1.0
    seed: int = 0
    separate_process: bool = False
    gt: Path | None = None
    wait: float = 30.0  # seconds to wait for a completion from a node in another process
    max_scans: int = 0  # 0: all


@dataclass
class _Sent:
    stamp_ns: int
    sent: float  # time.perf_counter()


@dataclass
class _Completed:
    stamp_ns: int
    received: float
    points: int
    xyz: np.ndarray | None = None  # kept only for the ground-truth evaluation


@dataclass
class ReplayReport:
    """Counts, latency statistics and (with ground truth) per-frame metrics of one replay."""

    published: int = 0
    last_stamp: int | None = None  # of the scan published last
    completed: list[_Completed] = field(default_factory=list)
    sent: dict[int, _Sent] = field(default_factory=dict)
    node: dict[str, Any] = field(default_factory=dict)  # the node's own statistics
    metrics: list[dict[str, Any]] = field(default_factory=list)
    record: str | None = None
    wall_seconds: float = 0.0

    def latencies(self) -> np.ndarray:
        return np.array([c.received - self.sent[c.stamp_ns].sent for c in self.completed
                         if c.stamp_ns in self.sent])

    def summary(self) -> dict[str, Any]:
        latency = self.latencies()
        out: dict[str, Any] = {
            'published': self.published, 'completed': len(self.completed),
            'not_completed': self.published - len(self.completed),
            'wall_seconds': round(self.wall_seconds, 3),
            'completed_per_second': (len(self.completed) / self.wall_seconds
                                     if self.wall_seconds else 0.0),
        }
        if latency.size:
            out['latency_ms'] = {'median': float(np.median(latency) * 1e3),
                                 'p95': float(np.percentile(latency, 95) * 1e3),
                                 'max': float(latency.max() * 1e3),
                                 'mean': float(latency.mean() * 1e3)}
        if self.node:
            out['node'] = self.node
        if self.metrics:
            out['metrics'] = _mean_metrics(self.metrics)
            out['metrics_per_frame'] = self.metrics
        if self.record:
            out['record'] = self.record
        return out


def _mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and k != 'stamp_ns']
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {'frames': len(rows)}


# --------------------------------------------------------------------------------------------
# The node: here or in a child process
# --------------------------------------------------------------------------------------------

def _node_parameters(opts: ReplayOptions) -> dict[str, Any]:
    return {'model': opts.model, 'device': opts.device, 'steps': opts.steps,
            'guidance': opts.guidance, 'seed': opts.seed,
            # Every replayed scan should reach the node; newest-wins still applies.
            'reliability': 'reliable', 'depth': 2, 'log_period': 0.0}


def _ros_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def start_node_process(opts: ReplayOptions) -> subprocess.Popen:
    """`python -m distdpo_ros.node` with the replay's parameters (same venv, same env)."""
    args = [sys.executable, '-m', 'distdpo_ros.node', '--ros-args',
            '-r', f'/velodyne_points:={opts.topic}']
    for name, value in _node_parameters(opts).items():
        args += ['-p', f'{name}:={_ros_value(value)}']
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ))


def stop_node_process(proc: subprocess.Popen) -> str:
    """Ctrl-C the node process (then kill it after 15 s); return its output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ''


# --------------------------------------------------------------------------------------------
# The replay
# --------------------------------------------------------------------------------------------

def replay(opts: ReplayOptions, completer: Any = None,
           progress: Callable[[int], object] | None = None) -> ReplayReport:
    """Play the bag through the node and collect the completions; see the module docstring.

    `completer` (in-process only) replaces loading `opts.model`, e.g. a model already in memory.
    """
    if opts.rate <= 0:
        raise UserError(f'--rate must be > 0, got {opts.rate}')
    if completer is not None and opts.separate_process:
        raise UserError('a ready completer can only be used in this process')
    use_local_ros_network()
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from distdpo_ros.node import CompletionNode
    from distdpo_ros.node_support import INPUT_TOPIC, OUTPUT_TOPIC

    gt_frames = (GroundTruth(opts.gt, _model_config(opts, completer)) if opts.gt is not None
                 else None)
    stream = BagStream(opts.bag, opts.topic)
    recorder = (BagRecorder(opts.record, opts.storage, OUTPUT_TOPIC, stream.tf) if opts.record
                else None)
    report = ReplayReport()
    context = rclpy.Context()
    rclpy.init(context=context)
    node = proc = executor = None
    done = threading.Condition()
    started = time.perf_counter()
    try:
        helper = rclpy.create_node('distdpo_replay', context=context)
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        publisher = helper.create_publisher(PointCloud2, opts.topic, qos)

        def on_completed(raw: bytes) -> None:
            received = time.perf_counter()
            msg = recorder_store.deserialize_cdr(raw, CLOUD_TYPE)
            stamp = stamp_ns(msg.header)
            xyz = None
            if gt_frames is not None:
                from distdpo_ros.pointcloud import cloud_to_xyz

                xyz = cloud_to_xyz(msg)
            if recorder is not None:
                recorder.write_cloud(stamp, raw)
            with done:
                report.completed.append(_Completed(stamp, received, int(msg.width) *
                                                   int(msg.height), xyz))
                done.notify_all()

        recorder_store = typestore()
        helper.create_subscription(PointCloud2, OUTPUT_TOPIC, on_completed, qos, raw=True)
        executor = MultiThreadedExecutor(num_threads=2, context=context)
        executor.add_node(helper)
        ready = threading.Event()
        if opts.separate_process:
            _watch_readiness(helper, ready)
            proc = start_node_process(opts)
        else:
            overrides = [Parameter(k, value=v) for k, v in _node_parameters(opts).items()]
            node = CompletionNode(completer, parameter_overrides=overrides, context=context,
                                  cli_args=['--ros-args', '-r',
                                            f'{INPUT_TOPIC}:={opts.topic}'])
            executor.add_node(node)
            ready = node.ready
        threading.Thread(target=executor.spin, daemon=True).start()
        _wait_until_ready(ready, proc, publisher)
        started = time.perf_counter()
        _play(opts, stream, publisher, recorder, report, done, node, progress)
        _wait_for_last_scan(report, done, node, opts.wait)
        report.wall_seconds = time.perf_counter() - started
        if node is not None:
            report.node = node.stats.summary()
    except BaseException:
        if recorder is not None:
            recorder.abort()
        raise
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=2)
        if node is not None:
            node.destroy_node()
        if proc is not None:
            output = stop_node_process(proc)
            if proc.returncode not in (0, -signal.SIGINT):
                report.node['process_output'] = output[-2000:]
        rclpy.try_shutdown(context=context)
        stream.close()
    if recorder is not None:
        report.record = str(recorder.finish())
    if gt_frames is not None:
        report.metrics = gt_frames.evaluate(report.completed)
    return report


def _model_config(opts: ReplayOptions, completer: Any) -> Any:
    """The replayed model's config (its range crops the ground truth and sizes the baselines)."""
    config = getattr(completer, 'config', None)
    if config is None:
        from distdpo_ros.checkpoint import load_config

        config = load_config(opts.model)
    return config


def _all_answered(report: ReplayReport) -> bool:
    """Whether the scan published last has been completed (newest-wins never drops it)."""
    return report.last_stamp is not None and any(
        c.stamp_ns == report.last_stamp for c in reversed(report.completed))


def _watch_readiness(helper: Any, ready: threading.Event) -> None:
    """Set `ready` when the node's /diagnostics say it has finished warming up."""
    from diagnostic_msgs.msg import DiagnosticArray

    from distdpo_ros.node_support import NODE_NAME

    def on_diagnostics(msg: Any) -> None:
        if any(s.name.startswith(NODE_NAME) and s.message != 'warming up' for s in msg.status):
            ready.set()

    helper.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)


def _wait_until_ready(ready: threading.Event, proc: subprocess.Popen | None,
                      publisher: Any) -> None:
    deadline = time.time() + NODE_TIMEOUT
    while not (ready.is_set() and publisher.get_subscription_count() > 0):
        if proc is not None and proc.poll() is not None:
            raise UserError('the completion node process exited early:\n'
                            + stop_node_process(proc)[-2000:])
        if time.time() > deadline:
            raise UserError(f'the completion node was not ready within {NODE_TIMEOUT:.0f} s')
        time.sleep(0.05)


def _wait_for_last_scan(report: ReplayReport, done: threading.Condition, node: Any,
                        timeout: float) -> None:
    """Until the scan published last is completed. An in-process node is waited for as long as
    it is busy (a slow model is not a stuck one) and given up on after 1 s idle (the scan was
    rejected); a node in another process gets `timeout` seconds."""
    if report.last_stamp is None:  # nothing published yet
        return
    deadline = time.monotonic() + timeout
    idle_since: float | None = None
    with done:
        while not _all_answered(report):
            now = time.monotonic()
            if node is not None:
                if node.busy:
                    idle_since, deadline = None, now + timeout
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since > 1.0:
                    return
            if now > deadline:
                return
            done.wait(0.05)


def _play(opts: ReplayOptions, stream: BagStream, publisher: Any, recorder: BagRecorder | None,
          report: ReplayReport, done: threading.Condition, node: Any,
          progress: Callable[[int], object] | None) -> None:
    first_bag_ns: int | None = None
    clock_start = time.perf_counter()
    for conn, bag_ns, raw, stamp in stream.messages():
        if stamp is None:  # TF: straight into the recording, not over DDS
            if recorder is not None:
                recorder.write_tf(conn, bag_ns, raw)
            continue
        if opts.max_scans and report.published >= opts.max_scans:
            break
        if opts.lockstep:
            _wait_for_last_scan(report, done, node, opts.wait)
        else:
            if first_bag_ns is None:
                first_bag_ns = bag_ns
            due = clock_start + (bag_ns - first_bag_ns) / 1e9 / opts.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        with done:
            report.sent[stamp] = _Sent(stamp, time.perf_counter())
            report.last_stamp = stamp
        publisher.publish(raw)
        report.published += 1
        if progress is not None:
            progress(1)


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------

class GroundTruth:
    """Evaluation ground truth of the dataset sequence a bag was made from (kitti2bag or
    `simulate --bag`), matched to completed clouds by their stamps (times.txt). The ground truth
    is cropped to the model's range; every scored frame also carries the scores of the input
    baselines of its scan (`cd_input_raw`, `fscore_input_cond`, ...: evaluation.baselines)."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        from distdpo_training.data.kitti import KittiSequence, find_sequences

        sequences = [KittiSequence(p) for p in find_sequences(path)]
        for seq in sequences:
            if not seq.map_path.is_file():
                raise UserError(f'{seq.map_path}: ground-truth map is missing; run '
                                f'`distdpo build-maps {path}` first')
        self.sequences = sequences
        self.config = config
        self.max_range = float(config.max_range)

    def _locate(self, stamps: list[int]) -> tuple[Any, dict[int, int]]:
        """The sequence sharing most stamps with the completions, and stamp -> scan position."""
        best = max(self.sequences, key=lambda seq: len(set(seq.stamps_ns.tolist()) &
                                                       set(stamps)))
        positions = {int(s): i for i, s in enumerate(best.stamps_ns)}
        if not set(positions) & set(stamps):
            raise UserError(f'--gt: no scan of {", ".join(s.name for s in self.sequences)} has '
                            'the stamp of a completed cloud; was the bag made from this dataset?')
        return best, positions

    def evaluate(self, completed: list[_Completed],
                 progress: Callable[[int], object] | None = None) -> list[dict[str, Any]]:
        """scan_metrics of every completed cloud whose stamp is a scan of the dataset."""
        from distdpo_ros import metrics
        from distdpo_training.data.dataset import MapIndex, evaluation_ground_truth
        from distdpo_training.data.maps import load_map
        from distdpo_training.evaluation.baselines import SHORT, scan_input_clouds

        if not completed:
            return []
        sequence, positions = self._locate([c.stamp_ns for c in completed])
        index = MapIndex(load_map(sequence.path))
        rows = []
        for done in completed:
            position = positions.get(done.stamp_ns)
            if position is None or done.xyz is None or len(done.xyz) == 0:
                continue
            gt = evaluation_ground_truth(sequence, position, index, max_range=self.max_range)
            scores = metrics.scan_metrics(done.xyz, gt)
            frame = int(sequence.frame_ids[position])
            inputs = scan_input_clouds(sequence.scan(position), self.config, frame,
                                       f'{sequence.name} frame {frame}')
            for name, cloud in inputs.items():
                cd, fscore = metrics.chamfer_and_fscore(cloud, gt)
                scores[f'cd_input_{SHORT[name]}'] = cd
                scores[f'fscore_input_{SHORT[name]}'] = fscore
            rows.append({'sequence': sequence.name, 'frame': frame,
                         'stamp_ns': done.stamp_ns, **scores})
            if progress is not None:
                progress(1)
        return rows
