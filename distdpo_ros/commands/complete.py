"""`distdpo complete`: complete one scan file (.bin .ply .pcd .npy) into a dense point cloud."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from distdpo_ros.config import SAMPLERS
from distdpo_ros.errors import UserError
from distdpo_ros.node_support import output_share
from distdpo_ros.pointio import SUFFIXES, check_output_file, read_points, write_points
from distdpo_ros.settings import SamplingSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ('Complete a LiDAR scan into a dense scene with a diffusion model. '
                          f'Inputs: {", ".join(SUFFIXES)} (KITTI .bin: float32 x, y, z, '
                          'remission). Progress goes to stderr.')
    parser.add_argument('input', type=Path, help='scan file to complete')
    parser.add_argument('--model', default='default',
                        help='checkpoint directory, or a shipped model name: "default" (the '
                             'few-step student) or "default-teacher" (default: default)')
    parser.add_argument('--out', type=Path, default=None,
                        help='output file; its suffix picks the format (.ply .pcd .npy .bin) '
                             '(default: INPUT_STEM.completed.ply in the current folder)')
    parser.add_argument('--steps', type=int, default=None,
                        help="sampler steps (default: the model's own, 8 for a student, 50 for "
                             'a teacher)')
    parser.add_argument('--guidance', type=float, default=None,
                        help="classifier-free guidance weight w (default: the model's own, 3.5 "
                             'for a student, 6 for a teacher; 1 = conditional only)')
    parser.add_argument('--refine', action='store_true',
                        help='run the x6 refinement network after sampling (needs a model that '
                             'has one)')
    parser.add_argument('--seed', type=int, default=0,
                        help='random seed; the same seed gives the same output (default: 0; '
                             '-1 draws a new one)')
    parser.add_argument('--device', default='auto',
                        help='auto (CUDA when available), cpu, cuda or cuda:N (default: auto)')
    parser.add_argument('--sampler', choices=SAMPLERS, default=None,
                        help="reverse-process sampler (default: the model's own, config field "
                             "'sampler'; dpm-solver++ is LiDiff's)")
    parser.add_argument('--bin-columns', type=int, default=4,
                        help='float32 values per point in a .bin input (default: 4, KITTI; 5 '
                             'for nuScenes sweeps)')
    parser.add_argument('--ascii', action='store_true',
                        help='write .ply / .pcd as ASCII text instead of binary')


def run(args: argparse.Namespace) -> int:
    from distdpo_ros.checkpoint import load_config
    from distdpo_ros.completion import Completer, valid_points

    out = args.out if args.out is not None else Path(f'{args.input.stem}.completed.ply')
    check_output_file(out)  # before the work, not after it
    points = read_points(args.input, bin_columns=args.bin_columns)
    # An empty or all-NaN scan is refused naming the file, before the weights are loaded.
    valid_points(points, load_config(args.model), source=str(args.input))
    _say(f'read {len(points)} points from {args.input}')
    started = time.perf_counter()
    completer = Completer.from_pretrained(args.model, device=args.device)
    config = completer.config
    _say(f'loaded model {args.model} ({config.scale} {config.role}) on {completer.device} in '
         f'{time.perf_counter() - started:.1f} s')
    settings = SamplingSettings(args.steps, args.guidance, args.refine, args.sampler).resolved(
        config, completer.has_refine)
    started = time.perf_counter()
    completed = completer.complete(points, seed=None if args.seed < 0 else args.seed,
                                   progress=True, **settings.arguments())
    share = output_share(len(completed), config, settings.refine)
    _say(f'completed {args.input.name} with {settings.describe()}: {len(completed)} points '
         f'({share:.0%} of the diffused points are inside the scene) in '
         f'{time.perf_counter() - started:.2f} s')
    if len(completed) == 0:
        raise UserError(f'{args.input}: the completion is empty (no point of the sample lies '
                        f'within the model\'s {config.max_range:g} m range); nothing written to '
                        f'{out}')
    write_points(out, completed, binary=not args.ascii)
    _say(f'wrote {out}')
    return 0


def _say(message: str) -> None:
    print(f'distdpo complete: {message}', file=sys.stderr, flush=True)
