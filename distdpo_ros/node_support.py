"""The completion node's parts that need no ROS: names, parameters, the newest-scan mailbox,
rate-limited warnings and statistics. Importable (and tested) without rclpy."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from distdpo_ros import pointcloud
from distdpo_ros.config import SAMPLERS
from distdpo_ros.errors import UserError
from distdpo_ros.settings import SamplingSettings

NODE_NAME = 'distdpo_completion'
INPUT_TOPIC = '/velodyne_points'
OUTPUT_TOPIC = '/distdpo/completed_points'
REJECT_REASONS = pointcloud.REASONS + ('no_points_in_range',)


class CompleterLike(Protocol):
    """What the node needs from a model: distdpo_ros.completion.Completer or a test double.

    A `complete` that also takes `should_stop` (a callable asked before every sampler step) is
    cancelled by the node at shutdown; one without it is waited for."""

    def complete(self, points: np.ndarray, steps: int | None = None,
                 guidance: float | None = None, refine: bool = False,
                 seed: int | None = None) -> np.ndarray: ...


@dataclass
class Param:
    """One node parameter: default, description, whether it changes at run time, numeric range.

    `read_only` parameters say why in their description (shown by `ros2 param describe`);
    `constraints` is shown there too. A range is given as `low`/`high` (both or neither)."""

    default: Any
    description: str
    read_only: bool = True
    low: float | None = None
    high: float | None = None
    constraints: str = ''


RESTART = 'read-only: restart the node to change it'
RELIABILITIES = ('auto', 'reliable', 'best_effort')
INT32_MAX = 2**31 - 1

# The node's parameters; config/completion.yaml carries the same defaults (a test checks it).
# Writable ones take effect from the next scan. The steps range is narrowed to the loaded model's
# (SamplingSettings.resolved decides; the node checks every change with it).
PARAMETERS: dict[str, Param] = {
    'model': Param('default', 'checkpoint directory, or a shipped model name ("default"); '
                   f'{RESTART} (the model is loaded once, at start)'),
    'device': Param('auto', 'auto (cuda when available), cpu or cuda[:N]; '
                    f'{RESTART} (the model is loaded once, at start)'),
    'steps': Param(0, "sampler steps per scan; 0: the model's own", False, 0, 999,
                   "0, or 1 up to the most the model's sampler takes (num_train_timesteps - 1, "
                   'or t_start for a variance-exploding sampler; the loaded model\'s)'),
    'guidance': Param(-1.0, "classifier-free guidance weight; -1: the model's own", False,
                      constraints='-1, or a finite number >= 0'),
    'refine': Param(False, 'run the x6 refinement network after sampling (a model with '
                    'refinement weights)', False),
    'sampler': Param('', "sampler; empty: the model's own", False,
                     constraints="'', or " + ' | '.join(SAMPLERS)),
    'points': Param(0, 'publish at most this many points, a seeded random subset (0: all)',
                    False, 0, INT32_MAX),
    'min_range': Param(0.0, 'drop input points closer than this [m] (0: keep)', False,
                       0.0, 1000.0, 'smaller than max_range when both are set'),
    'max_range': Param(0.0, 'drop input points farther than this [m] (0: keep)', False,
                       0.0, 1000.0, 'larger than min_range when both are set'),
    'seed': Param(0, 'sampler seed; -1 draws a new one for every scan', False, -1, INT32_MAX),
    'reliability': Param('auto', 'input QoS reliability: auto (reliable when every publisher '
                         'on the topic is, else best effort; re-checked every second), '
                         f'reliable or best_effort; {RESTART}',
                         constraints=' | '.join(RELIABILITIES)),
    'depth': Param(2, f'input QoS queue depth; {RESTART} (the QoS of a subscription is fixed)',
                   True, 1, 100),
    'max_points': Param(pointcloud.MAX_POINTS, 'reject input clouds with more points', False,
                        1, INT32_MAX),
    'warmup': Param(True, 'complete a synthetic scan at start so the first real one is fast; '
                    'read-only (it runs once, at start)'),
    'diagnostics_period': Param(1.0, 'seconds between /diagnostics messages (wall clock, also '
                                f'with use_sim_time); {RESTART} (timers are made at start)',
                                True, 0.1, 60.0),
    'log_period': Param(10.0, 'seconds between statistics log lines (0: never; wall clock); '
                        f'{RESTART} (timers are made at start)', True, 0.0, 3600.0),
    'warn_period': Param(5.0, 'at most one warning per reject reason in this many seconds',
                         False, 0.0, 3600.0),
}


PIP_STEP = 'python3 -m pip install "torch>=2.1" "safetensors>=0.4"'


def check_runtime_dependencies() -> None:
    """UserError naming what a ROS install (rosdep) left out: safetensors has no rosdep key and
    python3-torch may be older than 2.1 (Debian 12: 1.13). The README gives the same step."""
    from importlib import metadata

    problems = []
    try:
        version = metadata.version('torch')
        if tuple(int(part) for part in version.split('+')[0].split('.')[:2]) < (2, 1):
            problems.append(f'torch {version} is older than 2.1')
    except metadata.PackageNotFoundError:
        problems.append('torch is not installed')
    except ValueError:  # an unusual version string: the import will tell
        pass
    try:
        metadata.version('safetensors')
    except metadata.PackageNotFoundError:
        problems.append('safetensors is not installed')
    if problems:
        raise UserError('; '.join(problems) + f': {PIP_STEP} (README: "The package in a ROS 2 '
                        'workspace")')


def sampling_settings(parameters: dict[str, Any]) -> SamplingSettings:
    """The sampling settings of the node's parameters (steps 0 / guidance -1 / sampler '': the
    model's own)."""
    return SamplingSettings.from_parameters(parameters['steps'], parameters['guidance'],
                                            parameters['refine'], parameters['sampler'] or None)


def max_steps(config: Any) -> int:
    """The largest `steps` that SamplingSettings.resolved accepts for the model `config` (its
    sampler's range: below num_train_timesteps, at most t_start for the variance-exploding ones);
    every number from 1 up to it is accepted."""
    def accepted(steps: int) -> bool:
        try:
            SamplingSettings(steps).resolved(config)
        except UserError:
            return False
        return True

    low, high = 1, int(config.num_train_timesteps) - 1
    if not accepted(low):
        return 0
    while low < high:  # the accepted steps are 1..max: bisect for max
        middle = (low + high + 1) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle - 1)
    return low


def choose_reliability(setting: str, publishers: Sequence[str],
                       current: str | None = None) -> tuple[str, str]:
    """The input reliability to use and why, from the `reliability` parameter and the
    reliability ('reliable' or 'best_effort') of every publisher found on the topic.

    `auto` follows the publishers as `ros2 bag record` does: reliable when every one is reliable
    (nothing lost in transport; a reliable subscription never matches a best-effort publisher),
    best effort when any is best effort (it matches both). With no publisher it keeps `current`,
    or starts best effort, which connects to whatever appears.
    """
    if setting != 'auto':
        return setting, 'parameter reliability'
    if not publishers:
        if current is not None:
            return current, 'no publisher at the moment; kept'
        return 'best_effort', 'no publisher yet; re-checked every second'
    best_effort = sum(p != 'reliable' for p in publishers)
    if not best_effort:
        return 'reliable', f'auto: {len(publishers)} reliable publisher(s)'
    return 'best_effort', (f'auto: {best_effort} of {len(publishers)} publisher(s) best effort'
                           + ('; the reliable ones are then received best effort'
                              if best_effort < len(publishers) else ''))


def output_share(points: int, config: Any, refine: bool) -> float | None:
    """The share of the model's diffused points that survived its post-processing crop
    (points outside max_range or the scan's height band are removed), or None without a config.
    """
    full = getattr(config, 'full_points', None)
    if not full:
        return None
    up = int(getattr(config, 'refine_up_factor', 1) or 1) if refine else 1
    return points / (full * up)


class LatestSlot:
    """A one-item mailbox: `put` replaces what is waiting, `take` blocks for the next item."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False

    def put(self, item: Any) -> bool:
        """Store `item`; return True when it replaced an item nobody had taken yet."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The waiting item (removing it), or None on timeout or after close()."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return None if self._closed else item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        with self._cond:
            return self._item is not None


class RateLimitedWarnings:
    """At most one log call per key and period; the next one says how many were suppressed."""

    def __init__(self, log: Callable[[str], Any], period: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self.period, self._clock = log, period, clock  # period may change
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warn(self, key: str, text: str) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._suppressed[key] += 1
            return False
        extra = self._suppressed.pop(key, 0)
        self._last[key] = now
        self._log(text + (f' ({extra} similar warnings suppressed)' if extra else ''))
        return True


@dataclass
class Stats:
    """Counters and a window of recent timings (seconds), shared by the callback and the worker."""

    window: int = 200
    received: int = 0
    completed: int = 0
    dropped: int = 0
    failed: int = 0
    cancelled: int = 0  # completions stopped by shutdown
    output_points: int = 0  # of the last completion, before the `points` cap
    output_share: float | None = None  # of the model's diffused points, last completion
    rejected: Counter[str] = field(default_factory=Counter)
    latency: deque[float] = field(default_factory=deque)  # receive -> publish
    model: deque[float] = field(default_factory=deque)  # inside complete()
    queued: deque[float] = field(default_factory=deque)  # waiting for an earlier scan to finish
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_timing(self, latency: float, model: float, queued: float) -> None:
        with self.lock:
            self.completed += 1
            for values, value in ((self.latency, latency), (self.model, model),
                                  (self.queued, queued)):
                values.append(value)
                if len(values) > self.window:
                    values.popleft()

    def summary(self) -> dict[str, Any]:
        """Totals and median/p95/max of the recent window (milliseconds).

        latency = queued + model + overhead: `queued` is the time a scan waited for the model to
        finish an earlier one, `overhead` the node's own work (reading, waking the worker,
        packing and publishing the result)."""
        with self.lock:
            out: dict[str, Any] = {
                'received': self.received, 'completed': self.completed,
                'dropped': self.dropped, 'failed': self.failed,
                'cancelled': self.cancelled, 'output_points': self.output_points,
                'rejected': sum(self.rejected.values()),
                'rejected_by_reason': dict(self.rejected)}
            if self.output_share is not None:
                out['output_share'] = round(self.output_share, 4)
            latency, model = np.array(self.latency), np.array(self.model)
            queued = np.array(self.queued)
        for name, values in (('latency', latency), ('model', model), ('queued', queued),
                             ('overhead', latency - model - queued)):
            if values.size:
                out[f'{name}_ms'] = {'median': float(np.median(values) * 1e3),
                                     'p95': float(np.percentile(values, 95) * 1e3),
                                     'max': float(values.max() * 1e3)}
        return out


def warmup_scan(seed: int = 0, n: int = 4000) -> np.ndarray:
    """A plausible street-like scan (ground ring, two walls) to warm the model up."""
    rng = np.random.default_rng(seed)
    radius = rng.uniform(4.0, 25.0, n)
    angle = rng.uniform(-np.pi, np.pi, n)
    ground = np.stack([radius * np.cos(angle), radius * np.sin(angle),
                       np.full(n, -1.73) + rng.normal(0, 0.02, n)], axis=1)
    wall_x = rng.uniform(-25, 25, n // 4)
    wall_z = rng.uniform(-1.7, 2.0, n // 4)
    walls = np.concatenate([np.stack([wall_x, np.full_like(wall_x, side), wall_z], axis=1)
                            for side in (-8.0, 8.0)])
    return np.concatenate([ground, walls]).astype(np.float32)


