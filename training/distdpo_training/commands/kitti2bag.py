"""`distdpo kitti2bag SEQ_DIR OUT_BAG`: a SemanticKITTI sequence as a rosbag2 for replay."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from distdpo_training.data.bags import STORAGES, write_sequence_bag
from distdpo_training.data.kitti import KittiSequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Write one SemanticKITTI sequence folder as a rosbag2: a sensor_msgs/PointCloud2 per scan '
        '(fields x, y, z, intensity float32, plus label uint32 when the sequence has labels) and '
        'a tf2_msgs/TFMessage on /tf with the LiDAR pose at the same stamp. Stamps come from '
        'times.txt (10 Hz frame numbers without it). Play it with `ros2 bag play OUT_BAG` or '
        '`distdpo replay`.')
    parser.add_argument('seq_dir', help='sequence folder with velodyne/, poses.txt, calib.txt')
    parser.add_argument('out_bag', help='bag folder to create (must not exist)')
    parser.add_argument('--storage', choices=STORAGES, default='mcap',
                        help='rosbag2 storage format (default: %(default)s)')
    parser.add_argument('--topic', default='/velodyne_points',
                        help='cloud topic (default: %(default)s)')
    parser.add_argument('--frame-id', default='velodyne',
                        help='frame of the clouds and TF child frame (default: %(default)s)')
    parser.add_argument('--world-frame', default='odom',
                        help='TF parent frame of the poses (default: %(default)s)')
    parser.add_argument('--no-labels', action='store_true',
                        help='leave the label field out of the clouds')


def run(args: argparse.Namespace) -> int:
    seq = KittiSequence(args.seq_dir)
    seq.check_files()
    with tqdm(total=len(seq), desc='kitti2bag', unit='scan', file=sys.stderr) as bar:
        count = write_sequence_bag(args.out_bag, seq, args.storage, args.topic, args.frame_id,
                                   args.world_frame, not args.no_labels, bar.update)
    print(f'wrote {count} scans of {seq.path} to {args.out_bag} ({args.storage})',
          file=sys.stderr)
    return 0
