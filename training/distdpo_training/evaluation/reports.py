"""The outputs of an evaluation: results.json / .csv / .md (the paper's Tables 1-2 layout),
quality- and time-versus-steps plots, and Fig.-1-style renders of a few scans."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distdpo_ros.atomic import atomic_writer
from distdpo_training.evaluation.runs import Evaluation, Run, Settings, render_scans
from distdpo_training.evaluation.scoring import ScanCache

RENDER_DIR = 'renders'


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


def compare_with_inputs(rows: Sequence[dict[str, Any]]) -> None:
    """Add to every model row `beats_inputs`: {baseline: [lower CD, higher F-score]} against
    the input baseline rows of the same evaluation (none when there are no baseline rows)."""
    from distdpo_training.evaluation.baselines import beats

    inputs = {r['baseline']: r for r in rows if r.get('baseline')}
    for row in rows:
        if not row.get('baseline') and inputs:
            row['beats_inputs'] = {name: list(beats(row, base)) for name, base in inputs.items()}


def _verdict(row: dict[str, Any]) -> str:
    """'cond ✓✓ · jit ✓✗ · ...' (CD then F-score) for a model row, '' for a baseline."""
    from distdpo_training.evaluation.baselines import SHORT

    marks = row.get('beats_inputs') or {}
    return ' · '.join(f'{SHORT.get(name, name)} ' + ''.join('✓' if ok else '✗' for ok in pair)
                      for name, pair in marks.items())


def markdown_table(rows: Sequence[dict[str, Any]], settings: Settings, description: str = '',
                   device: str = '') -> str:
    """The paper's Tables 1-2 layout, extended with P/R/F and IoU, plus the legacy IoU table.

    Input baseline rows (NFE '-') come first; each model row then says which of them it beats
    on CD and on F-score.
    """
    sizes = settings.voxel_sizes
    iou_head = 'IoU ' + ' / '.join(f'{v:g}' for v in sizes) + ' m ↑'
    any_failed = any(r['failed'] for r in rows)
    with_inputs = any(r.get('baseline') for r in rows)
    head = ['Model', 'NFE', 'CD ↓', 'JSD ↓', 'EMD ↓', 'P ↑', 'R ↑', 'F ↑', iou_head, 'Time (s) ↓']
    if with_inputs:
        head.append('beats inputs (CD F)')
    if any_failed:
        head.append('failed scans')
    lines = [f'# Scene completion{": " + description if description else ""}', '',
             '| ' + ' | '.join(head) + ' |',
             '|' + '|'.join(['---'] + ['---:'] * (len(head) - 1)) + '|']
    for r in rows:
        baseline = bool(r.get('baseline'))
        cells = [r['model'] + (' (Refined)' if r['refine'] else ''),
                 '-' if baseline else str(r['nfe']),
                 _fmt(r['cd'], 3), _fmt(r['jsd'], 3), _fmt(r['emd'], 3),
                 _fmt(r['precision'], 1), _fmt(r['recall'], 1), _fmt(r['fscore'], 1),
                 ' / '.join(_fmt(r[f'iou_{v:g}'], 1) for v in sizes),
                 '-' if baseline else _fmt(r['seconds_per_scan'], 2)]
        if with_inputs:
            cells.append(_verdict(r))
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
        f'completion per scan{" on " + device if device else ""}, metrics excluded.'
        + (' Input rows: what the user has without a model, on the same scans (raw: every '
           'scan point in range; cond: the conditioning points; jit: those tiled K times + '
           '0.2 m noise; sub: the raw scan randomly subsampled to the output size K x M). '
           '"beats inputs": ✓ where the model has the lower CD / the higher F-score.'
           if with_inputs else ''),
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
    from distdpo_training.evaluation.render import plot_versus_steps

    first_iou = f'iou_{ev.settings.voxel_sizes[0]:g}' if ev.settings.voxel_sizes else None
    quality = list(QUALITY_PLOT)
    if first_iou:
        quality.append((first_iou, f'IoU {ev.settings.voxel_sizes[0]:g} m [%] ↑'))
    return [plot_versus_steps(rows, ev.out / 'quality_vs_steps.png', quality),
            plot_versus_steps([r for r in rows if not r.get('baseline')],
                              ev.out / 'time_vs_steps.png',
                              [('seconds_per_scan', 'seconds per scan ↓')], panel_px=640)]


def _headline_runs(runs: Sequence[Run], default_steps: Callable[[str], int]) -> list[Run]:
    """Per model the run its figure panel shows: its default step count (else the most steps),
    refined when evaluated refined. Input baselines have no panel (the figure shows the scan)."""
    chosen = []
    runs = [r for r in runs if not r.baseline]
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
    from distdpo_training.evaluation.render import Panel, crop_to_radius, render_figure

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
