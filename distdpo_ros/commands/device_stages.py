"""The stages of `distdpo bench device` (:mod:`distdpo_ros.commands.bench_device` runs them and
writes the JSON): precision facts, CPU/CUDA accuracy, completion timing, the node's end-to-end
path, host syncs and a training step, with the helpers they share (time budget, peak memory,
a Velodyne-like cloud, BatchNorm calibration of random networks)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distdpo_ros.config import ModelConfig, preset
from distdpo_ros.errors import Cancelled, UserError

EPS_GOAL = 1e-3  # CUDA vs CPU, fp32 (issue 16)
GOALS_FULL_CUDA = {  # issue 16, full scale on a GPU
    'student_8 <= 0.5 s': ('student_8', 0.5),
    'student_1 <= 0.1 s': ('student_1', 0.1),
}
RATIO_GOAL = ('teacher_{t}/student_8 >= 6', 6.0)
COMPARE_TIMESTEPS = (999, 500, 20)
REFINE_TIMESTEP = 20  # the refinement net sees a nearly clean cloud
PACKAGE_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

class Budget:
    """Seconds left of the run; `spent` is what Completer.complete's should_stop asks."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0.0


class OutOfTime(Exception):
    """The budget ran out inside a stage; what the stage measured so far is kept."""


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


_STAGE_PEAK = [0]  # the highest peak of the current stage before its last reset


def reset_peak(device: torch.device, new_stage: bool = False) -> None:
    """Restart torch's peak-memory counter (kept for the stage's own peak, see stage_peak)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        _STAGE_PEAK[0] = (0 if new_stage else
                          max(_STAGE_PEAK[0], int(torch.cuda.max_memory_allocated(device))))
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset; None off CUDA."""
    if device.type != 'cuda':
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def stage_peak(device: torch.device) -> int | None:
    """Peak GPU memory since the stage began, across the resets inside it; None off CUDA."""
    peak = _peak(device)
    return None if peak is None else max(peak, _STAGE_PEAK[0])


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise UserError(f'{option} must be comma-separated integers, got {text!r}') from None
    if not values or min(values) < 1:
        raise UserError(f'{option} needs positive integers, got {text!r}')
    return values


def velodyne_cloud(points: int = 120_000, seed: int = 0) -> dict[str, np.ndarray]:
    """An HDL-64E-like sweep of exactly `points` points: xyz (float32), intensity, ring.

    The street of :func:`distdpo_ros.completion.synthetic_scan` at the azimuth step that gives at
    least `points` returns, thinned to `points` by a seeded choice (scan order kept). Ring is the
    beam index (0 = highest), intensity a seeded uniform value in [0, 1).
    """
    from distdpo_ros.completion import synthetic_scan

    beams = 64
    step = 0.35
    while True:
        scan = synthetic_scan(seed=seed, beams=beams, azimuth_step_deg=step)
        if len(scan) >= points or step < 0.01:
            break
        step *= 0.9 * len(scan) / points
    if len(scan) < points:
        raise UserError(f'cannot make a {points}-point cloud (got {len(scan)})')
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(scan), points, replace=False))
    xyz = np.ascontiguousarray(scan[keep, :3], dtype=np.float32)
    elevation = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
    ring = np.clip(np.round((2.0 - elevation) / (26.8 / (beams - 1))), 0, beams - 1)
    return {'xyz': xyz, 'intensity': rng.random(points, dtype=np.float32),
            'ring': ring.astype(np.uint16)}


@dataclasses.dataclass
class _Header:
    frame_id: str = 'velodyne'


@dataclasses.dataclass
class _PointField:
    name: str
    offset: int
    datatype: int
    count: int


@dataclasses.dataclass
class _PointCloud2:
    """The fields of sensor_msgs/PointCloud2, for machines without the ROS message packages."""

    header: Any
    height: int
    width: int
    fields: list
    is_bigendian: bool
    point_step: int
    row_step: int
    is_dense: bool
    data: np.ndarray


def message_types() -> tuple[type, type, Any, str]:
    """(cloud type, field type, header, description): sensor_msgs when importable, else ours."""
    try:
        from sensor_msgs.msg import PointCloud2, PointField
        from std_msgs.msg import Header
    except ImportError:
        return (_PointCloud2, _PointField, _Header(),
                'stand-in dataclasses with the PointCloud2 fields (sensor_msgs not importable)')
    return PointCloud2, PointField, Header(frame_id='velodyne'), 'sensor_msgs/PointCloud2 (rclpy)'


def calibrate_batchnorm(module: torch.nn.Module, forward: Callable[[], Any]) -> None:
    """Set every BatchNorm's running statistics to those of one `forward()`, then eval mode.

    Freshly initialised sparse convolutions shrink activations about threefold per layer, so a
    random network's encoder output is ~1e-6 and the noise prediction ignores the condition;
    with BatchNorm calibrated on the input every layer works at unit scale, as in a trained
    network, and a CPU/CUDA comparison sees every layer.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    module.train()
    with torch.no_grad():
        forward()
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    module.eval()


def calibrated_networks(config: ModelConfig, scan: torch.Tensor) -> tuple[Any, Any]:
    """Random DiffusionNet (seed 0) and RefineNet (seed 1), BatchNorm calibrated on `scan`.

    scan (1, M, 3) on the networks' device; the diffusion net is calibrated on x_t at t = 500
    (x_init plus seeded noise), the refinement net on x_init.
    """
    from distdpo_ros.completion import initial_cloud
    from distdpo_ros.diffusion import NoiseSchedule
    from distdpo_ros.models import DiffusionNet, RefineNet

    device = scan.device
    torch.manual_seed(0)
    diffusion = DiffusionNet(config).to(device)
    torch.manual_seed(1)
    refine = RefineNet(config).to(device)
    x_init = initial_cloud(scan, config.replication)
    noise = torch.randn(x_init.shape, generator=torch.Generator().manual_seed(0)).to(device)
    x_t = x_init + NoiseSchedule.from_config(config).sigma(500) * noise
    t = torch.full((1,), 500, dtype=torch.long, device=device)
    calibrate_batchnorm(diffusion, lambda: diffusion(x_t, t, diffusion.encode(scan)))
    calibrate_batchnorm(refine, lambda: refine(x_init))
    return diffusion, refine


def bench_bundle(config: ModelConfig, device: torch.device, model: str | None,
            cloud: np.ndarray) -> tuple[Any, str]:
    """A ModelBundle with a refinement net: the checkpoint's, or random (seed 0 / 1)."""
    from distdpo_ros.checkpoint import ModelBundle, load_model
    from distdpo_ros.models import RefineNet

    if model is not None:
        loaded = load_model(model, device)
        refine = loaded.refine
        what = f'{model} (refinement: {"its own" if refine is not None else "random"})'
        if refine is None:
            torch.manual_seed(1)
            refine = RefineNet(loaded.config).to(device).eval()
        return ModelBundle(config=loaded.config, diffusion=loaded.diffusion, refine=refine), what
    from distdpo_ros.completion import preprocess

    scan = torch.from_numpy(preprocess(cloud, config)).to(device)[None]
    diffusion, refine = calibrated_networks(config, scan)
    return (ModelBundle(config=config, diffusion=diffusion, refine=refine),
            'random (seed 0 diffusion, seed 1 refinement), BatchNorm calibrated on the scan')


@contextlib.contextmanager
def _counting_syncs(sites: Counter, count: list[int]) -> Iterator[None]:
    """Count the synchronising CUDA operations inside the block (torch's sync debug mode).

    Each is attributed to the innermost line of this package on the Python stack at that moment.
    """
    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
               line: Any = None) -> None:
        if 'synchroniz' not in str(message):
            return
        count[0] += 1
        where = f'{filename}:{lineno}'
        for frame in reversed(traceback.extract_stack()[:-1]):
            path = Path(frame.filename).resolve()
            if PACKAGE_DIR in path.parents and path.name != Path(__file__).name:
                where = f'{path.relative_to(PACKAGE_DIR.parent)}:{frame.lineno}'
                break
        sites[where] += 1

    with warnings.catch_warnings():
        warnings.simplefilter('always')
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode('warn')
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode('default')


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def precision_facts(device: torch.device) -> dict[str, Any]:
    """What numerics the runtime and training actually use on this device, read from torch."""
    cuda = device.type == 'cuda'
    facts: dict[str, Any] = {
        'float32_matmul_precision': torch.get_float32_matmul_precision(),
        'cuda_matmul_allow_tf32': bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        'cudnn_allow_tf32': bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        'cuda_matmul_allow_bf16_reduced_precision_reduction': (
            bool(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
            if cuda else None),
        # torch >= 2.9 spells the TF32 switches this way too (None where it does not)
        'cuda_matmul_fp32_precision': (getattr(torch.backends.cuda.matmul, 'fp32_precision',
                                               None) if cuda else None),
        'inference_dtype': 'float32',
        'inference_autocast': bool(torch.is_autocast_enabled(device.type)),
        'training_autocast': None,
        'training_precision_rule': None,
    }
    try:
        from distdpo_training.engine import EngineConfig
        from distdpo_training.engine.loop import Engine
    except ImportError as exc:
        facts['training_precision_rule'] = f'unknown: distdpo_training not importable ({exc})'
        return facts
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(device=str(device), tensorboard=False), Path(tmp), {},
                        loop='bench')
        try:
            facts['training_autocast'] = (None if engine.precision is None
                                          else str(engine.precision).removeprefix('torch.'))
            facts['training_precision_rule'] = f'EngineConfig.precision={engine.cfg.precision!r}'
        finally:
            engine.close()
    return facts


def accuracy_stage(out: dict[str, Any], device: torch.device, scale: str,
                   compare_points: int, cloud: np.ndarray, budget: Budget) -> None:
    """Same networks, same input: CUDA fp32 vs CPU fp32, both vs fp64, bf16 autocast vs fp32.

    The float64 reference runs on the fastest device (CUDA when there, else the CPU); float32
    rounding against it is the noise floor a CPU/CUDA difference is read against. Fills `out` as
    it goes; raises OutOfTime between forwards when the budget is spent.
    """
    from distdpo_ros.completion import initial_cloud, preprocess
    from distdpo_ros.diffusion import GuidedDenoiser, NoiseSchedule

    base = preset(scale, 'teacher')
    config = base.replace(scan_points=compare_points or base.scan_points)
    reduced = config.scan_points != base.scan_points
    out.update({
        'scale': scale, 'channel_ratio': config.channel_ratio, 'resolution': config.resolution,
        'points': {'scan': config.scan_points, 'diffused': config.full_points},
        'reduced': reduced,
        'note': (f'the {scale}-scale networks on {config.scan_points} x {config.replication} '
                 f'points instead of {base.scan_points} x {base.replication}: a CPU forward at '
                 'full size takes about a minute' if reduced else "the scale's own point count"),
        'weights': 'random (seed 0 diffusion, seed 1 refinement), BatchNorm calibrated on the '
                   'input (unit-scale activations in every layer)',
        'timesteps': list(COMPARE_TIMESTEPS),
        'guided': {'timestep': 500, 'guidance': base.guidance},
        'refine_input': f'x_t at t = {REFINE_TIMESTEP}',
        'goal': f'max abs CUDA - CPU difference <= {EPS_GOAL:g}: of eps in units of its std (a '
                "trained network's eps has unit std; these random ones do not), of the "
                'refinement offsets (in [-1, 1] m) as they are',
        'reference_device': str(device),
    })
    cpu = torch.device('cpu')
    scan = torch.from_numpy(preprocess(cloud, config))[None]
    net, refine = calibrated_networks(config, scan)
    x_init = initial_cloud(scan, config.replication)
    noise = torch.randn(x_init.shape, generator=torch.Generator().manual_seed(1))
    schedule = NoiseSchedule.from_config(config)
    x_t = {t: x_init + schedule.sigma(t) * noise for t in COMPARE_TIMESTEPS}

    def outputs(run_net: Any, run_refine: Any, on: torch.device, dtype: torch.dtype,
                autocast: bool = False) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        context = (torch.autocast(on.type, dtype=torch.bfloat16) if autocast
                   else contextlib.nullcontext())
        with torch.inference_mode(), context:
            s = scan.to(on, dtype)
            cond = run_net.encode(s)
            for t in COMPARE_TIMESTEPS:
                if budget.spent():
                    raise OutOfTime
                steps = torch.full((1,), t, dtype=torch.long, device=on)
                result[f'eps_t{t}'] = run_net(x_t[t].to(on, dtype), steps, cond).double().cpu()
            if budget.spent():
                raise OutOfTime
            guided = GuidedDenoiser(run_net, s, base.guidance)
            steps = torch.full((1,), 500, dtype=torch.long, device=on)
            result['guided_eps_t500'] = guided(x_t[500].to(on, dtype), steps).double().cpu()
            result['refine'] = run_refine(x_t[REFINE_TIMESTEP].to(on, dtype)).double().cpu()
        return result

    def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float((a[k] - b[k]).abs().max()) for k in a}

    def in_std(diffs: dict[str, float]) -> dict[str, float]:
        return {k: v / out['reference_std'][k] if k != 'refine' else v for k, v in diffs.items()}

    started = time.perf_counter()
    ref32 = outputs(net, refine, cpu, torch.float32)
    out['cpu_fp32_seconds'] = time.perf_counter() - started
    out['reference_max_abs'] = {k: float(v.abs().max()) for k, v in ref32.items()}
    out['reference_std'] = {k: float(v.std()) for k, v in ref32.items()}
    out['finite'] = all(bool(torch.isfinite(v).all()) for v in ref32.values())
    # max |eps_cond - eps_null| at t = 500, from guided = eps_null + w (eps_cond - eps_null):
    # how much the scan's condition moves the prediction (~0 would mean it is not seen)
    out['condition_effect'] = float((ref32['eps_t500'] - ref32['guided_eps_t500']).abs().max()
                                    / abs(1.0 - base.guidance))
    ref64 = outputs(copy.deepcopy(net).double().to(device),
                    copy.deepcopy(refine).double().to(device), device, torch.float64)
    out['cpu_fp32_vs_fp64'] = differences(ref32, ref64)
    out['cpu_fp32_vs_fp64_scaled'] = in_std(out['cpu_fp32_vs_fp64'])
    for key in ('cuda_vs_cpu', 'cuda_vs_cpu_scaled', 'cuda_fp32_vs_fp64_scaled',
                'cuda_autocast_bf16_vs_fp32_scaled', 'max_eps_cuda_vs_cpu', 'met'):
        out[key] = None
    if device.type != 'cuda':
        return
    dev_net, dev_refine = copy.deepcopy(net).to(device), copy.deepcopy(refine).to(device)
    outputs(dev_net, dev_refine, device, torch.float32)  # warm-up (cuBLAS, allocator)
    started = time.perf_counter()
    gpu32 = outputs(dev_net, dev_refine, device, torch.float32)
    out['cuda_fp32_seconds'] = time.perf_counter() - started
    out['cuda_vs_cpu'] = differences(gpu32, ref32)
    out['cuda_vs_cpu_scaled'] = in_std(out['cuda_vs_cpu'])
    out['cuda_fp32_vs_fp64_scaled'] = in_std(differences(gpu32, ref64))
    eps_keys = [k for k in gpu32 if k.startswith('eps_')]
    out['max_eps_cuda_vs_cpu'] = max(out['cuda_vs_cpu_scaled'][k] for k in eps_keys)
    out['met'] = (out['max_eps_cuda_vs_cpu'] <= EPS_GOAL
                  and out['cuda_vs_cpu']['refine'] <= EPS_GOAL)
    out['cuda_autocast_bf16_vs_fp32_scaled'] = in_std(differences(
        outputs(dev_net, dev_refine, device, torch.float32, autocast=True), gpu32))


def completion_stage(out: dict[str, Any], completer: Any, scan: np.ndarray,
                     teacher_steps: int, student_steps: list[int], repeats: int,
                     budget: Budget) -> None:
    """Completer.complete() per setting, round-robin repeats; anchored trajectory too."""
    from distdpo_ros.commands.bench_sampling import anchored_complete, sampler_overhead_per_step

    config, device = completer.config, completer.device
    teacher_guidance = preset(config.scale, 'teacher').guidance
    student_guidance = preset(config.scale, 'student').guidance
    settings = [(f'teacher_{teacher_steps}', teacher_steps, teacher_guidance, False)]
    settings += [(f'student_{s}', s, student_guidance, False) for s in student_steps]
    settings += [(f'student_{s}_refine', s, student_guidance, True) for s in student_steps]
    anchored = [(name, steps, guidance) for name, steps, guidance, refine in settings
                if not refine]
    out.update({'scale': config.scale,
                'points': {'scan': config.scan_points, 'diffused': config.full_points},
                'input': 'the conditioning scan itself (already subsampled), so the times hold '
                         "no farthest point sampling; the node stage's do",
                'guidance': {'teacher': teacher_guidance, 'student': student_guidance},
                'repeats': repeats, 'seconds': {}, 'stage_seconds': {},
                'peak_memory_bytes': {}, 'output_points': {}, 'anchored_seconds': {}})
    completer.complete(scan, steps=1, guidance=student_guidance, refine=True, seed=0)  # warm-up
    _sync(device)
    times: dict[str, list[float]] = {}
    stage_times: dict[str, dict[str, list[float]]] = {}
    anchored_times: dict[str, list[float]] = {}
    for _ in range(repeats):  # round-robin: a change of load hits every setting alike
        for name, steps, guidance, refine in settings:
            if budget.spent():
                raise OutOfTime
            stages: dict[str, float] = {}
            reset_peak(device)
            started = time.perf_counter()
            try:
                cloud = completer.complete(scan, steps=steps, guidance=guidance, refine=refine,
                                           seed=0, timings=stages, should_stop=budget.spent)
            except Cancelled:
                raise OutOfTime from None
            times.setdefault(name, []).append(time.perf_counter() - started)
            out['seconds'][name] = _median(times[name])
            for stage, value in stages.items():
                stage_times.setdefault(name, {}).setdefault(stage, []).append(value)
            out['stage_seconds'][name] = {k: _median(v) for k, v in stage_times[name].items()}
            out['output_points'][name] = int(len(cloud))
            peak = _peak(device)
            previous = out['peak_memory_bytes'].get(name)
            out['peak_memory_bytes'][name] = (None if peak is None
                                              else max(peak, previous or 0))
        for name, steps, guidance in anchored:
            if budget.spent():
                raise OutOfTime
            started = time.perf_counter()
            anchored_complete(completer, scan, steps, guidance, {})
            _sync(device)
            anchored_times.setdefault(name, []).append(time.perf_counter() - started)
            out['anchored_seconds'][name] = _median(anchored_times[name])
    out['sampler_overhead_per_step'] = sampler_overhead_per_step(completer, steps=50, repeats=3)
    _completion_summary(out, teacher_steps, device)


def _completion_summary(out: dict[str, Any], teacher_steps: int, device: torch.device) -> None:
    teacher = f'teacher_{teacher_steps}'
    for key, seconds in (('ratios', out['seconds']), ('anchored_ratios',
                                                      out['anchored_seconds'])):
        out[key] = ({name: seconds[teacher] / value for name, value in seconds.items()
                     if name.startswith('student_')} if teacher in seconds else {})
    full_cuda = device.type == 'cuda' and out['scale'] == 'full' and teacher_steps == 50
    if not full_cuda:
        out['goals'] = None  # the goals are for the full scale on a GPU
        return
    goals: dict[str, Any] = {}
    for trajectory, seconds in (('model', out['seconds']), ('anchored', out['anchored_seconds'])):
        for goal, (name, limit) in GOALS_FULL_CUDA.items():
            if name in seconds:
                goals[f'{trajectory}: {goal}'] = seconds[name] <= limit
        ratio = out['ratios' if trajectory == 'model' else 'anchored_ratios'].get('student_8')
        if ratio is not None:
            goals[f'{trajectory}: ' + RATIO_GOAL[0].format(t=teacher_steps)] = \
                ratio >= RATIO_GOAL[1]
    out['goals'] = goals


def node_stage(out: dict[str, Any], completer: Any, cloud: dict[str, np.ndarray],
               repeats: int, budget: Budget) -> None:
    """One scan through the node's path: PointCloud2 -> numpy -> Completer -> PointCloud2."""
    from distdpo_ros import pointcloud
    from distdpo_ros.node_support import PARAMETERS, sampling_settings

    device = completer.device
    params = {name: spec.default for name, spec in PARAMETERS.items()}
    cloud_type, field_type, header, described = message_types()
    msg = pointcloud.make_cloud(cloud['xyz'], header, {'intensity': cloud['intensity'],
                                                       'ring': cloud['ring']},
                                cloud_type=cloud_type, field_type=field_type)
    arguments = sampling_settings(params).arguments()
    resolved = sampling_settings(params).resolved(completer.config, completer.has_refine)
    out.update({
        'path': 'in process, no DDS: PointCloud2 -> pointcloud.cloud_to_xyz -> the node\'s '
                'range crop -> Completer.complete (node defaults) -> pointcloud.make_cloud',
        'message': described, 'input_points': int(len(cloud['xyz'])),
        'point_step': int(msg.point_step), 'settings': resolved.describe(), 'repeats': repeats,
        'seconds': {}, 'latency_seconds': None, 'peak_memory_bytes': None,
    })
    parts: dict[str, list[float]] = {}
    totals: list[float] = []
    completed = np.zeros((0, 3), np.float32)
    reset_peak(device)
    for index in range(repeats + 1):  # the first run warms up and is not counted
        if budget.spent():
            raise OutOfTime
        stages: dict[str, float] = {}
        started = time.perf_counter()
        xyz = pointcloud.cloud_to_xyz(msg, max_points=params['max_points'])
        converted = time.perf_counter()
        low, high = params['min_range'], params['max_range']
        if low > 0 or high > 0:  # the node's crop (defaults keep everything)
            distance = np.linalg.norm(xyz, axis=1)
            xyz = xyz[(distance >= low) & ((distance <= high) if high > 0 else True)]
        try:
            completed = completer.complete(xyz, seed=params['seed'], timings=stages,
                                           should_stop=budget.spent, **arguments)
        except Cancelled:
            raise OutOfTime from None
        completed_at = time.perf_counter()
        reply = pointcloud.make_cloud(np.asarray(completed, dtype=np.float32), msg.header,
                                      cloud_type=cloud_type, field_type=field_type)
        finished = time.perf_counter()
        if index == 0:
            continue
        totals.append(finished - started)
        measured = {'cloud_to_numpy': converted - started, **stages,
                    'complete_total': completed_at - converted,
                    'numpy_to_cloud': finished - completed_at}
        for key, value in measured.items():
            parts.setdefault(key, []).append(value)
        out['latency_seconds'] = _median(totals)
        out['seconds'] = {k: _median(v) for k, v in parts.items()}
        out['output_points'] = int(reply.width)
    out['peak_memory_bytes'] = _peak(device)
    out['transfer'] = _transfer_times(len(completed), device)


def _transfer_times(points: int, device: torch.device, repeats: int = 5
                    ) -> dict[str, Any] | None:
    """Device->host copy of a completed cloud: .cpu() (pageable) vs a pinned buffer reused."""
    if device.type != 'cuda' or points == 0:
        return None
    data = torch.randn(points, 3, device=device)
    pinned = torch.empty(points, 3, pin_memory=True)
    pageable, into_pinned = [], []
    for _ in range(repeats + 1):
        _sync(device)
        started = time.perf_counter()
        data.cpu().numpy()
        pageable.append(time.perf_counter() - started)
        _sync(device)
        started = time.perf_counter()
        pinned.copy_(data, non_blocking=True)
        _sync(device)
        into_pinned.append(time.perf_counter() - started)
    return {'points': points, 'bytes': points * 12,
            'pageable_seconds': _median(pageable[1:]), 'pinned_seconds': _median(into_pinned[1:])}


def host_sync_stage(out: dict[str, Any], completer: Any, scan: np.ndarray) -> None:
    """Synchronising CUDA operations per sampler loop, guided network call and completion."""
    from distdpo_ros.diffusion import GuidedDenoiser, NoiseSchedule, make_solver, sample_residual

    config, device = completer.config, completer.device
    guidance = preset(config.scale, 'student').guidance
    out['method'] = ("torch.cuda.set_sync_debug_mode('warn'): every synchronising operation "
                     'torch reports, at the innermost line of distdpo_ros on the stack')
    x_init = torch.from_numpy(scan).to(device)[None].repeat(1, config.replication, 1)

    def loop_only() -> None:
        run = make_solver('dpm-solver++', NoiseSchedule.from_config(config), 8)
        sample_residual(lambda x, t: torch.zeros_like(x), x_init, run,
                        torch.Generator(device=device).manual_seed(0))

    with torch.inference_mode():
        denoiser = GuidedDenoiser(completer.bundle.diffusion, x_init[:, :config.scan_points],
                                  guidance)
        x_t = x_init + 0.3 * torch.randn_like(x_init)
        t = torch.full((1,), 500, dtype=torch.long, device=device)
        cases: dict[str, Callable[[], Any]] = {
            'sampler_loop_8_steps_no_network': loop_only,
            'guided_network_call': lambda: denoiser(x_t, t),
            'complete_8_steps': lambda: completer.complete(scan, steps=8, guidance=guidance,
                                                           seed=0),
        }
        for name, case in cases.items():
            case()  # warm-up outside the count
            _sync(device)
            sites: Counter = Counter()
            count = [0]
            with _counting_syncs(sites, count):
                case()
            _sync(device)
            out[name] = {'count': count[0], 'sites': dict(sites.most_common())}


def training_stage(out: dict[str, Any], device: torch.device, scales: list[str], steps: int,
                   cloud: np.ndarray, budget: Budget) -> None:
    """distdpo_training's teacher train_step on a real Engine, batch 2, per scale."""
    from distdpo_ros.completion import preprocess, valid_points
    from distdpo_training.engine import EngineConfig, ModelSpec
    from distdpo_training.engine.loop import Engine
    from distdpo_training.loops.teacher import TeacherConfig, TeacherTask

    out['what'] = ('TeacherTask.train_step (LiDiff objective) on an Engine: batch 2, '
                   'forward + backward + Adam, the engine\'s precision rule; gt = the synthetic '
                   'sweep resampled to K x M points with 1 cm jitter, scan = its preprocessing')
    out['scales'] = {}
    for scale in scales:
        if budget.spent():
            raise OutOfTime
        config = preset(scale, 'teacher')
        rng = np.random.default_rng(0)
        points = valid_points(cloud, config)
        scans, gts = [], []
        for b in range(2):
            shifted = points + np.float32(0.5 * b)
            scans.append(preprocess(shifted, config))
            pick = rng.choice(len(shifted), config.full_points, replace=True)
            gts.append(shifted[pick] + rng.normal(0, 0.01, (config.full_points, 3)))
        batch = {'scan': torch.from_numpy(np.stack(scans)).to(device),
                 'gt': torch.from_numpy(np.stack(gts).astype(np.float32)).to(device)}
        entry: dict[str, Any] = {'batch': 2, 'points': {'scan': config.scan_points,
                                                        'diffused': config.full_points}}
        out['scales'][scale] = entry
        cfg = TeacherConfig(model=ModelSpec(scale=scale, role='teacher'),
                            train=EngineConfig(batch_size=2, device=str(device), seed=0,
                                               tensorboard=False))
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(cfg.train, Path(tmp), {}, loop='bench')
            try:
                task = TeacherTask(cfg)
                task.setup(engine)
                entry['precision'] = ('float32' if engine.precision is None
                                      else str(engine.precision).removeprefix('torch.'))
                entry['parameters'] = sum(p.numel() for p in task.net(engine).parameters())
                seconds: list[float] = []
                losses: list[float] = []
                reset_peak(device)
                for index in range(steps + 1):  # the first step warms up
                    if budget.spent():
                        raise OutOfTime
                    gens = [engine.generator('bench', index, b) for b in range(2)]
                    _sync(device)
                    started = time.perf_counter()
                    logged = task.train_step(engine, batch, gens)
                    _sync(device)
                    if index:
                        seconds.append(time.perf_counter() - started)
                    losses.append(float(logged['loss']))
                    entry['seconds_per_step'] = _median(seconds)
                    entry['warmup_seconds'] = entry.get('warmup_seconds',
                                                        time.perf_counter() - started)
                    entry['losses'] = losses
                    entry['finite'] = all(math.isfinite(v) for v in losses)
                    entry['peak_memory_bytes'] = _peak(device)
            finally:
                engine.close()
