"""`distdpo bench device`: the vehicle-GPU path measured in one run, one JSON document (the
stages themselves are in :mod:`distdpo_ros.commands.device_stages`).

On a CUDA device (the "cuda" form, full scale by default) it runs, in this order, each stage
only while the time budget (`--budget`) lasts:

1. precision: the TF32 / bf16 settings in effect, read from torch and from the training engine
   (facts, not claims).
2. accuracy: the same full-scale networks (random weights, seed 0) on the CPU and on CUDA, on the
   same input: max abs difference of eps (encoder + noise predictor, at three noise levels, plus
   one guided eps) and of the refinement output, beside the CPU's own float32-vs-float64 rounding
   (the noise floor) and the bf16-autocast-vs-fp32 difference of the training forward. A
   full-scale forward on a CPU takes about a minute, so the comparison uses a reduced scan
   (`--compare-points`, 2,000 x K = 20,000 points by default) with the full-scale networks, voxel
   size and range; the JSON says so.
3. completion: `Completer.complete()` wall time, teacher `--teacher-steps` (50) and student
   `--student-steps` (8, 4, 2, 1) with and without refinement, median of `--repeats` round-robin
   runs, per-stage times and peak GPU memory per setting. The input is the already-subsampled
   conditioning scan, so these times exclude the scan's farthest point sampling (measured in the
   node stage). With random weights the samples drift away from the scan, which makes a network
   step dearer than a trained model's; the same settings are also timed on the "anchored"
   trajectory of `distdpo bench sampling --anchored` (a trained model's stand-in).
4. node: end-to-end latency of one scan through the node's own conversion path, in process
   (no DDS): a 120,000-point Velodyne-like PointCloud2 (x, y, z, intensity, ring) -> numpy
   (`pointcloud.cloud_to_xyz`) -> `Completer.complete()` with the node's default parameters ->
   PointCloud2 (`pointcloud.make_cloud`); sensor_msgs classes when importable, else plain stand-ins
   with the same fields (the JSON says which). Also device->host copy of the completed cloud,
   pageable against a pinned buffer.
5. host syncs (CUDA only): synchronising operations counted with torch's sync debug mode, per
   sampler loop without a network, per guided network call and per 8-step completion, with the
   lines of this package that issued them.
6. training: one teacher `train_step` (distdpo_training's own, on a real Engine: batch 2,
   forward + backward + Adam, the engine's precision rule) per scale in `--train-scales` (full
   and small), seconds per step and peak memory.

On a CPU the same command runs a reduced form (tiny scale, few steps, about half a minute) so
CI can test it; CUDA-only fields are null there. Every stage's outcome is in "stages": done,
partial (the budget ran out inside it) or skipped (with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distdpo_ros.commands.device_stages import (
    EPS_GOAL,
    Budget,
    OutOfTime,
    accuracy_stage,
    bench_bundle,
    completion_stage,
    host_sync_stage,
    int_list,
    node_stage,
    precision_facts,
    reset_peak,
    stage_peak,
    training_stage,
    velodyne_cloud,
)
from distdpo_ros.config import SCALES, preset
from distdpo_ros.errors import UserError

SCHEMA = 'distdpo-bench-device/1'
STAGES = ('precision', 'accuracy', 'completion', 'node', 'host_syncs', 'training')

# Per-form defaults; any option given on the command line wins.
FORMS: dict[str, dict[str, Any]] = {
    'cuda': {'scale': 'full', 'compare_points': 2000, 'teacher_steps': 50,
             'student_steps': '8,4,2,1', 'repeats': 3, 'node_repeats': 3,
             'train_scales': 'full,small', 'train_steps': 3, 'budget': 420.0},
    'cpu': {'scale': 'tiny', 'compare_points': 0, 'teacher_steps': 10,
            'student_steps': '8,4,2,1', 'repeats': 1, 'node_repeats': 1,
            'train_scales': 'tiny', 'train_steps': 1, 'budget': 60.0},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', default='auto',
                        help='auto (CUDA when available), cpu or cuda[:N]; CUDA runs the full '
                             'form, a CPU the reduced one (default: auto)')
    parser.add_argument('--budget', type=float, default=None,
                        help='seconds for the whole run; stages stop cleanly when it is spent '
                             'and the JSON says what finished (default: 420 on CUDA, 60 on CPU)')
    parser.add_argument('--scale', choices=SCALES, default=None,
                        help='networks of the accuracy, completion and node stages (default: '
                             'full on CUDA, tiny on CPU)')
    parser.add_argument('--model', default=None,
                        help='checkpoint directory or shipped model name for the completion and '
                             'node stages (default: random weights of --scale)')
    parser.add_argument('--compare-points', type=int, default=None,
                        help="scan points of the CPU/CUDA comparison (x the scale's K); 0: the "
                             "scale's own (default: 2000 on CUDA, the scale's own on CPU)")
    parser.add_argument('--teacher-steps', type=int, default=None,
                        help='teacher steps timed (default: 50 on CUDA, 10 on CPU)')
    parser.add_argument('--student-steps', default=None,
                        help='comma-separated student steps timed (default: 8,4,2,1)')
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed completions per setting, median reported (default: 3 on '
                             'CUDA, 1 on CPU)')
    parser.add_argument('--node-repeats', type=int, default=None,
                        help='timed scans through the node path (default: 3 on CUDA, 1 on CPU)')
    parser.add_argument('--cloud-points', type=int, default=120_000,
                        help='points of the Velodyne-like input cloud (default: 120000)')
    parser.add_argument('--train-scales', default=None,
                        help='comma-separated scales of the training-step stage; "none" skips '
                             'it (default: full,small on CUDA, tiny on CPU)')
    parser.add_argument('--train-steps', type=int, default=None,
                        help='timed training steps per scale after one warm-up (default: 3 on '
                             'CUDA, 1 on CPU)')
    parser.add_argument('--skip', default='',
                        help=f'comma-separated stages to leave out, of {",".join(STAGES[1:])}')
    parser.add_argument('--threads', type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice on CUDA, for "
                             'the CPU reference; 1 in the CPU form, the fastest on a shared CPU)')
    parser.add_argument('--out', default=None, help='also write the JSON document to this file')
    parser.add_argument('--json', action='store_true',
                        help='print the JSON document only (default: a short summary)')


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def _options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    form = 'cuda' if device.type == 'cuda' else 'cpu'
    o = {k: (getattr(args, k) if getattr(args, k) is not None else v)
         for k, v in FORMS[form].items()}
    o['form'] = form
    o['student_steps'] = int_list(str(o['student_steps']), '--student-steps')
    o['train_scales'] = ([] if str(o['train_scales']).strip() == 'none' else
                         [s.strip() for s in str(o['train_scales']).split(',') if s.strip()])
    for scale in o['train_scales']:
        if scale not in SCALES:
            raise UserError(f'--train-scales: unknown scale {scale!r}; choose of {SCALES}')
    for name in ('teacher_steps', 'repeats', 'node_repeats', 'train_steps'):
        if o[name] < 1:
            raise UserError(f'--{name.replace("_", "-")} must be at least 1, got {o[name]}')
    if o['compare_points'] < 0 or o['budget'] <= 0 or args.cloud_points < 16:
        raise UserError('--compare-points must be >= 0, --budget > 0, --cloud-points >= 16')
    skip = {s.strip() for s in args.skip.split(',') if s.strip()}
    unknown = skip - set(STAGES[1:])
    if unknown:
        raise UserError(f'--skip: unknown stage(s) {sorted(unknown)}; choose of {STAGES[1:]}')
    o['skip'] = skip
    return o


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document (see the module docstring)."""
    from distdpo_ros.completion import Completer, preprocess, resolve_device

    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else (None if device.type == 'cuda'
                                                              else 1)
    if threads is not None:
        if threads < 1:
            raise UserError(f'--threads must be at least 1, got {threads}')
        torch.set_num_threads(threads)
    o = _options(args, device)
    budget = Budget(o['budget'])
    cuda = device.type == 'cuda'
    result: dict[str, Any] = {
        'schema': SCHEMA, 'form': o['form'],
        'device': str(device),
        'gpu': torch.cuda.get_device_name(device) if cuda else None,
        'cuda_runtime': torch.version.cuda if cuda else None,
        'torch': torch.__version__, 'python': platform.python_version(),
        'cpu': {'machine': platform.machine(), 'cores': os.cpu_count(),
                'torch_threads': torch.get_num_threads()},
        'settings': {k: (sorted(v) if isinstance(v, set) else v) for k, v in o.items()}
                    | {'cloud_points': args.cloud_points, 'model': args.model or 'random'},
        'budget_seconds': o['budget'], 'stages': {}, 'stage_seconds': {},
        'peak_memory_bytes': {},
    }
    for stage in STAGES:
        result[stage] = None
    cloud = velodyne_cloud(args.cloud_points)
    config = preset(o['scale'], 'student')
    state: dict[str, Any] = {}

    def completer() -> Any:
        if 'completer' not in state:
            bundle, weights = bench_bundle(config, device, args.model, cloud['xyz'])
            state['completer'] = Completer(bundle)
            state['weights'] = weights
            state['scan'] = preprocess(cloud['xyz'], bundle.config)
        return state['completer']

    stages: dict[str, Callable[[dict[str, Any]], None]] = {
        'precision': lambda out: out.update(precision_facts(device)),
        'accuracy': lambda out: accuracy_stage(out, device, o['scale'], o['compare_points'],
                                               cloud['xyz'], budget),
        'completion': lambda out: completion_stage(out, completer(), state['scan'],
                                                   o['teacher_steps'], o['student_steps'],
                                                   o['repeats'], budget),
        'node': lambda out: node_stage(out, completer(), cloud, o['node_repeats'], budget),
        'host_syncs': lambda out: host_sync_stage(out, completer(), state['scan']),
        'training': lambda out: training_stage(out, device, o['train_scales'],
                                               o['train_steps'], cloud['xyz'], budget),
    }
    for name, function in stages.items():
        if name in o['skip']:
            result['stages'][name] = 'skipped: --skip'
            continue
        if name == 'host_syncs' and not cuda:
            result['stages'][name] = 'skipped: needs CUDA'
            continue
        if name == 'training' and not o['train_scales']:
            result['stages'][name] = 'skipped: --train-scales none'
            continue
        if budget.spent():
            result['stages'][name] = 'skipped: time budget spent'
            continue
        out: dict[str, Any] = {}
        result[name] = out
        reset_peak(device, new_stage=True)
        started = time.perf_counter()
        try:
            if name in ('completion', 'node', 'host_syncs'):
                completer()
                out['weights'] = state['weights']
            function(out)
            result['stages'][name] = 'done'
        except OutOfTime:
            result['stages'][name] = 'partial: time budget spent'
        except ImportError as exc:
            result['stages'][name] = f'skipped: {exc}'
        result['stage_seconds'][name] = time.perf_counter() - started
        result['peak_memory_bytes'][name] = stage_peak(device)
    result['elapsed_seconds'] = budget.elapsed()
    return result


def run(args: argparse.Namespace) -> int:
    result = run_bench(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + '\n', encoding='utf-8')
    if args.json:
        print(text)
    else:
        _print_summary(result)
    return 0


def _print_summary(r: dict[str, Any]) -> None:
    print(f'{r["form"]} form on {r["device"]}{" (" + r["gpu"] + ")" if r["gpu"] else ""}, '
          f'torch {r["torch"]}, {r["elapsed_seconds"]:.0f} s of {r["budget_seconds"]:.0f} s')
    for stage, status in r['stages'].items():
        print(f'  {stage:<11} {status}')
    p = r['precision'] or {}
    if p:
        print(f'  precision: TF32 matmul {p["cuda_matmul_allow_tf32"]}, cudnn '
              f'{p["cudnn_allow_tf32"]}, training autocast {p["training_autocast"]}')
    a = r['accuracy'] or {}
    if 'cpu_fp32_vs_fp64' in a:
        floor = max(v for k, v in a['cpu_fp32_vs_fp64_scaled'].items() if k.startswith('eps'))
        line = f'  accuracy (eps in units of its std): cpu fp32 vs fp64 {floor:.2e}'
        if a.get('max_eps_cuda_vs_cpu') is not None:
            line += (f', cuda vs cpu eps {a["max_eps_cuda_vs_cpu"]:.2e}, refine '
                     f'{a["cuda_vs_cpu"]["refine"]:.2e} (goal {EPS_GOAL:g}: '
                     f'{"met" if a["met"] else "NOT met"})')
        print(line)
    c = r['completion'] or {}
    for name, value in c.get('seconds', {}).items():
        anchored = c.get('anchored_seconds', {}).get(name)
        print(f'  {name:<18} {value:8.3f} s' + (f'   anchored {anchored:8.3f} s'
                                                 if anchored is not None else ''))
    n = r['node'] or {}
    if n.get('latency_seconds') is not None:
        print(f'  node end to end ({n["input_points"]} points): {n["latency_seconds"]:.3f} s')
    t = r['training'] or {}
    for scale, entry in t.get('scales', {}).items():
        if entry.get('seconds_per_step') is not None:
            print(f'  training step {scale}: {entry["seconds_per_step"]:.3f} s '
                  f'({entry["precision"]})')
    if r['device'].startswith('cuda'):
        for stage, peak in r['peak_memory_bytes'].items():
            if peak is not None:
                print(f'  peak GPU memory {stage}: {peak / 2**30:.2f} GiB')
    sys.stdout.flush()
