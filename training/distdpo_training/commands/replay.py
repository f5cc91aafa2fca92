"""`distdpo replay BAG`: play a bag through the completion node over DDS, record and time it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from distdpo_ros.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Replay the PointCloud2 clouds of a rosbag2 (MCAP or sqlite3) through the '
        'distdpo_completion node over DDS, without a ROS installation: the pip-only '
        'equivalent of `ros2 bag play` + `ros2 launch distdpo_ros complete.launch.py` + '
        '`ros2 bag record`. Prints latency statistics (publish -> completed cloud received). '
        'Runs on loopback in a private ROS domain unless ROS_AUTOMATIC_DISCOVERY_RANGE / '
        'ROS_DOMAIN_ID are set.')
    parser.add_argument('bag', type=Path, help='input rosbag2 folder (or .mcap / .db3 file)')
    parser.add_argument('--topic', default='/velodyne_points',
                        help='PointCloud2 topic to replay (default: /velodyne_points)')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed relative to the bag times (default: 1.0); scans '
                             'that arrive while the node is busy are dropped, newest wins')
    parser.add_argument('--lockstep', action='store_true',
                        help='publish the next scan only once the previous one is completed '
                             '(every scan completed, as for evaluation; ignores --rate)')
    parser.add_argument('--record', type=Path, metavar='OUT_BAG',
                        help='write the completed clouds (and the input /tf, /tf_static) to '
                             'this new bag folder (default: do not record)')
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap',
                        help='storage of the recorded bag (default: mcap)')
    parser.add_argument('--model', default='default',
                        help='checkpoint directory or shipped model name (default: default)')
    parser.add_argument('--device', default='auto',
                        help='auto, cpu, cuda or cuda:N (default: auto)')
    parser.add_argument('--steps', type=int, default=0,
                        help="sampler steps; 0: the model's own (default: 0)")
    parser.add_argument('--guidance', type=float, default=-1.0,
                        help="guidance weight; -1: the model's own (default: -1)")
    parser.add_argument('--seed', type=int, default=0,
                        help='sampler seed, -1 for a new one per scan (default: 0)')
    parser.add_argument('--separate-process', action='store_true',
                        help='run the node in its own process (as `ros2 run` would) instead of '
                             'in this one')
    parser.add_argument('--gt', type=Path, metavar='DATASET',
                        help='SemanticKITTI-layout dataset (or sequence) the bag was made from, '
                             'with its maps built: score every completed frame (CD, JSD, '
                             'P/R/F, IoU, EMD) against its ground truth')
    parser.add_argument('--max-scans', type=int, default=0,
                        help='stop after this many scans (default: 0, all)')
    parser.add_argument('--wait', type=float, default=30.0,
                        help='with --separate-process: seconds to wait for a completion before '
                             'moving on (default: 30); a node in this process is waited for as '
                             'long as it is working')
    parser.add_argument('--json', action='store_true',
                        help='print the statistics as one JSON object')


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from distdpo_training.data.bags import BagStream
    from distdpo_training.ros.replay import ReplayOptions, replay

    if args.max_scans < 0 or args.wait <= 0:
        raise UserError('--max-scans must be >= 0 and --wait > 0')
    opts = ReplayOptions(
        bag=args.bag, topic=args.topic, rate=args.rate, lockstep=args.lockstep,
        record=args.record, storage=args.storage, model=args.model, device=args.device,
        steps=args.steps, guidance=args.guidance, seed=args.seed,
        separate_process=args.separate_process, gt=args.gt, wait=args.wait,
        max_scans=args.max_scans)
    stream = BagStream(args.bag, args.topic)
    total = stream.count if not args.max_scans else min(stream.count, args.max_scans)
    stream.close()
    with tqdm(total=total, unit='scan', desc='replay', disable=None) as bar:
        report = replay(opts, progress=bar.update)
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0 if summary['completed'] else 1


def _print_summary(s: dict[str, Any]) -> None:
    print(f'{s["completed"]} of {s["published"]} scans completed in {s["wall_seconds"]:.1f} s '
          f'({s["completed_per_second"]:.2f}/s)')
    if 'latency_ms' in s:
        lat = s['latency_ms']
        print(f'latency (publish -> completed cloud): median {lat["median"]:.0f} ms, '
              f'p95 {lat["p95"]:.0f} ms, max {lat["max"]:.0f} ms')
    node = s.get('node', {})
    if 'overhead_ms' in node:
        print(f'node: model median {node["model_ms"]["median"]:.0f} ms, waiting for the model '
              f'{node["queued_ms"]["median"]:.0f} ms, own overhead '
              f'{node["overhead_ms"]["median"]:.1f} ms; {node["dropped"]} dropped, '
              f'{node["rejected"]} rejected, {node["failed"]} failed')
    if 'metrics' in s:
        m = s['metrics']
        print(f'ground truth ({m["frames"]} frames): CD {m["cd"]:.3f} m, JSD {m["jsd"]:.3f}, '
              f'F-score {m["fscore"]:.1f} %, EMD {m["emd"]:.3f} m')
    if 'record' in s:
        print(f'recorded: {s["record"]}')
