"""`distdpo bag2kitti BAG OUT_DIR`: a recorded bag as a SemanticKITTI sequence folder."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from distdpo_ros.errors import UserError
from distdpo_training.data.bags import BagFrames
from distdpo_training.data.kitti import write_sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Turn the PointCloud2 messages of one topic of a bag (rosbag2 MCAP or sqlite3, or ROS 1) '
        'into a SemanticKITTI sequence folder: velodyne/*.bin (x, y, z, intensity), labels/ when '
        'the clouds carry a "label" field, poses.txt (LiDAR frame; calib.txt has Tr = identity), '
        'times.txt. Poses come from /tf + /tf_static (interpolated, never extrapolated) or from '
        '--odom-topic; clouds without a pose are skipped and reported. Then run '
        '`distdpo build-maps` on the dataset.')
    parser.add_argument('bag', help='bag folder (rosbag2) or .bag file (ROS 1)')
    parser.add_argument('out_dir', help='sequence folder to create, e.g. data/fleet/sequences/00')
    parser.add_argument('--topic', default='/velodyne_points',
                        help='PointCloud2 topic (default: %(default)s)')
    parser.add_argument('--odom-topic', metavar='TOPIC',
                        help='take poses from this nav_msgs/Odometry topic instead of /tf '
                        '(/tf_static still links its child frame to the cloud frame)')
    parser.add_argument('--world-frame', metavar='FRAME',
                        help='frame the poses are expressed in (default: the root of the TF '
                        'tree above the cloud frame)')
    parser.add_argument('--origin', choices=('first', 'world'), default='first',
                        help='"first": the first written frame is the identity (KITTI '
                        'convention); "world": keep the poses as recorded (default: %(default)s)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the scans of an existing sequence folder')


def run(args: argparse.Namespace) -> int:
    frames = BagFrames(args.bag, args.topic, args.odom_topic, args.world_frame, args.origin)
    if not frames.tf.frames():
        raise UserError(f'{args.bag}: no /tf or /tf_static transforms to take the poses of the '
                        'clouds from; give --odom-topic TOPIC if the bag has odometry')
    with tqdm(total=len(frames), desc='bag2kitti', unit='cloud', file=sys.stderr) as bar:
        def counted():
            for frame in frames:
                yield frame
                bar.n = frame.index + 1
                bar.refresh()

        count = write_sequence(args.out_dir, counted(), overwrite=args.overwrite)
    if count == 0:
        reason = frames.skipped[0].reason if frames.skipped else 'the topic has no messages'
        raise UserError(f'{args.bag}: no cloud on {args.topic} could be converted ({reason})')
    for note in frames.notes:
        print(f'note: {note}', file=sys.stderr)
    if frames.skipped:
        print(f'skipped {len(frames.skipped)} of {len(frames)} clouds:', file=sys.stderr)
        for skip in frames.skipped[:10]:
            print(f'  cloud {skip.index} at {skip.stamp_ns / 1e9:.3f} s: {skip.reason}',
                  file=sys.stderr)
        if len(frames.skipped) > 10:
            print(f'  ... and {len(frames.skipped) - 10} more', file=sys.stderr)
    print(f'wrote {count} frames of {args.bag} {args.topic} to {args.out_dir}', file=sys.stderr)
    return 0
