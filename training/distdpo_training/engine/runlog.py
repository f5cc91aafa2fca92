"""Run logs on rank 0: one JSON object per line in OUT/log.jsonl, and TensorBoard if installed."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Appends records {"kind", "step", "time", ...} to log.jsonl (flushed) and TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / 'log.jsonl'
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, 'a', encoding='utf-8')  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
            except ImportError:
                print('distdpo: tensorboard is not installed; logging to log.jsonl only',
                      file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(Path(out_dir) / 'tensorboard'))

    def write(self, step: int, values: dict[str, Any], kind: str = 'train') -> None:
        if not self.enabled:
            return
        record = {'kind': kind, 'step': step, 'time': round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self._tb.add_scalar(f'{kind}/{key}', value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_log(path: Path, kind: str = 'train') -> list[dict[str, Any]]:
    """Records of one kind, the last record of each step winning (a resumed run re-logs steps)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding='utf-8').splitlines():
        record = json.loads(line)
        if record.get('kind') == kind:
            by_step[record['step']] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_log(path: Path, out: Path, train_key: str = 'loss', val_key: str = 'cd') -> Path:
    """A PNG of a run: the training loss and the validation metric against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: training-only dependency
    from matplotlib.figure import Figure

    from distdpo_ros.atomic import atomic_writer

    train = [r for r in read_log(path) if train_key in r]
    val = [r for r in read_log(path, kind='val') if val_key in r]
    fig = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax_train, ax_val = fig.subplots(1, 2)
    ax_train.plot([r['step'] for r in train], [r[train_key] for r in train], lw=1)
    ax_train.set(xlabel='step', ylabel=train_key, title=f'training {train_key}')
    ax_val.plot([r['step'] for r in val], [r[val_key] for r in val], 'o-')
    ax_val.set(xlabel='step', ylabel=val_key, title=f'validation {val_key}')
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out) as handle:
        fig.savefig(handle, format='png')
    return out
