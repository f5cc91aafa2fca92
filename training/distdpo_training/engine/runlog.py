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


INPUT_LABELS = {'raw': 'raw scan', 'cond': 'conditioning points',
                'jit': 'jittered conditioning', 'sub': 'raw scan subsampled'}


def plot_log(path: Path, out: Path, train_keys: tuple[str, ...] = ('loss', 'assistant_loss'),
             val_keys: tuple[str, ...] = ('cd', 'fscore')) -> Path:
    """A PNG of a run: the first training loss of `train_keys` it logged (distillation logs
    `assistant_loss`), then each validation metric against the step with the
    input baselines of the same scans (`KEY_input_raw`, ...) as dashed lines, so the picture says
    whether the model adds anything to its input."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: training-only dependency
    from matplotlib.figure import Figure

    from distdpo_ros.atomic import atomic_writer

    records = read_log(path)
    train_key = next((k for k in train_keys if any(k in r for r in records)), train_keys[0])
    train = [r for r in records if train_key in r]
    val = read_log(path, kind='val')
    keys = [k for k in val_keys if any(k in r for r in val)]
    fig = Figure(figsize=(5 * (1 + len(keys)), 4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(keys), squeeze=False)[0]
    axes[0].plot([r['step'] for r in train], [r[train_key] for r in train], lw=1)
    axes[0].set(xlabel='step', ylabel=train_key, title=f'training {train_key}')
    for ax, key in zip(axes[1:], keys, strict=True):
        rows = [r for r in val if key in r]
        ax.plot([r['step'] for r in rows], [r[key] for r in rows], 'o-', color='black',
                label='model')
        for name, label in INPUT_LABELS.items():
            base = [r for r in rows if f'{key}_input_{name}' in r]
            if base:
                ax.plot([r['step'] for r in base], [r[f'{key}_input_{name}'] for r in base],
                        '--', lw=1, label=f'input: {label}')
        ax.set(xlabel='step', ylabel=key, title=f'validation {key}')
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out) as handle:
        fig.savefig(handle, format='png')
    return out
