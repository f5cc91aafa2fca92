"""`distdpo bench data`: speed of the data pipeline, each number measured in this run.

Every section is a function `(args, workdir) -> dict` registered in SECTIONS; the command runs the
selected ones in order and prints one JSON object keyed by section (or readable lines):

- `build_maps`: seconds per 1,000 scans of `build-maps` against a plain re-implementation of
  LiDiff's loop (append each scan, re-quantise the whole map) on the same scans of the same
  sequence, their ratio, and whether both maps are identical. The reference loop is quadratic in
  the number of scans, so its per-1,000 figure is the rate over `--scans` scans, not a forecast.
- `simulate`: scans per second of `distdpo simulate` (world building and SemanticKITTI files
  included, and once the world exists), with milliseconds per scan of each stage
  (:func:`distdpo_training.data.simulation.bench.bench_simulate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from distdpo_ros.errors import UserError
from distdpo_training.data.kitti import KittiSequence
from distdpo_training.data.maps import build_map, build_map_reference_loop


def _sequence(args: argparse.Namespace, workdir: Path) -> KittiSequence:
    """The sequence to measure on: --dataset, or one simulated drive of --scans scans (made once
    per run, shared by the sections)."""
    if args.dataset is None:
        folder = workdir / 'sim' / 'sequences' / '00'
        if not folder.is_dir():
            from distdpo_training.data.simulation.drive import simulate_dataset

            simulate_dataset(workdir / 'sim', sequences=1, frames=args.scans, seed=args.seed)
        args.dataset = str(folder)
    seq = KittiSequence(args.dataset)
    if len(seq) < args.scans:
        raise UserError(f'{seq.path}: {len(seq)} scans, --scans asks for {args.scans}')
    return seq


def bench_build_maps(args: argparse.Namespace, workdir: Path) -> dict:
    seq = _sequence(args, workdir)
    n = args.scans
    for i in range(n):  # warm the page cache so both variants read from memory
        seq.scan(i)
        seq.labels(i)
    start = time.perf_counter()
    fast = build_map(seq, args.voxel, scans=n)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = build_map_reference_loop(seq, args.voxel, scans=n)
    reference_s = time.perf_counter() - start
    return {
        'sequence': str(seq.path), 'scans': n, 'voxel': args.voxel,
        'points_per_scan': round(sum(len(seq.scan(i)) for i in range(n)) / n),
        'map_points': len(fast),
        'build_maps_s': round(fast_s, 3),
        'build_maps_s_per_1000_scans': round(fast_s / n * 1000, 2),
        'reference_loop_s': round(reference_s, 3),
        'reference_loop_s_per_1000_scans_at_this_length': round(reference_s / n * 1000, 2),
        'speedup': round(reference_s / fast_s, 2),
        'identical_maps': bool(fast.tobytes() == reference.tobytes()),
    }


def bench_simulate_section(args: argparse.Namespace, workdir: Path) -> dict:
    from distdpo_training.data.simulation.bench import bench_simulate

    return bench_simulate(workdir, frames=args.sim_frames, seed=args.seed,
                          sequences=args.sim_sequences)


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    'build_maps': bench_build_maps,
    'simulate': bench_simulate_section,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Measure the data pipeline in this run and print what was measured: build-maps seconds '
        'per 1,000 scans against a plain re-implementation of the reference loop that '
        're-quantises the whole map after every scan, on the same scans (speed-up, identical '
        'maps); simulator scans per second and where its time goes.')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--sections', nargs='+', choices=list(SECTIONS), default=list(SECTIONS),
                        help='what to measure (default: all)')
    parser.add_argument('--dataset', metavar='SEQ_DIR',
                        help='sequence folder to measure build-maps on (default: simulate one '
                        'drive of --scans scans first, not timed)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the simulated drive (default: %(default)s)')
    parser.add_argument('--scans', type=int, default=200,
                        help='scans to build the map from (default: %(default)s)')
    parser.add_argument('--voxel', type=float, default=0.1,
                        help='map voxel size in metres (default: %(default)s)')
    parser.add_argument('--sim-frames', type=int, default=100,
                        help='scans per simulated drive timed by `simulate` (default: '
                        '%(default)s)')
    parser.add_argument('--sim-sequences', type=int, default=2,
                        help='simulated drives timed by `simulate` (default: %(default)s)')


def run(args: argparse.Namespace) -> int:
    if args.scans < 1:
        raise UserError(f'--scans must be >= 1, got {args.scans}')
    results = {}
    with tempfile.TemporaryDirectory(prefix='distdpo-bench-data-') as workdir:
        for name in args.sections:
            results[name] = SECTIONS[name](args, Path(workdir))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, values in results.items():
            print(f'{name}:')
            for key, value in values.items():
                print(f'  {key}: {value}')
    sys.stdout.flush()
    return 0
