"""`distdpo bench backbone --baseline REF`: another revision of the package, timed alongside."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from distdpo_ros.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _in_git_checkout() -> bool:
    if shutil.which('git') is None:
        return False
    probe = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason='needs git and a checkout of the project')
def test_baseline_revision_is_timed_alongside_with_the_same_numbers(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(['bench', 'backbone', '--scales', 'tiny', '--baseline', 'no-such-revision']) == 2
    capsys.readouterr()
    code = main(['bench', 'backbone', '--scales', 'tiny', '--runs', '1', '--timesteps', '999',
                 '--train', '--threads', '1', '--baseline', 'HEAD', '--json'])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report['baseline'] == 'HEAD'
    (tiny,) = report['results']
    (entry,) = tiny['timesteps']
    assert entry['baseline_wall_s'] > 0 and entry['speedup_vs_baseline'] > 0
    # HEAD's package and the working tree's compute the same network on the same weights
    assert entry['max_abs_diff_vs_baseline'] < 1e-4
    step = tiny['train_step']
    assert step['baseline_wall_s'] > 0 and step['loss_abs_diff_vs_baseline'] < 1e-5
