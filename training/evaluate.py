"""Evaluate completion models on a dataset split: the paper's tables, plots and Fig.-1 pictures.

For every model, sampler step count and refinement setting (one *run*), every scan of the split is
completed with :class:`distdpo_ros.completion.Completer` and scored against its evaluation ground
truth with :func:`distdpo_ros.metrics.scan_metrics`. Each scan's result is written at once to a
small JSON file in ``OUT/cache/``, keyed by the model's weight digest, the run and the scan, so a
killed evaluation continues where it stopped and a repeated one recomputes nothing. Under
``torchrun`` the scans are sharded over the processes (RANK / WORLD_SIZE); rank 0 then merges the
cache into

- ``results.json`` (one row per run) and ``results.csv``;
- ``results.md``: the layout of the paper's Tables 1-2 (model, NFE, CD, JSD, EMD, P/R/F, IoU,
  seconds per scan), plus the legacy cropped IoU for comparison with published numbers;
- ``quality_vs_steps.png``, ``time_vs_steps.png`` and ``renders/*.png`` (Fig.-1 layout).

Timing: seconds per scan is the wall time of the completion (pre-processing, sampling,
post-processing, and for refined rows the refinement), after one untimed warm-up completion per
run and process (``--no-warmup`` skips it); metric computation is not included. Refined rows
reuse the unrefined sample of the same seed and add the refinement net's offsets, exactly what
``Completer.complete(..., refine=True)`` returns, so ``--refine`` costs one refinement pass, not
a second diffusion.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros import metrics
from distdpo_ros.errors import UserError
from distdpo_ros.pointio import atomic_writer

CACHE_FORMAT = 1  # bump when the meaning of a cached scan changes
CACHE_DIR = 'cache'
RENDER_DIR = 'renders'


# ---------------------------------------------------------------------------------------------
# what is evaluated


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its display name, checkpoint and sampler step counts."""

    name: str
    path: str
    steps: tuple[int, ...]


@dataclass(frozen=True)
class Run:
    """One row of the tables: a model at a step count, refined or not."""

    model: str
    path: str
    digest: str
    steps: int
    refine: bool

    @property
    def label(self) -> str:
        return self.model + (' (Refined)' if self.refine else '')

    @property
    def key(self) -> str:
        return f'{_slug(self.model)}-{self.digest[:12]}/steps{self.steps:03d}-' + (
            'refined' if self.refine else 'raw')


@dataclass(frozen=True)
class ScanRef:
    """One scan of the split: sequence name, position in the sequence and frame number."""

    sequence: str
    position: int
    frame: int
    order: int  # position in the evaluated list (seeds and shards depend on it, not on ranks)

    @property
    def key(self) -> str:
        return f'{self.sequence}_{self.frame:06d}'


@dataclass
class Settings:
    """Everything besides the model that changes a cached number (hashed into the cache path)."""

    guidance: float | None = None
    seed: int = 0
    emd_points: int = metrics.EMD_POINTS
    voxel_sizes: tuple[float, ...] = metrics.IOU_VOXEL_SIZES

    def digest(self) -> str:
        text = json.dumps({**asdict(self), 'format': CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class Evaluation:
    """A whole `distdpo evaluate` call."""

    models: list[ModelSpec]
    scans: list[ScanRef]
    dataset: KittiScans
    out: Path
    settings: Settings = field(default_factory=Settings)
    refine: bool = False
    device: str = 'cpu'
    renders: int = 3
    description: str = ''
    warmup: bool = True  # one untimed completion per (model, steps) and process


def _slug(text: str) -> str:
    keep = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in text.strip())
    return keep.strip('_') or 'model'


def model_digest(path: str | os.PathLike) -> str:
    """SHA-256 recorded in a checkpoint's weights header (falls back to hashing the file)."""
    import safetensors

    from distdpo_ros.checkpoint import WEIGHTS_FILE, resolve_model

    weights = resolve_model(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f'{weights}: missing; not a checkpoint directory')
    with safetensors.safe_open(str(weights), framework='pt') as handle:
        recorded = (handle.metadata() or {}).get('distdpo_sha256')
    if recorded:
        return recorded
    digest = hashlib.sha256()
    with open(weights, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def make_runs(models: Sequence[ModelSpec], refine: bool) -> list[Run]:
    runs = []
    for spec in models:
        digest = model_digest(spec.path)
        for steps in spec.steps:
            for refined in ((False, True) if refine else (False,)):
                runs.append(Run(spec.name, spec.path, digest, steps, refined))
    return runs


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """Indices of ``limit`` scans spread evenly over ``count`` (all of them without a limit)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


# ---------------------------------------------------------------------------------------------
# the dataset


class KittiScans:
    """Scans and evaluation ground truth of a SemanticKITTI-layout dataset (real or simulated).

    The ground truth of a scan is :func:`distdpo_training.samples.evaluation_ground_truth`
    (reference §5) with the given ``max_range``; one sequence map is held in memory at a time.
    """

    def __init__(self, root: str | os.PathLike, split: str = 'val',
                 sequences: Sequence[str] | None = None, max_range: float = 50.0) -> None:
        from distdpo_training.kitti import KittiSequence, find_sequences
        from distdpo_training.samples import SPLITS

        if sequences is None and split not in SPLITS:
            raise UserError(f'--split {split!r}: use {" / ".join(SPLITS)}, or --sequences')
        names = list(sequences) if sequences is not None else list(SPLITS[split])
        self.root = Path(root)
        self.max_range = max_range
        self.sequences = {p.name: KittiSequence(p) for p in find_sequences(root, names)}
        for seq in self.sequences.values():
            if not seq.map_path.is_file():
                raise UserError(f'{seq.map_path}: ground-truth map is missing; run '
                                f'`distdpo build-maps {root}` first')
        self._map: tuple[str, Any] | None = None

    def scan_refs(self, limit: int | None = None) -> list[ScanRef]:
        """The evaluated scans in sequence and frame order (``limit`` of them, evenly spread)."""
        every = [(name, i, int(seq.frame_ids[i])) for name, seq in self.sequences.items()
                 for i in range(len(seq))]
        picked = [every[i] for i in evenly_spaced(len(every), limit)]
        return [ScanRef(name, i, frame, order) for order, (name, i, frame) in enumerate(picked)]

    def scan_and_ground_truth(self, ref: ScanRef) -> tuple[np.ndarray, np.ndarray]:
        """The raw scan (N, 4) float32 and its evaluation ground truth (M, 3) float32."""
        from distdpo_training.maps import load_map
        from distdpo_training.samples import MapIndex, evaluation_ground_truth

        seq = self.sequences[ref.sequence]
        if self._map is None or self._map[0] != ref.sequence:
            self._map = (ref.sequence, MapIndex(load_map(seq.path)))
        gt = evaluation_ground_truth(seq, ref.position, self._map[1], max_range=self.max_range)
        return seq.scan(ref.position), gt


# ---------------------------------------------------------------------------------------------
# the per-scan cache


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


# ---------------------------------------------------------------------------------------------
# computing


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


def _complete(completer: Any, scan: np.ndarray, steps: int, refine: bool, guidance: float | None,
              seed: int) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """(raw completion, refined completion or None, seconds raw, seconds refine)."""
    import torch

    from distdpo_ros.completion import refine_points

    started = time.perf_counter()
    raw = completer.complete(scan, steps=steps, guidance=guidance, seed=seed)
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
            for run in _group_refined(todo):
                completer = models.get(run.path)
                seed = ev.settings.seed + scan.order
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
    """One representative per (model, steps): raw and refined rows share one diffusion."""
    seen, out = set(), []
    for run in todo:
        if (run.path, run.steps) not in seen:
            seen.add((run.path, run.steps))
            out.append(run)
    return out


def _try_complete(completer: Any, points: np.ndarray, run: Run, settings: Settings,
                  seed: int) -> None:
    try:
        completer.complete(points, steps=run.steps, guidance=settings.guidance, seed=seed)
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
            completer, points, run.steps, any(r.refine for r in rows), ev.settings.guidance,
            seed)
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


# ---------------------------------------------------------------------------------------------
# merging: rows, tables, plots, renders


def summarise(run: Run, records: Sequence[dict[str, Any]],
              voxel_sizes: Sequence[float]) -> dict[str, Any]:
    """One table row from the per-scan records of a run (IoU from counts summed over scans)."""
    good = [r for r in records if 'failed' not in r]
    row: dict[str, Any] = {
        'model': run.model, 'steps': run.steps, 'nfe': run.steps, 'refine': run.refine,
        'scans': len(records), 'failed': len(records) - len(good),
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


CSV_FIELDS = ('model', 'nfe', 'refine', 'cd', 'cd_std', 'jsd', 'jsd_3d', 'emd', 'precision',
              'recall', 'fscore')


def write_results(ev: Evaluation, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """results.json, results.csv and results.md in OUT; returns their paths."""
    ev.out.mkdir(parents=True, exist_ok=True)
    written = []
    path = ev.out / 'results.json'
    with atomic_writer(path) as handle:
        handle.write((json.dumps(_json_safe(rows), indent=2) + '\n').encode())
    written.append(path)
    path = ev.out / 'results.csv'
    names = list(dict.fromkeys([*CSV_FIELDS, *(k for r in rows for k in r)]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    with atomic_writer(path) as handle:
        handle.write(text.getvalue().encode())
    written.append(path)
    path = ev.out / 'results.md'
    with atomic_writer(path) as handle:
        handle.write(markdown_table(rows, ev.settings, ev.description, ev.device).encode())
    written.append(path)
    return written


def _json_safe(value: Any) -> Any:
    """NaN/Inf become null: results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: Any, digits: int) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return '-'
    return f'{value:.{digits}f}'


def markdown_table(rows: Sequence[dict[str, Any]], settings: Settings, description: str = '',
                   device: str = '') -> str:
    """The paper's Tables 1-2 layout, extended with P/R/F and IoU, plus the legacy IoU table."""
    sizes = settings.voxel_sizes
    iou_head = 'IoU ' + ' / '.join(f'{v:g}' for v in sizes) + ' m ↑'
    any_failed = any(r['failed'] for r in rows)
    head = ['Model', 'NFE', 'CD ↓', 'JSD ↓', 'EMD ↓', 'P ↑', 'R ↑', 'F ↑', iou_head, 'Time (s) ↓']
    if any_failed:
        head.append('failed scans')
    lines = [f'# Scene completion{": " + description if description else ""}', '',
             '| ' + ' | '.join(head) + ' |',
             '|' + '|'.join(['---'] + ['---:'] * (len(head) - 1)) + '|']
    for r in rows:
        cells = [r['model'] + (' (Refined)' if r['refine'] else ''), str(r['nfe']),
                 _fmt(r['cd'], 3), _fmt(r['jsd'], 3), _fmt(r['emd'], 3),
                 _fmt(r['precision'], 1), _fmt(r['recall'], 1), _fmt(r['fscore'], 1),
                 ' / '.join(_fmt(r[f'iou_{v:g}'], 1) for v in sizes),
                 _fmt(r['seconds_per_scan'], 2)]
        if any_failed:
            cells.append(f'{r["failed"]} of {r["scans"]}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    scans = rows[0]['scans'] if rows else 0
    lines += [
        '',
        f'{scans} scans per row. CD and EMD in metres. JSD: Jensen-Shannon distance of 0.5 m '
        'bird\'s-eye-view occupancy over ±50 m. P/R/F: % within 5-10 cm (area under the '
        'threshold curve). IoU: % of occupied voxels over the whole ±50 m cube, counts summed '
        f'over scans. EMD: exact W1 between {settings.emd_points}-point space-filling-curve '
        'samples (not comparable with the released Sinkhorn values). Time: seconds of '
        f'completion per scan{" on " + device if device else ""}, metrics excluded.',
        '',
        '## Legacy cropped IoU (released code before LiDiff e5305f9; central ±50·v m cube)',
        '',
        '| Model | NFE | ' + ' | '.join(f'IoU {v:g} m (±{50 * v:g} m)' for v in sizes) + ' |',
        '|' + '|'.join(['---'] + ['---:'] * (len(sizes) + 1)) + '|',
    ]
    for r in rows:
        lines.append('| ' + ' | '.join(
            [r['model'] + (' (Refined)' if r['refine'] else ''), str(r['nfe'])]
            + [_fmt(r[f'iou_legacy_{v:g}'], 1) for v in sizes]) + ' |')
    return '\n'.join(lines) + '\n'


QUALITY_PLOT = (('cd', 'CD [m] ↓'), ('jsd', 'JSD (BEV) ↓'), ('emd', 'EMD [m] ↓'),
                ('fscore', 'F-score [%] ↑'))


def write_plots(ev: Evaluation, rows: Sequence[dict[str, Any]]) -> list[Path]:
    from distdpo_training.render import plot_versus_steps

    first_iou = f'iou_{ev.settings.voxel_sizes[0]:g}' if ev.settings.voxel_sizes else None
    quality = list(QUALITY_PLOT)
    if first_iou:
        quality.append((first_iou, f'IoU {ev.settings.voxel_sizes[0]:g} m [%] ↑'))
    return [plot_versus_steps(rows, ev.out / 'quality_vs_steps.png', quality),
            plot_versus_steps(rows, ev.out / 'time_vs_steps.png',
                              [('seconds_per_scan', 'seconds per scan ↓')], panel_px=640)]


def render_scans(scans: Sequence[ScanRef], count: int) -> list[ScanRef]:
    """The scans drawn as figures: ``count`` spread evenly over the evaluated scans."""
    if count <= 0 or not scans:
        return []
    return [scans[i] for i in evenly_spaced(len(scans), count)]


def _headline_runs(runs: Sequence[Run], default_steps: Callable[[str], int]) -> list[Run]:
    """Per model the run its figure panel shows: its default step count (else the most steps),
    refined when evaluated refined."""
    chosen = []
    for model in dict.fromkeys(r.model for r in runs):
        own = [r for r in runs if r.model == model]
        steps = {r.steps for r in own}
        target = default_steps(own[0].path)
        pick_steps = target if target in steps else max(steps)
        candidates = [r for r in own if r.steps == pick_steps]
        chosen.append(max(candidates, key=lambda r: r.refine))
    return chosen


def write_renders(ev: Evaluation, runs: Sequence[Run]) -> list[Path]:
    """Fig.-1-style pictures (input, GT, one panel per model) for the render scans."""
    from distdpo_ros.checkpoint import load_config
    from distdpo_training.render import Panel, crop_to_radius, render_figure

    cache = ScanCache(ev.out, ev.settings)
    headline = _headline_runs(runs, lambda path: load_config(path).steps)
    written = []
    for scan in render_scans(ev.scans, ev.renders):
        points, gt = ev.dataset.scan_and_ground_truth(scan)
        panels = [Panel('Input scan', crop_to_radius(points, ev.dataset.max_range)),
                  Panel('Ground truth', gt)]
        for run in headline:
            pred = cache.load_prediction(run, scan)
            record = cache.load(run, scan) or {}
            if pred is None:
                continue
            detail = f'CD {record["cd"]:.3f} m' if 'cd' in record else record.get('failed', '')
            if 'seconds' in record:
                detail += f' · {record["seconds"]:.2f} s'
            panels.append(Panel(f'{run.label} · {run.steps} steps', pred, detail))
        path = ev.out / RENDER_DIR / f'{scan.key}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(render_figure(panels, path, title=f'{ev.description} · {scan.key}'))
    return written


def finish(ev: Evaluation, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Merge the cache into results, tables, plots and renders (rank 0 only)."""
    rows = collect(ev, runs)
    write_results(ev, rows)
    write_plots(ev, rows)
    write_renders(ev, runs)
    return rows


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Every world_size-th item starting at rank (balanced over the sequence, deterministic)."""
    return list(items[rank::world_size])


def run_evaluation(ev: Evaluation, rank: int = 0, world_size: int = 1,
                   barrier: Callable[[], None] = lambda: None) -> list[dict[str, Any]] | None:
    """Evaluate this rank's shard, wait for all ranks, and (rank 0) write the outputs."""
    runs = make_runs(ev.models, ev.refine)
    label = 'evaluate' if world_size == 1 else f'evaluate rank {rank}'
    counts = evaluate_shard(ev, runs, shard(ev.scans, rank, world_size), progress_label=label)
    print(f'{label}: {counts["computed"]} results computed, {counts["cached"]} from the cache '
          f'in {ev.out / CACHE_DIR}', file=sys.stderr)
    barrier()
    if rank != 0:
        return None
    return finish(ev, runs)
