"""`distdpo bench sampling`: wall time of Completer.complete() at 1, 2, 4, 8 and 50 steps.

Every number is the median of `--repeats` runs in this process, after one warm-up completion, on
the same scan and seed. Reported besides the times: their ratios to 50 steps, the fixed per-scan
cost (pre-processing, condition encoding, post-processing) as a fraction of an 8-step completion,
and 8-step times with the two savings of the sampler switched off (the encoder recomputed at every
step, the two guidance branches as two forward passes), to show what each buys.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from distdpo_ros.config import SCALES, preset
from distdpo_ros.errors import UserError

DEFAULT_STEPS = '1,2,4,8,50'
FIXED_STAGES = ('preprocess', 'encode', 'postprocess')
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
                        help='CPU threads for torch (default: torch\'s own choice; 1 is often '
                             'fastest on a CPU shared with other work)')
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
    guidance = config.guidance if args.guidance is None else args.guidance

    def timed(steps: int, **switches: bool) -> tuple[float, dict[str, float]]:
        stages: dict[str, float] = {}
        started = time.perf_counter()
        completer.complete(scan, steps=steps, guidance=guidance, seed=0, timings=stages,
                           **switches)
        return time.perf_counter() - started, stages

    settings: list[tuple[str, int, dict[str, bool]]] = [(str(s), s, {}) for s in steps_list]
    if not args.no_ablation:
        settings += [('encoder_every_step', 8, {'encoder_once': False}),
                     ('separate_guidance_passes', 8, {'batched_guidance': False}),
                     ('both_off', 8, {'encoder_once': False, 'batched_guidance': False})]
    timed(1)  # warm-up: allocations, lazy initialisation
    seconds: dict[str, float] = {}
    fixed: list[float] = []
    stage_samples: dict[str, list[float]] = {}
    runs = tqdm(total=len(settings) * args.repeats, desc='bench sampling', unit='run',
                file=sys.stderr)
    for name, steps, switches in settings:
        totals = []
        for _ in range(args.repeats):
            total, stages = timed(steps, **switches)
            totals.append(total)
            if not switches:
                fixed.append(sum(stages.get(s, 0.0) for s in FIXED_STAGES))
                for stage, value in stages.items():
                    stage_samples.setdefault(stage, []).append(value)
            runs.update()
        seconds[name] = statistics.median(totals)
    runs.close()

    timed_steps = {str(s): seconds[str(s)] for s in steps_list}
    fixed_seconds = statistics.median(fixed)
    result: dict[str, Any] = {
        'device': _device_name(completer.device),
        'scale': config.scale,
        'model': model_name,
        'input': args.input or 'synthetic 64-beam street scan',
        'points': {'scan': config.scan_points, 'diffused': config.full_points},
        'guidance': guidance,
        'repeats': args.repeats,
        'seconds': timed_steps,
        'ratios_to_50': ({k: seconds['50'] / v for k, v in timed_steps.items()}
                         if '50' in timed_steps else None),
        'fixed_seconds': fixed_seconds,
        'fixed_stage_seconds': {s: statistics.median(stage_samples.get(s, [0.0]))
                                for s in FIXED_STAGES},
    }
    if '8' in timed_steps:
        result['fixed_fraction_of_8_steps'] = fixed_seconds / timed_steps['8']
    if '8' in timed_steps and '50' in timed_steps:
        result['seconds_per_step'] = (timed_steps['50'] - timed_steps['8']) / 42
    if not args.no_ablation:
        result['savings_off_8_steps'] = {
            name: {'seconds': seconds[name], 'slowdown': seconds[name] / seconds['8']}
            for name in ('encoder_every_step', 'separate_guidance_passes', 'both_off')
            if '8' in seconds}
    result['goals'] = {goal: seconds[a] / seconds[b] >= limit
                       for goal, (a, b, limit) in GOALS.items() if a in seconds and b in seconds}
    if '8' in timed_steps:
        result['goals']['fixed < 10% of 8 steps'] = result['fixed_fraction_of_8_steps'] < 0.10
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f'{result["device"]}, {result["scale"]} scale, {result["model"]}, guidance '
          f'{result["guidance"]:g}, median of {result["repeats"]}')
    ratios = result['ratios_to_50'] or {}
    for steps, value in result['seconds'].items():
        ratio = f'   t50/t{steps} = {ratios[steps]:.2f}' if steps in ratios else ''
        print(f'  {steps:>3} steps: {value:8.3f} s{ratio}')
    if 'fixed_fraction_of_8_steps' in result:
        print(f'  fixed per-scan cost: {result["fixed_seconds"]:.3f} s = '
              f'{100 * result["fixed_fraction_of_8_steps"]:.1f} % of 8 steps')
    for name, entry in result.get('savings_off_8_steps', {}).items():
        print(f'  8 steps, {name}: {entry["seconds"]:.3f} s ({entry["slowdown"]:.2f}x)')
    for goal, met in result['goals'].items():
        print(f'  goal {goal}: {"met" if met else "NOT met"}')
