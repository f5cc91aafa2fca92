"""`distdpo demo`: the out-of-the-box demo (what `make demo` runs); see ros/demo.py."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = (
        'Simulate a short drive (HDL-64E, SemanticKITTI layout + rosbag2) and build its '
        'ground-truth map, replay the bag through the distdpo_completion node over DDS one scan '
        'at a time, record the completed clouds into a bag, score them against the ground truth '
        '(Chamfer distance, F-score, JSD) and draw one frame (input scan, ground truth, '
        'completion). Prints latency and quality and writes OUT/summary.json, OUT/completed '
        '(MCAP bag) and OUT/demo.png. Offline; DDS stays on loopback in a private domain unless '
        'ROS_AUTOMATIC_DISCOVERY_RANGE / ROS_DOMAIN_ID are set.')
    parser.add_argument('--model', default='default',
                        help='student checkpoint directory, or "default" (the shipped model) / '
                             '"default-teacher"')
    parser.add_argument('--teacher', default='auto',
                        help='also draw this checkpoint\'s completion of the pictured scan at its '
                             'own steps: a directory, "none", or "auto" (the shipped teacher '
                             'when --model is "default")')
    parser.add_argument('--frames', type=int, default=12,
                        help='scans in the simulated drive (10 per second of driving)')
    parser.add_argument('--steps', type=int, default=0,
                        help="sampler steps of the node; 0: the model's own")
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the simulated drive and of the sampler')
    parser.add_argument('--out', type=Path, default=Path('demo_out'),
                        help='output folder; a re-run replaces the previous demo outputs there')
    parser.add_argument('--separate-process', action='store_true',
                        help='run the node in its own process (as `ros2 run` would) instead of '
                             'in this one')
    parser.add_argument('--keep', action='store_true',
                        help='keep the simulated drive (OUT/drive: SemanticKITTI sequence with '
                             'its map, and the input bag) instead of deleting it at the end')


def run(args: argparse.Namespace) -> int:
    from distdpo_training.ros.demo import DemoOptions, run_demo, summary_table

    opts = DemoOptions(out=args.out, frames=args.frames, model=args.model, teacher=args.teacher,
                       steps=args.steps, device=args.device, seed=args.seed,
                       separate_process=args.separate_process, keep=args.keep)
    print(summary_table(run_demo(opts)))
    return 0
