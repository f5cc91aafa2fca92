"""`distdpo bench sampling`: wall time of Completer.complete() at 1, 2, 4, 8 and 50 steps.

Every number is the median of `--repeats` runs in this process, after one warm-up completion, on
the same scan and seed; the settings are run round-robin, so a change in machine load hits all of
them alike. Reported besides the times: their ratios to 50 steps, the fixed per-scan cost
(pre-processing, condition encoding, post-processing) as a fraction of an 8-step completion, the
sampler's own cost per step (solver, noise, residual bookkeeping: the loop with a free denoiser),
and 8-step times with the two savings switched off (the encoder recomputed at every step, the two
guidance branches as two forward passes), to show what each buys.

`--anchored` adds the same measurements on the trajectory a trained model follows. An untrained
network's noise prediction does not match the noise, so its samples drift metres away from the
scan (x0 estimates amplify the residual up to 1/sqrt(abar_999) = 5.8x), and a network step costs
more the farther points are from the scan (the condition lookup leaves its lattice search); its
step time grows during the run and its step-count ratios are not those of a trained model. In the
anchored runs the network still runs at every step on the current points, exactly as in
complete(), but the solver is fed the exact noise of "x_0 = x_init", which keeps the points within
sigma_t of the scan like a trained model's; the network's own prediction is discarded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distdpo_ros.config import SCALES, preset
from distdpo_ros.errors import UserError
from distdpo_ros.settings import SamplingSettings

DEFAULT_STEPS = '1,2,4,8,50'
FIXED_STAGES = ('preprocess', 'encode', 'postprocess')
ABLATIONS = {'encoder_every_step': {'encoder_once': False},
             'separate_guidance_passes': {'batched_guidance': False},
             'both_off': {'encoder_once': False, 'batched_guidance': False}}
GOALS = {'t50/t8 >= 6.0': ('50', '8', 6.0), 't50/t1 >= 40': ('50', '1', 40.0)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default=None,
                        help='checkpoint directory or shipped model name (default: random weights '
                             'of the --scale configuration, student role)')
    parser.add_argument('--scale', choices=SCALES, default='small',
                        help='configuration of the random-weight model (default: small; ignored '
                             'with --model)')
    parser.add_argument('--input', default=None,
                        help='scan file to complete (default: a synthetic 64-beam street scan)')
    parser.add_argument('--steps', default=DEFAULT_STEPS,
                        help=f'comma-separated step counts to time (default: {DEFAULT_STEPS})')
    parser.add_argument('--repeats', type=int, default=3,
                        help='timed runs per setting; the median is reported (default: 3)')
    parser.add_argument('--guidance', type=float, default=None,
                        help="guidance weight (default: the model's own; 0 and 1 need one "
                             'branch only)')
    parser.add_argument('--device', default='auto',
                        help='auto (CUDA when available), cpu or cuda[:N] (default: auto)')
    parser.add_argument('--threads', type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice; 1 is often "
                             'fastest on a CPU shared with other work)')
    parser.add_argument('--anchored', action='store_true',
                        help='also time every setting on the trajectory of a trained model (see '
                             'the module docstring; for untrained weights)')
    parser.add_argument('--no-ablation', action='store_true',
                        help='skip the 8-step runs with the savings switched off')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        raise UserError(f'--steps must be comma-separated integers, got {text!r}') from None
    if not steps or min(steps) < 1:
        raise UserError(f'--steps needs positive step counts, got {text!r}')
    return steps


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{device} ({torch.cuda.get_device_name(device)})'
    return f'cpu ({torch.get_num_threads()} threads, {platform.machine()})'


def _completer(args: argparse.Namespace) -> tuple[Any, str]:
    from distdpo_ros.completion import Completer, resolve_device

    if args.model is not None:
        return Completer.from_pretrained(args.model, device=args.device), str(args.model)
    from distdpo_ros.checkpoint import ModelBundle
    from distdpo_ros.models import DiffusionNet

    config = preset(args.scale, 'student')
    torch.manual_seed(0)
    net = DiffusionNet(config).to(resolve_device(args.device)).eval()
    return Completer(ModelBundle(config=config, diffusion=net)), 'random weights'


def anchored_complete(completer: Any, points: np.ndarray, steps: int, guidance: float,
                      timings: dict[str, float], encoder_once: bool = True,
                      batched_guidance: bool = True) -> np.ndarray:
    """complete() with the solver fed the exact noise of x_0 = x_init (see the module docstring).

    The same stages run on the same device in the same order; only the noise prediction handed
    to the solver differs (the guided network pass runs and its result is discarded).
    """
    from distdpo_ros.completion import StageClock, initial_cloud, postprocess, preprocess
    from distdpo_ros.diffusion import GuidedDenoiser, NoiseSchedule, make_solver, sample_residual

    config, device = completer.config, completer.device
    clock = StageClock(device, timings)
    with torch.inference_mode():
        scan = torch.from_numpy(preprocess(points, config)).to(device)[None]
        schedule = NoiseSchedule.from_config(config)
        run = make_solver('dpm-solver++', schedule, steps)
        clock.lap('preprocess')
        network = GuidedDenoiser(completer.bundle.diffusion, scan, guidance,
                                 batched=batched_guidance, cache_condition=encoder_once)
        clock.lap('encode')
        x_init = initial_cloud(scan, config.replication)
        sigmas = schedule.sigmas_on(device)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            network(x_t, t)
            return (x_t - x_init) / sigmas[t].view(-1, 1, 1)

        generator = torch.Generator(device=device).manual_seed(0)
        raw = sample_residual(denoise, x_init, run, generator, config.init_noise_scale)
        clock.lap('denoise')
        completed = postprocess(raw[0], x_init[0], config.max_range).cpu().numpy()
        clock.lap('postprocess')
    return completed


def sampler_overhead_per_step(completer: Any, steps: int = 50, repeats: int = 3) -> float:
    """Seconds per step of the sampling loop itself (noise, solver update) with a free denoiser."""
    from distdpo_ros.diffusion import NoiseSchedule, make_solver, sample_residual

    config, device = completer.config, completer.device
    x_init = torch.zeros(1, config.full_points, 3, device=device)
    no_noise = torch.zeros_like(x_init)
    schedule = NoiseSchedule.from_config(config)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            run = make_solver('dpm-solver++', schedule, steps)
            generator = torch.Generator(device=device).manual_seed(0)
            started = time.perf_counter()
            sample_residual(lambda x, t: no_noise, x_init, run, generator)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def _summary(seconds: dict[str, float], fixed: list[float], stages: dict[str, list[float]],
             steps_list: list[int]) -> dict[str, Any]:
    """Times, ratios, fixed cost, ablation slowdowns and goals of one trajectory's runs."""
    timed = {str(s): seconds[str(s)] for s in steps_list}
    fixed_seconds = statistics.median(fixed)
    out: dict[str, Any] = {
        'seconds': timed,
        'ratios_to_50': {k: timed['50'] / v for k, v in timed.items()} if '50' in timed else None,
        'fixed_seconds': fixed_seconds,
        'fixed_stage_seconds': {s: statistics.median(stages.get(s, [0.0])) for s in FIXED_STAGES},
    }
    if '8' in timed:
        out['fixed_fraction_of_8_steps'] = fixed_seconds / timed['8']
        ablations = {name: {'seconds': seconds[name], 'slowdown': seconds[name] / timed['8']}
                     for name in ABLATIONS if name in seconds}
        if ablations:
            out['savings_off_8_steps'] = ablations
    if '8' in timed and '50' in timed:
        out['seconds_per_step'] = (timed['50'] - timed['8']) / 42
    out['goals'] = {goal: timed[a] / timed[b] >= limit
                    for goal, (a, b, limit) in GOALS.items() if a in timed and b in timed}
    if '8' in timed:
        out['goals']['fixed < 10% of 8 steps'] = out['fixed_fraction_of_8_steps'] < 0.10
    return out


def run(args: argparse.Namespace) -> int:
    from distdpo_ros.completion import synthetic_scan
    from distdpo_ros.pointio import read_points

    steps_list = _steps_list(args.steps)
    if args.repeats < 1:
        raise UserError(f'--repeats must be at least 1, got {args.repeats}')
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f'--threads must be at least 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    scan = read_points(args.input) if args.input else synthetic_scan()
    completer, model_name = _completer(args)
    config = completer.config
    guidance = SamplingSettings(guidance=args.guidance).resolved(config).guidance

    def model_run(steps: int, stages: dict[str, float], **switches: bool) -> None:
        completer.complete(scan, steps=steps, guidance=guidance, seed=0, timings=stages,
                           **switches)

    def anchored_run(steps: int, stages: dict[str, float], **switches: bool) -> None:
        anchored_complete(completer, scan, steps, guidance, stages, **switches)

    trajectories: dict[str, Callable[..., None]] = {'model': model_run}
    if args.anchored:
        trajectories['anchored'] = anchored_run
    settings = [(str(s), s, {}) for s in steps_list]
    if not args.no_ablation:
        settings += [(name, 8, switches) for name, switches in ABLATIONS.items()]
    for function in trajectories.values():
        function(1, {})  # warm-up: allocations, lazy initialisation
    totals: dict[tuple[str, str], list[float]] = {}
    fixed: dict[str, list[float]] = {name: [] for name in trajectories}
    stages: dict[str, dict[str, list[float]]] = {name: {} for name in trajectories}
    progress = tqdm(total=len(settings) * len(trajectories) * args.repeats, unit='run',
                    desc='bench sampling', file=sys.stderr)
    for _ in range(args.repeats):  # round-robin: load changes hit every setting alike
        for trajectory, function in trajectories.items():
            for name, steps, switches in settings:
                measured: dict[str, float] = {}
                started = time.perf_counter()
                function(steps, measured, **switches)
                totals.setdefault((trajectory, name), []).append(time.perf_counter() - started)
                if not switches:
                    fixed[trajectory].append(sum(measured.get(s, 0.0) for s in FIXED_STAGES))
                    for stage, value in measured.items():
                        stages[trajectory].setdefault(stage, []).append(value)
                progress.update()
    progress.close()

    def seconds_of(trajectory: str) -> dict[str, float]:
        return {name: statistics.median(totals[(trajectory, name)]) for name, _, _ in settings}

    result: dict[str, Any] = {
        'device': _device_name(completer.device),
        'scale': config.scale,
        'model': model_name,
        'input': args.input or 'synthetic 64-beam street scan',
        'points': {'scan': config.scan_points, 'diffused': config.full_points},
        'guidance': guidance,
        'repeats': args.repeats,
        **_summary(seconds_of('model'), fixed['model'], stages['model'], steps_list),
        'sampler_overhead_per_step': sampler_overhead_per_step(completer),
    }
    if args.anchored:
        result['anchored'] = _summary(seconds_of('anchored'), fixed['anchored'],
                                      stages['anchored'], steps_list)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f'{result["device"]}, {result["scale"]} scale, {result["model"]}, guidance '
          f'{result["guidance"]:g}, median of {result["repeats"]}')
    print(f'  sampler overhead per step: {1e3 * result["sampler_overhead_per_step"]:.2f} ms')
    sections = [('complete()', result)]
    if 'anchored' in result:
        sections.append(('anchored trajectory', result['anchored']))
    for title, section in sections:
        print(f' {title}:')
        ratios = section['ratios_to_50'] or {}
        for steps, value in section['seconds'].items():
            ratio = f'   t50/t{steps} = {ratios[steps]:.2f}' if steps in ratios else ''
            print(f'  {steps:>3} steps: {value:8.3f} s{ratio}')
        if 'fixed_fraction_of_8_steps' in section:
            print(f'  fixed per-scan cost: {section["fixed_seconds"]:.3f} s = '
                  f'{100 * section["fixed_fraction_of_8_steps"]:.1f} % of 8 steps')
        for name, entry in section.get('savings_off_8_steps', {}).items():
            print(f'  8 steps, {name}: {entry["seconds"]:.3f} s ({entry["slowdown"]:.2f}x)')
        for goal, met in section['goals'].items():
            print(f'  goal {goal}: {"met" if met else "NOT met"}')
