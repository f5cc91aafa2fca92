"""`distdpo build-maps DATASET`: the static ground-truth map of every sequence (reference §1.2)."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from distdpo_ros.errors import UserError
from distdpo_training.data.kitti import KittiSequence, find_sequences
from distdpo_training.data.maps import build_map, map_is_current, save_map


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Build SS/map_clean.npy for every sequence of a SemanticKITTI-layout dataset: the static '
        'points (labelled, not moving, farther than --min-range) of all scans in the world frame, '
        'one point per voxel. Sequences whose map is complete and built from the current files '
        'with the same settings are skipped, so an interrupted run resumes where it stopped.')
    parser.add_argument('dataset', help='dataset folder (DATASET/sequences/SS or '
                        'DATASET/dataset/sequences/SS) or one sequence folder')
    parser.add_argument('--voxel', type=float, default=0.1,
                        help='voxel size of the map in metres (default: %(default)s)')
    parser.add_argument('--min-range', type=float, default=3.5,
                        help='drop points closer than this to the sensor, metres on x, y, z '
                        '(default: %(default)s)')
    parser.add_argument('--sequences', nargs='+', metavar='SS',
                        help='only these sequences, e.g. 00 08 (default: all found)')
    parser.add_argument('--force', action='store_true',
                        help='rebuild maps even when they are up to date')
    parser.add_argument('--chunk-points', type=int, default=2_000_000,
                        help='points de-duplicated per sort; larger is faster and uses more '
                        'memory (default: %(default)s)')


def run(args: argparse.Namespace) -> int:
    if not args.voxel > 0:
        raise UserError(f'--voxel must be > 0, got {args.voxel}')
    if args.min_range < 0 or args.chunk_points < 1:
        raise UserError('--min-range must be >= 0 and --chunk-points >= 1')
    sequences = [KittiSequence(p) for p in find_sequences(args.dataset, args.sequences)]
    for seq in sequences:
        seq.check_files()  # fail before the long work, not in the middle of it
    todo = [s for s in sequences
            if args.force or not map_is_current(s, args.voxel, args.min_range)]
    for seq in sequences:
        if seq not in todo:
            print(f'{seq.name}: map is up to date ({seq.map_path}), skipped', file=sys.stderr)
    for seq in todo:
        if not seq.has_labels:
            print(f'{seq.name}: no labels folder, every point counts as static (moving objects '
                  'will smear the map)', file=sys.stderr)
        start = time.perf_counter()
        with tqdm(total=len(seq), desc=f'map {seq.name}', unit='scan', file=sys.stderr) as bar:
            points = build_map(seq, args.voxel, args.min_range, args.chunk_points, bar.update)
        save_map(seq, points, args.voxel, args.min_range)
        print(f'{seq.name}: {len(points):,} points from {len(seq)} scans in '
              f'{time.perf_counter() - start:.1f} s -> {seq.map_path}', file=sys.stderr)
    return 0
