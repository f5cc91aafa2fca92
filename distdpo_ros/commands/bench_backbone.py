"""`distdpo bench backbone`: forward time of the noise predictor (MinkUNetDiff) on a full scan.

The scan (a file given with --scan, else the built-in synthetic street scan) is cropped and
subsampled as the Completer does, tiled K times and noised to the level of each timestep measured.
Each measurement is the classifier-free-guidance call the sampler makes: one batched forward of the
conditional and the unconditional branch (B = 2, one shared voxelisation). Reported per scale and
timestep: voxel count, median wall time and process CPU time of ``--runs`` runs after a warm-up;
optionally a training step (forward + backward of encoder and UNet on a batch of different clouds,
then an Adam step) and, when MinkowskiEngine imports, its time on the same voxels and the ratio.

``--baseline REF`` measures the package as it was at git revision REF in the same process: its
tree is extracted into a temporary folder as ``distdpo_ros_baseline``, its networks get this run's
weights, and every measurement alternates between the two implementations on the same inputs
(before/after ratios from one run, robust to load that drifts during it). The largest difference
between the two outputs (and, for the training step, the loss) is reported beside the times.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distdpo_ros.config import SCALES, preset
from distdpo_ros.errors import UserError

DEFAULT_STEPS = '999,750,500,250,20'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--scan', default=None, metavar='PATH',
                        help='scan file (.bin .ply .pcd .npy) to tile like the reference; '
                             'default: the built-in synthetic street scan')
    parser.add_argument('--scales', default='full,small', metavar='LIST',
                        help=f'comma-separated scales from {SCALES} (default: full,small); '
                             'full on a CPU takes about a minute per measured forward')
    parser.add_argument('--device', default='auto',
                        help='auto (CUDA when available, else CPU), cpu, cuda or cuda:N '
                             '(default: auto)')
    parser.add_argument('--runs', type=int, default=3,
                        help='timed runs per measurement after one warm-up (default: 3)')
    parser.add_argument('--timesteps', default=DEFAULT_STEPS, metavar='LIST',
                        help=f'diffusion steps t whose noise level is measured (default: '
                             f'{DEFAULT_STEPS})')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s own choice)')
    parser.add_argument('--train', action='store_true',
                        help='also time a training step (forward + backward + Adam step) on '
                             'a batch of --train-batch different clouds at t = 500')
    parser.add_argument('--train-batch', type=int, default=2,
                        help='batch size of the training step (default: 2)')
    parser.add_argument('--baseline', default=None, metavar='REF',
                        help='also time the package at git revision REF (e.g. main), '
                             'alternating with this one on the same inputs and weights, and '
                             'report the speed-up (needs git and a checkout)')
    parser.add_argument('--seed', type=int, default=0, help='noise seed (default: 0)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def _scan(path: str | None) -> np.ndarray:
    from distdpo_ros.completion import synthetic_scan

    if path is None:
        return synthetic_scan()
    from distdpo_ros.pointio import read_points

    return read_points(path)


def _timed(fn: Callable[[], Any], runs: int, device: torch.device) -> dict[str, float]:
    """Median wall and process-CPU seconds of `runs` calls after one warm-up call."""
    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    fn()
    sync()
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {'wall_s': round(statistics.median(walls), 4),
            'cpu_s': round(statistics.median(cpus), 4)}


def _timed_pair(fn: Callable[[], Any], baseline: Callable[[], Any], runs: int,
                device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """`_timed` of two functions, alternating (a b, b a, a b, ...) after one warm-up each."""
    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    fns = {'new': fn, 'baseline': baseline}
    walls: dict[str, list[float]] = {'new': [], 'baseline': []}
    cpus: dict[str, list[float]] = {'new': [], 'baseline': []}
    for f in fns.values():
        f()
        sync()
    for i in range(runs):
        for name in (('new', 'baseline') if i % 2 == 0 else ('baseline', 'new')):
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    out = tuple({'wall_s': round(statistics.median(walls[n]), 4),
                 'cpu_s': round(statistics.median(cpus[n]), 4)} for n in ('new', 'baseline'))
    return out[0], out[1]


def load_baseline(ref: str) -> ModuleType:
    """The package ``distdpo_ros`` at git revision ``ref``, imported as ``distdpo_ros_baseline``.

    The tree comes from ``git archive`` of the checkout this module lives in, is extracted into a
    temporary folder and has its absolute imports renamed, so both versions load side by side.
    """
    name = 'distdpo_ros_baseline'
    if name in sys.modules:
        raise UserError('a baseline package is already loaded in this process')
    root = Path(__file__).resolve().parents[2]
    try:
        tree = subprocess.run(['git', '-C', str(root), 'archive', ref, 'distdpo_ros'],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, 'stderr', b'') or b''
        raise UserError(f'--baseline {ref}: cannot read the package at that revision from the '
                        f'checkout at {root} ({detail.decode().strip() or exc})') from None
    folder = Path(tempfile.mkdtemp(prefix='distdpo-baseline-'))
    atexit.register(shutil.rmtree, folder, True)
    with tarfile.open(fileobj=io.BytesIO(tree)) as archive:
        archive.extractall(folder, filter='data')
    package = folder / name
    (folder / 'distdpo_ros').rename(package)
    for source in package.rglob('*.py'):
        source.write_text(re.sub(r'\bdistdpo_ros\b', name, source.read_text()))
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def measure_scale(scale: str, raw_scan: np.ndarray, device: torch.device, args: Any,
                  progress: tqdm, baseline: ModuleType | None = None) -> dict[str, Any]:
    """All measurements of one scale (random weights: timing does not depend on their values)."""
    from distdpo_ros.completion import initial_cloud, preprocess
    from distdpo_ros.diffusion import NoiseSchedule
    from distdpo_ros.models import Condition, DiffusionNet
    from distdpo_ros.sparse import minkowski, quantize

    config = preset(scale)
    torch.manual_seed(args.seed)
    net = DiffusionNet(config).to(device).eval()
    scan = torch.from_numpy(preprocess(raw_scan, config, 'scan')).to(device)[None]
    x_init = initial_cloud(scan, config.replication)
    schedule = NoiseSchedule.from_config(config)
    twin = minkowski.to_minkowski(net.denoiser).eval() if minkowski.available() else None
    old = old_models = None
    if baseline is not None:
        old_models = importlib.import_module(baseline.__name__ + '.models')
        old_config = importlib.import_module(baseline.__name__ + '.config').preset(scale)
        old = old_models.DiffusionNet(old_config).to(device).eval()
        old.load_state_dict(net.state_dict())
    result: dict[str, Any] = {
        'scale': scale, 'channel_ratio': config.channel_ratio, 'resolution': config.resolution,
        'scan_points': config.scan_points, 'points': config.full_points,
        'max_range': config.max_range, 'batch': 2, 'timesteps': []}
    with torch.inference_mode():
        both = Condition.cat([net.encode(scan), net.null_condition(1)])
        result['condition_voxels'] = int((both.batch == 0).sum())
        if old is not None:
            old_both = old_models.Condition.cat([old.encode(scan), old.null_condition(1)])
        for t in _steps(args.timesteps, config.num_train_timesteps):
            progress.set_description(f'{scale} t={t}')
            x_t = x_init + schedule.sigma(t) * torch.randn(x_init.shape, device=device)
            pair, steps = x_t.expand(2, -1, -1), torch.full((2,), t, device=device)
            voxels, _ = quantize(x_t, config.resolution)
            entry = {'t': t, 'sigma': round(schedule.sigma(t), 4),
                     'voxels': voxels.num_voxels}
            if old is None:
                entry.update(_timed(partial(net, pair, steps, both), args.runs, device))
            else:
                ours, theirs = _timed_pair(partial(net, pair, steps, both),
                                           partial(old, pair, steps, old_both), args.runs, device)
                entry.update(ours)
                entry['baseline_wall_s'], entry['baseline_cpu_s'] = (theirs['wall_s'],
                                                                     theirs['cpu_s'])
                entry['speedup_vs_baseline'] = round(theirs['wall_s'] / ours['wall_s'], 3)
                entry['speedup_vs_baseline_cpu'] = round(theirs['cpu_s'] / ours['cpu_s'], 3)
                entry['max_abs_diff_vs_baseline'] = float(
                    (net(pair, steps, both) - old(pair, steps, old_both)).abs().max())
            if twin is not None:
                me = _timed(partial(minkowski.minkowski_forward, twin, pair, both, steps,
                                    config.resolution), args.runs, device)
                entry['minkowski_wall_s'] = me['wall_s']
                entry['speedup_vs_minkowski'] = round(me['wall_s'] / entry['wall_s'], 3)
            result['timesteps'].append(entry)
            progress.update()
    result['mean_wall_s'] = round(statistics.fmean(e['wall_s'] for e in result['timesteps']), 4)
    result['mean_cpu_s'] = round(statistics.fmean(e['cpu_s'] for e in result['timesteps']), 4)
    if args.train:
        progress.set_description(f'{scale} training step')
        result['train_step'] = _train_step(net, scan, x_init, schedule, args, device, old)
        progress.update()
    return result


def _train_step(net: Any, scan: torch.Tensor, x_init: torch.Tensor, schedule: Any, args: Any,
                device: torch.device, old: Any = None) -> dict[str, Any]:
    """Forward + backward of encoder and UNet on `train_batch` different noisy clouds at t=500,
    then an Adam step (lr 1e-5, so the weights barely move between runs)."""
    batch = args.train_batch
    scans = scan.expand(batch, -1, -1)
    x_t = x_init.expand(batch, -1, -1) + schedule.sigma(500) * torch.randn(
        (batch, *x_init.shape[1:]), device=device)
    steps = torch.full((batch,), 500, device=device)

    def stepper(model: Any) -> Callable[[], torch.Tensor]:
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step() -> torch.Tensor:
            optimiser.zero_grad(set_to_none=True)
            loss = model(x_t, steps, model.encode(scans)).square().mean()
            loss.backward()
            optimiser.step()
            return loss.detach()
        return step

    nets = [net] if old is None else [net, old]
    for model in nets:
        model.train()
    try:
        if old is None:
            return {'batch': batch, **_timed(stepper(net), args.runs, device)}
        # the loss of the first step (same weights, same input) for the equivalence check
        old.load_state_dict(net.state_dict())
        ours_step, theirs_step = stepper(net), stepper(old)
        with torch.no_grad():
            before = {k: v.clone() for k, v in net.state_dict().items()}
        loss_diff = float((ours_step() - theirs_step()).abs())
        net.load_state_dict(before)
        old.load_state_dict(before)
        ours, theirs = _timed_pair(ours_step, theirs_step, args.runs, device)
        return {'batch': batch, **ours, 'baseline_wall_s': theirs['wall_s'],
                'baseline_cpu_s': theirs['cpu_s'],
                'speedup_vs_baseline': round(theirs['wall_s'] / ours['wall_s'], 3),
                'speedup_vs_baseline_cpu': round(theirs['cpu_s'] / ours['cpu_s'], 3),
                'loss_abs_diff_vs_baseline': loss_diff}
    finally:
        for model in nets:
            model.eval()


def _steps(text: str, limit: int) -> list[int]:
    try:
        steps = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        raise UserError(f'--timesteps must be comma-separated integers, got {text!r}') from None
    if not steps or any(not 0 <= s < limit for s in steps):
        raise UserError(f'--timesteps must lie in [0, {limit}), got {text!r}')
    return steps


def run(args: argparse.Namespace) -> int:
    scales = [s.strip() for s in args.scales.split(',') if s.strip()]
    unknown = [s for s in scales if s not in SCALES]
    if unknown or not scales:
        raise UserError(f'--scales must name scales from {SCALES}, got {args.scales!r}')
    if args.runs < 1 or args.train_batch < 1:
        raise UserError('--runs and --train-batch must be at least 1')
    if args.threads is not None and args.threads < 1:
        raise UserError('--threads must be at least 1')
    previous_threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        report = _measure_all(scales, args)
    finally:
        torch.set_num_threads(previous_threads)  # callers in the same process keep theirs
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _measure_all(scales: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from distdpo_ros.completion import resolve_device
    from distdpo_ros.sparse import minkowski

    device = resolve_device(args.device)
    raw_scan = _scan(args.scan)
    baseline = load_baseline(args.baseline) if args.baseline else None
    steps = _steps(args.timesteps, preset('full').num_train_timesteps)
    progress = tqdm(total=len(scales) * (len(steps) + int(args.train)), file=sys.stderr,
                    unit='measurement', desc='bench backbone')
    report: dict[str, Any] = {
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else
        f'cpu ({platform.processor() or platform.machine()})',
        'torch': torch.__version__, 'threads': torch.get_num_threads(),
        'load_average': [round(v, 2) for v in os.getloadavg()],
        'scan': args.scan or 'synthetic', 'minkowski_engine': minkowski.available(),
        'baseline': args.baseline,
        'results': [measure_scale(s, raw_scan, device, args, progress, baseline)
                    for s in scales]}
    progress.close()
    report['load_average_after'] = [round(v, 2) for v in os.getloadavg()]
    return report


def _print_table(report: dict[str, Any]) -> None:
    print(f"device {report['device']}, torch {report['torch']}, {report['threads']} threads, "
          f"load average {report['load_average']}, scan {report['scan']}")
    for r in report['results']:
        print(f"{r['scale']}: ratio {r['channel_ratio']}, {r['points']} points, "
              f"{r['resolution']} m voxels, guided batch of 2")
        for e in r['timesteps']:
            extra = (f", MinkowskiEngine {e['minkowski_wall_s']:.3f} s "
                     f"(x{e['speedup_vs_minkowski']})" if 'minkowski_wall_s' in e else '')
            if 'baseline_wall_s' in e:
                extra += (f", baseline {report['baseline']} {e['baseline_wall_s']:.3f} s "
                          f"(x{e['speedup_vs_baseline']})")
            print(f"  t={e['t']:4d} voxels {e['voxels']:7d}  {e['wall_s']:.3f} s wall, "
                  f"{e['cpu_s']:.3f} s cpu{extra}")
        print(f"  mean {r['mean_wall_s']:.3f} s wall")
        if 'train_step' in r:
            ts = r['train_step']
            extra = (f", baseline {report['baseline']} {ts['baseline_wall_s']:.3f} s "
                     f"(x{ts['speedup_vs_baseline']})" if 'baseline_wall_s' in ts else '')
            print(f"  training step (batch {ts['batch']}): {ts['wall_s']:.3f} s wall, "
                  f"{ts['cpu_s']:.3f} s cpu{extra}")
