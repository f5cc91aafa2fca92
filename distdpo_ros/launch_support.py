"""What launch/complete.launch.py decides, without needing `launch`: the RViz config for the topics
in use, and whether (and how) `ros2 bag play` can play a bag. Tested without ROS."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from distdpo_ros.node_support import INPUT_TOPIC, OUTPUT_TOPIC

ROS2BAG_PACKAGES = 'ros2bag and rosbag2_storage_mcap'


def absolute_topic(name: str) -> str:
    """RViz needs absolute names; the node runs in the root namespace."""
    name = name.strip()
    return name if name.startswith('/') else '/' + name


def rviz_config(template: str, input_topic: str, output_topic: str) -> str:
    """The RViz config `template` (YAML text) with its input and output cloud displays pointed
    at `input_topic` and `output_topic`."""
    config = yaml.safe_load(template)
    topics = {INPUT_TOPIC: absolute_topic(input_topic), OUTPUT_TOPIC: absolute_topic(output_topic)}
    found = set()
    for display in config['Visualization Manager']['Displays']:
        topic = display.get('Topic')
        if isinstance(topic, dict) and topic.get('Value') in topics:
            old = topic['Value']
            found.add(old)
            topic['Value'] = topics[old]
            display['Name'] = str(display.get('Name', old)).replace(old, topics[old])
    missing = set(topics) - found
    if missing:
        raise ValueError(f'RViz config has no display of {", ".join(sorted(missing))}')
    return yaml.safe_dump(config, sort_keys=False)


def write_rviz_config(template_path: str | os.PathLike, input_topic: str,
                      output_topic: str) -> Path:
    """rviz_config() of the file `template_path`, written to a new temporary file."""
    text = rviz_config(Path(template_path).read_text(encoding='utf-8'), input_topic,
                       output_topic)
    handle, name = tempfile.mkstemp(prefix='distdpo_ros-', suffix='.rviz')
    with os.fdopen(handle, 'w', encoding='utf-8') as out:
        out.write(text)
    return Path(name)


def bag_player_problem(bag: str, path: str | None = None) -> str | None:
    """Why `ros2 bag play BAG` cannot run here (None: it can). `path` replaces $PATH."""
    if not Path(bag).exists():
        return f'bag:={bag}: no such file or folder'
    missing = []
    if shutil.which('ros2', path=path) is None:
        missing.append('the ros2 command')
    if importlib.util.find_spec('ros2bag') is None:
        missing.append('the ros2bag package')
    if not missing:
        return None
    return (f'bag:={bag} needs `ros2 bag play`, but {" and ".join(missing)} '
            f'{"is" if len(missing) == 1 else "are"} missing: install {ROS2BAG_PACKAGES} '
            '(rosdep install --from-paths src --ignore-src, or apt install '
            'ros-$ROS_DISTRO-ros2bag ros-$ROS_DISTRO-rosbag2-storage-mcap); without a ROS '
            f'installation use `distdpo replay {bag}`')


def bag_play_command(bag: str, clock: bool) -> list[str]:
    """`ros2 bag play` of `bag`, publishing /clock for use_sim_time when `clock`."""
    return ['ros2', 'bag', 'play', bag] + (['--clock'] if clock else [])
