"""`distdpo bench device`: the CPU form's JSON contract, the time budget, the node's message path.

The CPU run happens in a subprocess whose imports of the ROS packages, open3d, rosbags and
diffusers fail, as on the GPU machine's image (Python 3.12, no ROS wheels, no open3d): the command
must run there with the packages it has.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distdpo_ros import pointcloud
from distdpo_ros.commands import bench_device, device_stages
from distdpo_ros.commands.device_stages import message_types, velodyne_cloud

REPO = Path(__file__).resolve().parents[2]
ABSENT_ON_GPU_IMAGE = ('rclpy', 'rcl_interfaces', 'sensor_msgs', 'std_msgs', 'diagnostic_msgs',
                       'open3d', 'rosbags', 'diffusers')
RUNNER = """
import importlib.abc, json, sys
ABSENT = set(json.loads(sys.argv[1]))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ABSENT:
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, Absent())
from distdpo_ros import cli
sys.exit(cli.main(sys.argv[2:]))
"""
SMALL_RUN = ['--device', 'cpu', '--threads', '1', '--teacher-steps', '3', '--student-steps',
             '2,1', '--repeats', '1', '--node-repeats', '1', '--cloud-points', '30000',
             '--train-scales', 'tiny', '--train-steps', '1']


def _bench(tmp_path: Path, *options: str) -> tuple[dict, str]:
    out = tmp_path / 'bench.json'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'training'),
                                           os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(
        [sys.executable, '-c', RUNNER, json.dumps(ABSENT_ON_GPU_IMAGE), 'bench', 'device',
         '--json', '--out', str(out), *options],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == printed
    return printed, proc.stderr


@pytest.fixture(scope='module')
def cpu_run(tmp_path_factory) -> dict:
    return _bench(tmp_path_factory.mktemp('bench'), *SMALL_RUN, '--budget', '240')[0]


def test_cpu_form_reports_every_stage_and_no_cuda_numbers(cpu_run: dict) -> None:
    r = cpu_run
    assert r['schema'] == bench_device.SCHEMA and r['form'] == 'cpu' and r['device'] == 'cpu'
    assert r['gpu'] is None and r['cuda_runtime'] is None
    assert r['stages'] == {'precision': 'done', 'accuracy': 'done', 'completion': 'done',
                           'node': 'done', 'host_syncs': 'skipped: needs CUDA',
                           'training': 'done'}
    assert r['host_syncs'] is None
    assert set(r['peak_memory_bytes']) == set(r['stage_seconds']) == set(bench_device.STAGES) - {
        'host_syncs'}
    assert all(v is None for v in r['peak_memory_bytes'].values())
    assert all(v > 0 for v in r['stage_seconds'].values())
    assert sum(r['stage_seconds'].values()) <= r['elapsed_seconds'] <= r['budget_seconds']
    assert r['settings']['scale'] == 'tiny' and r['settings']['student_steps'] == [2, 1]
    p = r['precision']
    assert p['cuda_matmul_allow_tf32'] is None and p['cudnn_allow_tf32'] is None
    assert p['cuda_matmul_fp32_precision'] is None
    assert p['inference_autocast'] is False and p['training_autocast'] is None  # fp32 on CPU
    assert p['float32_matmul_precision'] == torch.get_float32_matmul_precision()


def test_cpu_form_accuracy_is_the_float32_rounding_of_the_networks(cpu_run: dict) -> None:
    a = cpu_run['accuracy']
    keys = {'eps_t999', 'eps_t500', 'eps_t20', 'guided_eps_t500', 'refine'}
    assert set(a['cpu_fp32_vs_fp64']) == set(a['reference_max_abs']) == keys
    assert set(a['cpu_fp32_vs_fp64_scaled']) == set(a['reference_std']) == keys
    assert a['finite'] and all(v > 0 for v in a['reference_std'].values())
    # float32 rounding: not exactly zero (the fp64 run really ran in fp64), far below the goal
    assert all(0 < v < 1e-4 for v in a['cpu_fp32_vs_fp64_scaled'].values())
    for key, value in a['cpu_fp32_vs_fp64'].items():
        scale = a['reference_std'][key] if key != 'refine' else 1.0
        assert a['cpu_fp32_vs_fp64_scaled'][key] == pytest.approx(value / scale)
    # calibrated BatchNorm: the scan's condition visibly moves the prediction
    assert a['condition_effect'] > 1e-3 * a['reference_std']['eps_t500']
    assert a['reference_device'] == 'cpu'
    for key in ('cuda_vs_cpu', 'cuda_vs_cpu_scaled', 'cuda_fp32_vs_fp64_scaled',
                'cuda_autocast_bf16_vs_fp32_scaled', 'max_eps_cuda_vs_cpu', 'met'):
        assert a[key] is None, key
    assert a['points'] == {'scan': 200, 'diffused': 800} and a['reduced'] is False


def test_cpu_form_completion_and_training_numbers_are_sane(cpu_run: dict) -> None:
    c = cpu_run['completion']
    names = {'teacher_3', 'student_2', 'student_1', 'student_2_refine', 'student_1_refine'}
    assert set(c['seconds']) == set(c['output_points']) == set(c['stage_seconds']) == names
    assert set(c['anchored_seconds']) == {'teacher_3', 'student_2', 'student_1'}
    assert all(v > 0 for v in list(c['seconds'].values()) + list(c['anchored_seconds'].values()))
    assert c['seconds']['teacher_3'] > c['seconds']['student_1']
    assert c['ratios']['student_1'] == c['seconds']['teacher_3'] / c['seconds']['student_1']
    # same seed with and without refinement: the refined cloud is 6 offsets per point
    for steps in (1, 2):
        assert c['output_points'][f'student_{steps}_refine'] == \
            6 * c['output_points'][f'student_{steps}'] > 0
    assert set(c['stage_seconds']['student_1_refine']) == {'preprocess', 'encode', 'denoise',
                                                          'postprocess', 'refine'}
    assert 0 < c['sampler_overhead_per_step'] < c['seconds']['student_1']
    assert c['goals'] is None and all(v is None for v in c['peak_memory_bytes'].values())

    n = cpu_run['node']
    assert n['input_points'] == 30000 and n['output_points'] > 0
    assert n['message'].startswith('stand-in')  # sensor_msgs is absent in this run
    assert n['settings'].startswith('steps 8, guidance 3.5, refine off')  # the node's defaults
    assert n['latency_seconds'] >= n['seconds']['complete_total'] >= n['seconds']['denoise'] > 0
    assert n['seconds']['cloud_to_numpy'] > 0 and n['transfer'] is None

    t = cpu_run['training']['scales']['tiny']
    assert t['precision'] == 'float32' and t['batch'] == 2 and t['parameters'] > 0
    assert t['seconds_per_step'] > 0 and t['finite'] and len(t['losses']) == 2
    assert all(math.isfinite(v) and v > 0 for v in t['losses'])


def test_budget_stops_cleanly_and_says_what_finished(tmp_path: Path) -> None:
    r, _ = _bench(tmp_path, *SMALL_RUN, '--budget', '0.5')
    statuses = r['stages']
    assert statuses['training'] == 'skipped: time budget spent'
    assert all(s == 'done' or s.startswith(('partial: ', 'skipped: '))
               for s in statuses.values())
    assert any(s != 'done' for k, s in statuses.items() if k != 'host_syncs')
    for stage, status in statuses.items():
        assert (r[stage] is None) == status.startswith('skipped'), stage
    assert r['elapsed_seconds'] < 60


def test_cli_refuses_bad_options(capsys) -> None:
    from distdpo_ros import cli

    assert cli.main(['bench', 'device', '--device', 'cpu', '--student-steps', '0']) == 2
    assert cli.main(['bench', 'device', '--device', 'cpu', '--skip', 'nonsense']) == 2
    assert cli.main(['bench', 'device', '--device', 'cpu', '--train-scales', 'huge']) == 2
    assert 'error' in capsys.readouterr().err


def test_velodyne_cloud_round_trips_through_both_message_types() -> None:
    cloud = velodyne_cloud(5000, seed=3)
    xyz = cloud['xyz']
    assert xyz.shape == (5000, 3) and xyz.dtype == np.float32 and np.isfinite(xyz).all()
    assert cloud['ring'].min() >= 0 and cloud['ring'].max() <= 63
    assert len(np.unique(cloud['ring'])) > 32  # spread over the beams
    extra = {'intensity': cloud['intensity'], 'ring': cloud['ring']}
    kinds = [(device_stages._PointCloud2, device_stages._PointField, device_stages._Header())]
    types = message_types()
    kinds.append(types[:3])
    for cloud_type, field_type, header in kinds:
        msg = pointcloud.make_cloud(xyz, header, extra, cloud_type=cloud_type,
                                    field_type=field_type)
        assert msg.point_step == 18 and msg.width == 5000
        back, fields = pointcloud.cloud_to_arrays(msg, ('ring', 'intensity'))
        np.testing.assert_array_equal(back, xyz)
        np.testing.assert_array_equal(fields['ring'], cloud['ring'])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_form_compares_devices(tmp_path: Path) -> None:  # pragma: no cover - GPU only
    r, _ = _bench(tmp_path, '--device', 'cuda', '--scale', 'tiny', '--teacher-steps', '3',
                  '--student-steps', '1', '--train-scales', 'tiny', '--budget', '120')
    assert r['form'] == 'cuda' and r['stages']['host_syncs'] == 'done'
    assert r['accuracy']['max_eps_cuda_vs_cpu'] <= device_stages.EPS_GOAL
    assert r['host_syncs']['sampler_loop_8_steps_no_network']['count'] == 0
    assert all(v > 0 for v in r['peak_memory_bytes'].values())
