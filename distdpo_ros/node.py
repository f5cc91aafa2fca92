"""The `distdpo_completion` ROS 2 node: a LiDAR scan in, the completed scene out.

Subscribes to `/velodyne_points` (sensor_msgs/PointCloud2; reliability `auto` by default: reliable
when every publisher on the topic is, else best effort) and publishes `/distdpo/completed_points`
(x, y, z float32) with the input's header. Scans are read and checked
in the subscription callback (about a millisecond, no model work); a worker thread completes one
scan at a time and always takes the newest one: a scan that arrives while another is waiting
replaces it and is counted as dropped, so latency never grows with the input rate. Malformed
scans are rejected with a rate-limited warning naming the reason and a per-reason counter.
Latency, drops and rejects go to `/diagnostics` (when diagnostic_msgs is installed) and to a
periodic log line, both on wall-clock timers (they go on when a bag's /clock stops). SIGINT or
SIGTERM cancel a completion (or the warm-up) before its next sampler step, so the node exits
within about one step.

Run it with `ros2 launch distdpo_ros complete.launch.py`, `ros2 run distdpo_ros completion_node`
or the `completion_node` console script (parameters from `--ros-args --params-file
config/completion.yaml`).
"""

from __future__ import annotations

import inspect
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2

from distdpo_ros import pointcloud
from distdpo_ros.errors import Cancelled, UserError
from distdpo_ros.node_support import (
    INPUT_TOPIC,
    NODE_NAME,
    OUTPUT_TOPIC,
    PARAMETERS,
    RELIABILITIES,
    CompleterLike,
    LatestSlot,
    Param,
    RateLimitedWarnings,
    Stats,
    check_runtime_dependencies,
    choose_reliability,
    max_steps,
    output_share,
    sampling_settings,
    warmup_scan,
)

try:  # optional: only the periodic log line without it
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
except ImportError:  # pragma: no cover - the ROS wheels and every ROS install ship it
    DiagnosticArray = None

QOS_CHECK_PERIOD = 1.0  # seconds between looks at the input topic's publishers (reliability auto)
SHARE_WARNING = 0.5  # warn when the model's crop kept less than this share of its points


def _descriptor(name: str, spec: Param, high: float | None = None) -> ParameterDescriptor:
    desc = ParameterDescriptor(name=name, description=spec.description, read_only=spec.read_only,
                               additional_constraints=spec.constraints)
    if spec.low is None or isinstance(spec.default, bool):
        return desc
    high = spec.high if high is None else high
    if isinstance(spec.default, int):
        desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(high),
                                           step=1)]
    else:
        desc.floating_point_range = [FloatingPointRange(from_value=float(spec.low),
                                                        to_value=float(high), step=0.0)]
    return desc


def _accepts(function: Callable[..., Any], keyword: str) -> bool:
    """Whether `function` takes `keyword` (by name or through **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in parameters)


@dataclass
class _Scan:
    header: Any
    points: np.ndarray
    received: float  # time.perf_counter() when the message arrived


class CompletionNode(Node):
    """The completion node. Pass `completer` to use a ready model (tests, the replay tool)."""

    def __init__(self, completer: CompleterLike | None = None, *,
                 parameter_overrides: Sequence[Parameter] | None = None,
                 node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, parameter_overrides=list(parameter_overrides or []),
                         **node_kwargs)
        for name, spec in PARAMETERS.items():
            self.declare_parameter(name, spec.default, _descriptor(name, spec))
        self._settings = {name: self.get_parameter(name).value for name in PARAMETERS}
        self._check_static_settings()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.stats = Stats()
        self.ready = threading.Event()  # set once the warm-up is over
        self._working = threading.Event()  # set while a scan is being completed
        self._stop = threading.Event()  # set at shutdown: cancel the completion in progress
        self._slot = LatestSlot()
        self._warnings = RateLimitedWarnings(self.get_logger().warning,
                                             self._settings['warn_period'])
        self._completer = completer if completer is not None else self._load_completer()
        self._cancellable = _accepts(self._completer.complete, 'should_stop')
        problem = self._check_dynamic(self._settings) or self._check_refine(self._settings)
        if problem:
            raise UserError(problem)
        self._narrow_steps_range()  # after the check: the current value lies inside

        # Reports run on the steady clock: with use_sim_time they go on after /clock stops.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._publisher = self.create_publisher(PointCloud2, OUTPUT_TOPIC, 2)
        self._input_topic = self.resolve_topic_name(INPUT_TOPIC)
        self._subscription: Any = None
        self.input_reliability: str | None = None  # what the subscription uses now
        self._match_input_qos()
        if self._settings['reliability'] == 'auto':
            self.create_timer(QOS_CHECK_PERIOD, self._match_input_qos, clock=steady)
        self._diagnostics = (self.create_publisher(DiagnosticArray, '/diagnostics', 10)
                             if DiagnosticArray is not None else None)
        self._last_status: tuple[int, str] = (0, 'warming up')
        self._previous = self.stats.summary()
        self.create_timer(self._settings['diagnostics_period'], self._publish_diagnostics,
                          clock=steady)
        if self._settings['log_period'] > 0:
            self.create_timer(self._settings['log_period'], self._log_statistics, clock=steady)
        self._worker = threading.Thread(target=self._work, name='distdpo-completion',
                                        daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'{self.get_fully_qualified_name()}: {self._input_topic} -> '
            f'{self.resolve_topic_name(OUTPUT_TOPIC)}, {self._describe_sampling()}, '
            f'device {self.hardware_id}')

    # ---- set-up -------------------------------------------------------------------------------
    def _check_static_settings(self) -> None:
        s = self._settings
        if s['reliability'] not in RELIABILITIES:
            raise UserError(f'parameter "reliability" must be {", ".join(RELIABILITIES)}; got '
                            f'{s["reliability"]!r}')
        device = str(s['device'])
        if not (device in ('auto', 'cpu', 'cuda') or device.startswith('cuda:')):
            raise UserError(f'parameter "device" must be auto, cpu or cuda[:N], got {device!r}')
        problem = self._check_dynamic(s)
        if problem:
            raise UserError(problem)

    def _check_dynamic(self, s: dict[str, Any]) -> str | None:
        """What is wrong with the run-time parameters `s` (None: nothing). Once the model is
        loaded, the sampling settings are checked against its config, so steps its sampler
        cannot take are refused here rather than on every scan."""
        try:
            settings = sampling_settings(s)
            config = getattr(getattr(self, '_completer', None), 'config', None)
            if config is not None:
                settings.replace(refine=False).resolved(config)
        except UserError as exc:
            return f'parameter {exc}'
        if s['max_range'] and s['min_range'] >= s['max_range']:
            return (f'parameter "min_range" ({s["min_range"]}) must be smaller than "max_range" '
                    f'({s["max_range"]})')
        return None

    def _check_refine(self, s: dict[str, Any]) -> str | None:
        if s['refine'] and not getattr(self._completer, 'has_refine', True):
            return ('parameter "refine" is true but the model has no refinement weights '
                    f'({s["model"]})')
        return None

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Validate run-time changes as a whole; read-only and range checks are rclpy's."""
        proposed = dict(self._settings)
        for p in params:
            if p.name in PARAMETERS:
                proposed[p.name] = p.value
        problem = self._check_dynamic(proposed) or self._check_refine(proposed)
        if problem:
            return SetParametersResult(successful=False, reason=problem)
        changed = {k: v for k, v in proposed.items() if self._settings.get(k) != v}
        self._settings = proposed  # one assignment: the worker sees old or new, never half
        self._warnings.period = proposed['warn_period']
        if changed:
            self.get_logger().info(f'parameters changed: {changed}')
        return SetParametersResult(successful=True)

    def _narrow_steps_range(self) -> None:
        """Limit the `steps` range to what the loaded model's sampler accepts."""
        config = getattr(self._completer, 'config', None)
        if config is not None:
            descriptor = _descriptor('steps', PARAMETERS['steps'], high=max_steps(config))
            descriptor.type = self.describe_parameter('steps').type
            self.set_descriptor('steps', descriptor)

    @property
    def hardware_id(self) -> str:
        """The device the model runs on (the `device` parameter resolved), for /diagnostics."""
        return str(getattr(self._completer, 'device', None) or self._settings['device'])

    def _describe_sampling(self) -> str:
        settings = sampling_settings(self._settings)
        config = getattr(self._completer, 'config', None)
        return (settings if config is None else settings.resolved(config, True)).describe()

    def _load_completer(self) -> CompleterLike:
        check_runtime_dependencies()
        from distdpo_ros.completion import Completer

        started = time.perf_counter()
        completer = Completer.from_pretrained(self._settings['model'],
                                              device=self._settings['device'])
        self.get_logger().info(f'loaded model {self._settings["model"]!r} in '
                               f'{time.perf_counter() - started:.1f} s')
        return completer

    # ---- receiving ----------------------------------------------------------------------------
    def _match_input_qos(self) -> None:
        """(Re)create the input subscription with the reliability `choose_reliability` picks from
        the publishers on the topic; log every choice."""
        publishers = [
            'reliable' if info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
            else 'best_effort' for info in self.get_publishers_info_by_topic(self._input_topic)]
        wanted, reason = choose_reliability(self._settings['reliability'], publishers,
                                            self.input_reliability)
        if wanted == self.input_reliability:
            return
        if self._subscription is not None:
            self.destroy_subscription(self._subscription)
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=self._settings['depth'],
            durability=DurabilityPolicy.VOLATILE,
            reliability=(ReliabilityPolicy.RELIABLE if wanted == 'reliable'
                         else ReliabilityPolicy.BEST_EFFORT))
        self._subscription = self.create_subscription(PointCloud2, INPUT_TOPIC, self._on_cloud,
                                                      qos)
        self.input_reliability = wanted
        self.get_logger().info(f'input QoS on {self._input_topic}: {wanted}, depth '
                               f'{self._settings["depth"]} ({reason})')

    def _on_cloud(self, msg: PointCloud2) -> None:
        received = time.perf_counter()
        with self.stats.lock:
            self.stats.received += 1
        try:
            points = pointcloud.cloud_to_xyz(msg, max_points=self._settings['max_points'])
        except pointcloud.CloudError as exc:
            self._reject(exc.reason, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a message must never take the node down
            self._reject('bad_message', f'{type(exc).__name__}: {exc}')
            return
        points = self._crop(points)
        if points.shape[0] == 0:
            self._reject('no_points_in_range', 'no finite point between min_range '
                         f'{self._settings["min_range"]} and max_range '
                         f'{self._settings["max_range"]} m')
            return
        if self._slot.put(_Scan(msg.header, points, received)):
            with self.stats.lock:
                self.stats.dropped += 1

    def _crop(self, points: np.ndarray) -> np.ndarray:
        """Apply the min_range / max_range parameters (distance on x, y, z)."""
        low, high = self._settings['min_range'], self._settings['max_range']
        if low <= 0 and high <= 0:
            return points
        dist = np.linalg.norm(points, axis=1)
        keep = dist >= low
        if high > 0:
            keep &= dist <= high
        return points[keep]

    def _reject(self, reason: str, detail: str) -> None:
        with self.stats.lock:
            self.stats.rejected[reason] += 1
            count = self.stats.rejected[reason]
        self._warnings.warn(reason, f'rejected a scan on {self._input_topic}: '
                                    f'{reason}: {detail} ({count} so far)')

    # ---- completing ---------------------------------------------------------------------------
    def _work(self) -> None:
        self._last_status = (0, 'ok')
        if self._settings['warmup']:
            self._warm_up()
        self._free_since = time.perf_counter()  # when the worker last became free
        self.ready.set()
        while not self._stop.is_set():
            scan = self._slot.take()
            if scan is None:
                return
            self._working.set()
            try:
                self._complete(scan)
            finally:
                self._working.clear()

    @property
    def busy(self) -> bool:
        """Whether a scan is being completed or waiting to be (the warm-up counts too)."""
        return not self.ready.is_set() or self._working.is_set() or self._slot.pending

    def _run_model(self, points: np.ndarray, seed: int | None,
                   s: dict[str, Any]) -> np.ndarray:
        kwargs = sampling_settings(s).arguments()
        if self._cancellable:
            kwargs['should_stop'] = self._stop.is_set
        return self._completer.complete(points, seed=seed, **kwargs)

    def _warm_up(self) -> None:
        started = time.perf_counter()
        try:
            self._run_model(warmup_scan(), 0, self._settings)
        except Cancelled:
            self._say_stopping('warm-up cancelled: shutting down')
            return
        except Exception as exc:  # noqa: BLE001 - report it; real scans will try again
            self._last_status = (2, f'warm-up failed: {type(exc).__name__}: {exc}')
            self.get_logger().error(self._last_status[1])
            return
        self.get_logger().info(f'warm-up done in {time.perf_counter() - started:.2f} s')

    def _complete(self, scan: _Scan) -> None:
        s = self._settings
        seed = None if s['seed'] < 0 else s['seed']
        queued = max(0.0, self._free_since - scan.received)  # the model was busy until then
        started = time.perf_counter()
        try:
            completed = np.asarray(self._run_model(scan.points, seed, s), dtype=np.float32)
            model_time = time.perf_counter() - started
            self._note_output_size(len(completed), s)
            completed = self._limit_points(completed, seed)
            self._publisher.publish(pointcloud.make_cloud(completed, scan.header))
        except Cancelled:
            with self.stats.lock:
                self.stats.cancelled += 1
            self._say_stopping('completion cancelled: shutting down')
            return
        except Exception as exc:  # noqa: BLE001 - one failed scan must not stop the next
            with self.stats.lock:
                self.stats.failed += 1
            self._last_status = (2, f'completion failed: {type(exc).__name__}: {exc}')
            self._warnings.warn('failed', f'completion failed: {type(exc).__name__}: {exc}')
            return
        finally:
            self._free_since = time.perf_counter()
        self._last_status = (0, 'ok')
        self.stats.add_timing(self._free_since - scan.received, model_time, queued)

    def _note_output_size(self, points: int, s: dict[str, Any]) -> None:
        """Record the output size and warn (rate-limited) when the model's crop removed most of
        its diffused points: a sampler far from converged scatters them outside the scene, which
        happens at fewer steps than the model was made for (README: output size)."""
        config = getattr(self._completer, 'config', None)
        share = output_share(points, config, bool(s['refine']))
        with self.stats.lock:
            self.stats.output_points, self.stats.output_share = points, share
        if share is None or share >= SHARE_WARNING:
            return
        steps = sampling_settings(s).resolved(config, True).steps
        self._warnings.warn('few_points', (
            f'{points} points: the model kept {share:.0%} of its diffused points (the rest fell '
            f'outside max_range or the scan\'s height band); {steps} steps, the model\'s own is '
            f'{config.steps}: fewer steps leave more points unconverged'))

    def _say_stopping(self, text: str) -> None:
        """Log at shutdown: after a signal the context is down and /rosout cannot take it."""
        if self.context.ok():
            self.get_logger().info(text)
        else:
            print(f'[{self.get_name()}] {text}', file=sys.stderr, flush=True)

    def _limit_points(self, points: np.ndarray, seed: int | None) -> np.ndarray:
        limit = self._settings['points']
        if limit <= 0 or points.shape[0] <= limit:
            return points
        keep = np.random.default_rng(seed).choice(points.shape[0], limit, replace=False)
        return points[np.sort(keep)]

    # ---- reporting ----------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        if self._stop.is_set():  # shutting down: the node's handles may be going away
            return
        summary = self.stats.summary()
        previous, self._previous = self._previous, summary
        level, message = self._last_status
        if level == 0 and not self.ready.is_set():
            level, message = 1, 'warming up'
        elif level == 0 and summary['dropped'] + summary['rejected'] > (
                previous['dropped'] + previous['rejected']):
            level, message = 1, 'dropping or rejecting scans'
        if self._diagnostics is None:
            return
        values = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        values['input_reliability'] = self.input_reliability
        for name in ('latency_ms', 'model_ms', 'queued_ms', 'overhead_ms'):
            for stat, value in summary.get(name, {}).items():
                values[f'{name[:-3]} {stat} [ms]'] = round(value, 2)
        for reason, count in summary['rejected_by_reason'].items():
            values[f'rejected {reason}'] = count
        status = DiagnosticStatus(
            level=bytes([level]), name=f'{self.get_name()}: completion', message=message,
            hardware_id=self.hardware_id,
            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)

    def _log_statistics(self) -> None:
        if self._stop.is_set():
            return
        s = self.stats.summary()
        timing = ''
        if 'latency_ms' in s:
            timing = (f', latency median {s["latency_ms"]["median"]:.0f} ms '
                      f'(p95 {s["latency_ms"]["p95"]:.0f}), model {s["model_ms"]["median"]:.0f} '
                      f'ms, overhead {s["overhead_ms"]["median"]:.1f} ms')
        self.get_logger().info(
            f'{s["completed"]} completed, {s["dropped"]} dropped, {s["rejected"]} rejected, '
            f'{s["failed"]} failed of {s["received"]} received{timing}')

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the worker: a completion or warm-up in progress ends before its next sampler
        step (a completer without `should_stop` is waited for); True once it has ended."""
        self._stop.set()
        self._slot.close()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def destroy_node(self) -> None:
        """Stop the worker (cancelling the completion in progress), then the node."""
        # Also called by rclpy's context clean-up on a node whose __init__ failed half-way.
        if hasattr(self, '_worker') and not self.stop(timeout=0.5):
            self._say_stopping('stopping: waiting for the current sampler step to end')
            self.stop()
        super().destroy_node()


class _StopSignals:
    """SIGINT and SIGTERM for the console script: the first ends the spin (KeyboardInterrupt in
    the main thread; installed before rclpy.init, rclpy's own handler wakes the executor and
    then calls this one), later ones are only noted, so that a second signal (ros2 launch sends
    its own after the terminal's Ctrl-C) cannot interrupt the clean-up with a traceback."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received += 1
        if self.received == 1:
            raise KeyboardInterrupt
        print(f'completion_node: {signal.Signals(signum).name}: already stopping',
              file=sys.stderr, flush=True)

    def ignore_from_now_on(self) -> None:
        """At exit: a late signal must not kill the finishing interpreter (exit code -2)."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def main(args: list[str] | None = None) -> int:
    """Console script `completion_node`: spin the node until Ctrl-C, SIGTERM or shutdown."""
    signals = _StopSignals()
    node = None
    code = 0
    try:
        rclpy.init(args=args)
        node = CompletionNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except UserError as exc:
        print(f'completion_node: error: {exc}', file=sys.stderr)
        code = 2
    except Exception:
        if signals.received == 0 and rclpy.ok():
            raise
        # A signal shut the context down while the node was starting: nothing to report.
    finally:
        try:
            if node is not None:
                node.destroy_node()
            rclpy.try_shutdown()
        finally:
            signals.ignore_from_now_on()
    return code


if __name__ == '__main__':
    sys.exit(main())
