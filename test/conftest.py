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
# Tests use tiny inputs: one thread each is fastest, and OpenMP threads spinning against other
# processes made a tiny forward pass 100x slower on a loaded 2-core machine (measured).
os.environ.setdefault('OMP_NUM_THREADS', '1')

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """Every test runs torch on one thread (tiny tensors; see OMP_NUM_THREADS above), also when the
    caller's environment set more."""
    torch = pytest.importorskip('torch')
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """The real KITTI data beside the checkout (../shared/data); skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data not available: {SHARED_DATA} is missing')
    return SHARED_DATA


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory) -> Path:
    """A checkpoint directory of the tiny student (preset('tiny', 'student')), random weights
    (seed 0), saved with distdpo_ros.checkpoint.save_model."""
    torch = pytest.importorskip('torch')
    DiffusionNet = pytest.importorskip('distdpo_ros.models').DiffusionNet  # noqa: N806
    from distdpo_ros.checkpoint import ModelBundle, save_model
    from distdpo_ros.config import preset

    config = preset('tiny', 'student')
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp('models') / 'tiny-student',
                      ModelBundle(config=config, diffusion=DiffusionNet(config)))


@pytest.fixture(scope='session')
def sim_dataset(tmp_path_factory) -> Path:
    """Two simulated drives of 6 scans (sequences 00 and 01) with their ground-truth maps."""
    simulation = pytest.importorskip('distdpo_training.data.simulation.drive')
    from distdpo_ros.cli import main as distdpo

    root = tmp_path_factory.mktemp('sim')
    simulation.simulate_dataset(root, sequences=2, frames=6, seed=0, progress=False)
    assert distdpo(['build-maps', str(root)]) == 0
    return root
