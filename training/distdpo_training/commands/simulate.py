"""`distdpo simulate OUT`: simulated HDL-64E drives in the SemanticKITTI layout (and bags)."""

from __future__ import annotations

import argparse
from pathlib import Path

from distdpo_ros.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Simulate drives through procedural urban and suburban streets with a Velodyne HDL-64E '
        '(KITTI beam pattern, 10 Hz, 80 m) and write them as SemanticKITTI sequences '
        'OUT/sequences/SS (velodyne/*.bin, labels/*.label with moving classes, poses.txt, '
        'calib.txt, times.txt). Deterministic for a given --seed; `distdpo build-maps OUT` then '
        'makes the ground-truth maps.')
    parser.add_argument('out', type=Path, metavar='OUT', help='dataset folder to write into')
    parser.add_argument('--sequences', type=int, default=1,
                        help='number of sequences (drives) to simulate (default: %(default)s)')
    parser.add_argument('--frames', type=int, default=200,
                        help='scans per sequence, 10 per second (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0,
                        help='random seed; the same seed gives the same data (default: '
                             '%(default)s)')
    parser.add_argument('--first', type=int, default=0,
                        help='number of the first sequence folder, e.g. 8 writes 08, 09, ...; '
                             'sequence SS of a seed is the same drive whatever --first '
                             '(default: %(default)s)')
    parser.add_argument('--bag', action='store_true',
                        help='also write each sequence as a rosbag2 (MCAP) in OUT/bags/SS: '
                             'PointCloud2 on /velodyne_points (x y z intensity ring time label) '
                             'and /tf')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace sequences (and bags) that already exist in OUT')
    parser.add_argument('--preview', type=Path, metavar='PNG',
                        help='also save a bird\'s-eye picture of the first scan of the first '
                             'sequence')
    parser.add_argument('--compare', type=Path, metavar='BIN',
                        help='with --preview: a real KITTI .bin scan drawn next to it')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from distdpo_training.data.simulation import save_preview, simulate_dataset

    if args.compare is not None and args.preview is None:
        raise UserError('--compare needs --preview PNG')
    if args.compare is not None and not args.compare.is_file():
        raise UserError(f'{args.compare}: scan file does not exist')
    folders = simulate_dataset(args.out, sequences=args.sequences, frames=args.frames,
                               seed=args.seed, bag=args.bag, first=args.first,
                               overwrite=args.overwrite, progress=not args.quiet)
    if args.preview is not None:
        save_preview(args.preview, folders[0], args.compare)
        print(f'preview: {args.preview}')
    print(f'wrote {len(folders)} sequence(s) of {args.frames} scans to {args.out / "sequences"}'
          + (f' and bags to {args.out / "bags"}' if args.bag else ''))
    return 0
