"""Completing and scoring the scans of an evaluation, with a resumable per-scan cache.

Each (run, scan) result is one small JSON file under ``OUT/cache/RUN/SETTINGS/``, written as soon
as it is computed; a killed evaluation continues where it stopped and a repeated one recomputes
nothing. :func:`collect` turns the cache into one table row per run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros import metrics
from distdpo_ros.atomic import atomic_writer
from distdpo_ros.errors import UserError
from distdpo_training.evaluation.runs import Evaluation, Run, ScanRef, Settings, render_scans

CACHE_DIR = 'cache'


class ScanCache:
    """One JSON file per (run, scan) under OUT/cache/RUN/SETTINGS/; predictions for renders."""

    def __init__(self, out: Path, settings: Settings) -> None:
        self.root = out / CACHE_DIR
        self.settings_digest = settings.digest()

    def folder(self, run: Run) -> Path:
        return self.root / run.key / self.settings_digest

    def path(self, run: Run, scan: ScanRef) -> Path:
        return self.folder(run) / f'{scan.key}.json'

    def prediction_path(self, run: Run, scan: ScanRef) -> Path:
        return self.folder(run) / f'{scan.key}.npy'

    def load(self, run: Run, scan: ScanRef) -> dict[str, Any] | None:
        """The cached record, or None when missing or unreadable (then it is recomputed)."""
        path = self.path(run, scan)
        try:
            record = json.loads(path.read_text(encoding='utf-8'))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and record.get('scan') == scan.key else None

    def store(self, run: Run, scan: ScanRef, record: dict[str, Any]) -> None:
        path = self.path(run, scan)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as handle:
            handle.write(json.dumps(record).encode())

    def store_prediction(self, run: Run, scan: ScanRef, points: np.ndarray) -> None:
        path = self.prediction_path(run, scan)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as handle:
            np.save(handle, np.asarray(points, dtype=np.float32))

    def load_prediction(self, run: Run, scan: ScanRef) -> np.ndarray | None:
        path = self.prediction_path(run, scan)
        return np.load(path, allow_pickle=False) if path.is_file() else None


class _Models:
    """Completers loaded on first use (a fully cached evaluation never loads a model)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.loaded: dict[str, Any] = {}
        self.warm: set[tuple[str, int]] = set()

    def get(self, path: str) -> Any:
        if path not in self.loaded:
            from distdpo_ros.completion import Completer

            self.loaded[path] = Completer.from_pretrained(path, device=self.device)
        return self.loaded[path]


def _complete(completer: Any, scan: np.ndarray, steps: int, refine: bool, settings: Settings,
              seed: int) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """(raw completion, refined completion or None, seconds raw, seconds refine)."""
    import torch

    from distdpo_ros.completion import refine_points

    started = time.perf_counter()
    raw = completer.complete(scan, steps=steps, guidance=settings.guidance,
                             sampler=settings.sampler, seed=seed)
    raw_seconds = time.perf_counter() - started
    if not refine:
        return raw, None, raw_seconds, 0.0
    started = time.perf_counter()
    with torch.inference_mode():
        refined = refine_points(completer.bundle.refine,
                                torch.from_numpy(raw).to(completer.device))
        refined = refined.float().cpu().numpy()
    return raw, refined, raw_seconds, time.perf_counter() - started


def _score(pred: np.ndarray, gt: np.ndarray, settings: Settings, device: str,
           seed: int) -> dict[str, Any]:
    """scan_metrics; on a CUDA device the nearest-neighbour searches run on the GPU."""
    if device.startswith('cuda'):
        import torch

        pred, gt = torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device)
    return metrics.scan_metrics(pred, gt, voxel_sizes=settings.voxel_sizes,
                                emd_points=settings.emd_points, seed=seed)


def evaluate_shard(ev: Evaluation, runs: Sequence[Run], scans: Sequence[ScanRef], *,
                   progress_label: str = 'evaluate') -> dict[str, int]:
    """Complete and score every (run, scan) pair that is not cached yet; return counts."""
    from tqdm import tqdm

    cache = ScanCache(ev.out, ev.settings)
    models = _Models(ev.device)
    render_keys = {s.key for s in render_scans(ev.scans, ev.renders)}
    counts = {'computed': 0, 'cached': 0}
    bar = tqdm(total=len(runs) * len(scans), desc=progress_label, unit='scan', file=sys.stderr,
               dynamic_ncols=True)
    try:
        for scan in scans:
            todo = [r for r in runs if cache.load(r, scan) is None]
            counts['cached'] += len(runs) - len(todo)
            bar.update(len(runs) - len(todo))
            if not todo:
                continue
            points, gt = ev.dataset.scan_and_ground_truth(scan)
            inputs: dict[str, Any] = {}  # the baseline clouds of this scan, made once
            for run in _group_refined(todo):
                seed = ev.settings.seed + scan.order
                if run.baseline:
                    _evaluate_baseline(ev, cache, run, scan, points, gt, seed, inputs)
                    continue
                completer = models.get(run.path)
                if ev.warmup and (run.path, run.steps) not in models.warm:
                    _try_complete(completer, points, run, ev.settings, seed)
                    models.warm.add((run.path, run.steps))
                _evaluate_pair(ev, cache, completer, run, scan, points, gt, seed,
                               [r for r in todo if r.path == run.path and r.steps == run.steps],
                               scan.key in render_keys)
            counts['computed'] += len(todo)
            bar.update(len(todo))
    finally:
        bar.close()
    return counts


def _group_refined(todo: Sequence[Run]) -> list[Run]:
    """One representative per (model, steps): raw and refined rows share one diffusion.
    Every input baseline is its own group."""
    seen, out = set(), []
    for run in todo:
        group = (run.path, run.steps, run.baseline)
        if group not in seen:
            seen.add(group)
            out.append(run)
    return out


def _evaluate_baseline(ev: Evaluation, cache: ScanCache, run: Run, scan: ScanRef,
                       points: np.ndarray, gt: np.ndarray, seed: int,
                       inputs: dict[str, Any]) -> None:
    """Score and cache one input baseline of a scan (see evaluation.baselines); `inputs` holds
    the scan's baseline clouds (or the reason they failed) once made."""
    from distdpo_ros.checkpoint import load_config
    from distdpo_training.evaluation.baselines import scan_input_clouds

    base = {'scan': scan.key, 'sequence': scan.sequence, 'frame': scan.frame,
            'points_input': int(len(points)), 'seed': seed, 'seconds': 0.0}
    if not inputs:
        try:
            inputs.update(scan_input_clouds(points, load_config(run.path), seed, scan.key))
        except UserError as exc:  # a scan with too few valid points
            inputs['failed'] = str(exc)
    record = dict(base)
    if 'failed' in inputs:
        record['failed'] = inputs['failed']
    elif len(gt) == 0:
        record['failed'] = 'empty ground truth'
    else:
        record.update(_score(inputs[run.baseline], gt, ev.settings, ev.device, seed))
    cache.store(run, scan, record)


def _try_complete(completer: Any, points: np.ndarray, run: Run, settings: Settings,
                  seed: int) -> None:
    try:
        completer.complete(points, steps=run.steps, guidance=settings.guidance,
                           sampler=settings.sampler, seed=seed)
    except UserError:
        pass  # the scored call reports the problem for this scan


def _evaluate_pair(ev: Evaluation, cache: ScanCache, completer: Any, run: Run, scan: ScanRef,
                   points: np.ndarray, gt: np.ndarray, seed: int, rows: Sequence[Run],
                   keep_prediction: bool) -> None:
    """Complete once for (model, steps); score and cache the raw and/or refined rows."""
    base = {'scan': scan.key, 'sequence': scan.sequence, 'frame': scan.frame,
            'points_input': int(len(points)), 'seed': seed}
    try:
        raw, refined, raw_seconds, refine_seconds = _complete(
            completer, points, run.steps, any(r.refine for r in rows), ev.settings, seed)
    except UserError as exc:  # a scan the model cannot take (too few valid points)
        for row in rows:
            cache.store(row, scan, {**base, 'failed': str(exc)})
        return
    for row in rows:
        pred = refined if row.refine else raw
        seconds = raw_seconds + (refine_seconds if row.refine else 0.0)
        record = {**base, 'seconds': seconds}
        if len(pred) == 0:
            record['failed'] = 'empty completion'
        elif len(gt) == 0:
            record['failed'] = 'empty ground truth'
        else:
            record.update(_score(pred, gt, ev.settings, ev.device, seed))
        if keep_prediction and len(pred):
            cache.store_prediction(row, scan, pred)
        cache.store(row, scan, record)


def summarise(run: Run, records: Sequence[dict[str, Any]],
              voxel_sizes: Sequence[float]) -> dict[str, Any]:
    """One table row from the per-scan records of a run (IoU from counts summed over scans)."""
    good = [r for r in records if 'failed' not in r]
    row: dict[str, Any] = {
        'model': run.model, 'steps': run.steps, 'nfe': run.steps, 'refine': run.refine,
        'baseline': run.baseline, 'scans': len(records), 'failed': len(records) - len(good),
    }
    for key in ('cd', 'jsd', 'jsd_3d', 'emd', 'precision', 'recall', 'fscore'):
        values = np.array([r[key] for r in good], dtype=np.float64)
        row[key] = float(values.mean()) if len(values) else float('nan')
        if key == 'cd':
            row['cd_std'] = float(values.std()) if len(values) else float('nan')
    for variant, prefix in (('iou_counts', 'iou'), ('iou_counts_legacy', 'iou_legacy')):
        for v in voxel_sizes:
            total = metrics.IoUCounts(0, 0, 0)
            for r in good:
                total = total + metrics.IoUCounts(*r[variant][str(v)])
            row[f'{prefix}_{v:g}'] = 100.0 * total.iou if good else float('nan')
    seconds = np.array([r['seconds'] for r in records if 'seconds' in r], dtype=np.float64)
    row['seconds_per_scan'] = float(seconds.mean()) if len(seconds) else float('nan')
    row['points_pred'] = float(np.mean([r['points_pred'] for r in good])) if good else 0.0
    row['model_path'] = run.path
    row['model_digest'] = run.digest
    return row


def collect(ev: Evaluation, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Rows of every run from the cache; UserError if a scan is missing (a rank that died)."""
    cache = ScanCache(ev.out, ev.settings)
    rows = []
    for run in runs:
        records = []
        for scan in ev.scans:
            record = cache.load(run, scan)
            if record is None:
                raise UserError(f'{cache.path(run, scan)}: result missing (a process stopped '
                                'early?); run the same command again to complete it')
            records.append(record)
        rows.append(summarise(run, records, ev.settings.voxel_sizes))
    return rows
