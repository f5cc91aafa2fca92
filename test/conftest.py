"""Shared test set-up: the ROS network rule, the optional ../shared data, and small helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# ROS network rule (reference/ros2_notes.md): loopback only, our own domain, logs in a temp folder.
# Set before anything imports rclpy; child processes inherit it.
_ROS_TMP = tempfile.mkdtemp(prefix='distdpo-test-ros-')
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.setdefault('ROS_DOMAIN_ID', str(10 + os.getpid() % 90))
os.environ['ROS_HOME'] = _ROS_TMP
os.environ['ROS_LOG_DIR'] = os.path.join(_ROS_TMP, 'log')
os.environ.setdefault('FASTDDS_BUILTIN_TRANSPORTS', 'LARGE_DATA')
os.environ.setdefault('OMP_NUM_THREADS', '2')

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """The real KITTI data beside the checkout (../shared/data); skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data not available: {SHARED_DATA} is missing')
    return SHARED_DATA
