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
                                                                          3.5)
    assert config.notes.get('trained_by') == 'distdpo train distill'


def test_default_student_completes_a_scan_near_the_input(student):
    scan = synthetic_scan(seed=3)
    out = student.complete(scan, steps=2, seed=0)
    assert out.dtype == np.float32 and out.shape[1] == 3 and len(out) > 1000
    assert np.isfinite(out).all()
    assert np.linalg.norm(out, axis=1).max() <= student.config.max_range + 1e-3


def test_default_teacher_has_the_same_networks():
    teacher = Completer.from_pretrained('default-teacher', device='cpu')
    assert teacher.config.role == 'teacher' and teacher.config.steps == 50
    assert teacher.config.channel_ratio == 0.25 and teacher.config.resolution == 0.1
