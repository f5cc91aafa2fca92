"""The ROS network rule for tools that start nodes on a development machine.

DDS discovery multicasts out of the machine's interface by default. Tools that start nodes for
themselves (`distdpo replay`, `distdpo bench pointcloud`) keep to loopback, use their own domain
and write ROS logs into a temporary folder, unless the user has set these variables. Call
:func:`use_local_ros_network` before `rclpy.init()`; child processes inherit the result.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping


def use_local_ros_network(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the variables the user left unset; return the ones this call set."""
    env = os.environ if env is None else env
    wanted = {
        'ROS_AUTOMATIC_DISCOVERY_RANGE': lambda: 'LOCALHOST',
        'ROS_DOMAIN_ID': lambda: str(1 + os.getpid() % 100),  # 1..100, valid on every OS
        'ROS_HOME': lambda: tempfile.mkdtemp(prefix='distdpo-ros-'),
        'ROS_LOG_DIR': lambda: os.path.join(env['ROS_HOME'], 'log'),
        # Best-effort large clouds need it (ros2_notes: 0-4 % arrive without it).
        'FASTDDS_BUILTIN_TRANSPORTS': lambda: 'LARGE_DATA',
    }
    applied = {}
    for name, make in wanted.items():  # ROS_HOME before ROS_LOG_DIR, which lives in it
        if not env.get(name):
            env[name] = applied[name] = make()
    return applied
