"""The models shipped inside the package load by name and complete a scan out of the box."""

from __future__ import annotations

import numpy as np
import pytest

from distdpo_ros.completion import Completer, synthetic_scan


@pytest.fixture(scope='module')
def student() -> Completer:
    return Completer.from_pretrained('default', device='cpu')


def test_default_is_the_small_8_step_student(student):
    config = student.config
    assert (config.scale, config.role, config.steps, config.guidance) == ('small', 'student', 8,
                                                                          1.0)
    # the formulation of the models we train (issue 15), not LiDiff's
    assert (config.sampler, config.t_start, config.x0_clamp, config.norm) == \
        ('ve-ddim', 200, 0.5, 'group')
    assert config.notes.get('trained_by') == 'distdpo train distill'


def test_default_student_completes_a_scan_near_the_input(student):
    scan = synthetic_scan(seed=3)
    out = student.complete(scan, steps=2, seed=0)
    assert out.dtype == np.float32 and out.shape[1] == 3
    # the sampler keeps the diffused points near the scan: nearly all survive the range crop
    assert len(out) > 0.9 * student.config.scan_points * student.config.replication
    assert np.isfinite(out).all()
    assert np.linalg.norm(out, axis=1).max() <= student.config.max_range + 1e-3


def test_default_teacher_has_the_same_networks():
    teacher = Completer.from_pretrained('default-teacher', device='cpu')
    assert teacher.config.role == 'teacher' and teacher.config.steps == 50
    assert teacher.config.channel_ratio == 0.25 and teacher.config.resolution == 0.1
