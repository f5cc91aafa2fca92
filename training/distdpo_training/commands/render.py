"""`distdpo render`: a Fig.-1-style PNG (input scan, ground truth, teacher, student).

Each cloud comes from a point file (.bin .npy .ply .pcd) or is computed by running a model on the
scan::

    distdpo render --scan 000123.bin --gt gt.npy --model runs/student --teacher runs/teacher \\
        --out fig1.png
    distdpo render --scan scan.ply --gt gt.ply --teacher-points t.npy --student-points s.npy \\
        --out fig1.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from distdpo_ros.errors import UserError
from distdpo_ros.settings import SamplingSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Draw input scan, ground truth, teacher and student completions side by side: a '
        'bird\'s-eye view over a perspective view, coloured by height with one colour scale, '
        'one set of limits and one camera for all panels. Panels without input are left out.')
    parser.add_argument('--scan', required=True, type=Path,
                        help='the input LiDAR scan (.bin .npy .ply .pcd)')
    parser.add_argument('--gt', type=Path, help='ground-truth cloud; adds CD to the titles')
    parser.add_argument('--teacher', help='teacher checkpoint directory: complete the scan')
    parser.add_argument('--teacher-points', type=Path, help='or: a teacher completion file')
    parser.add_argument('--model', help='student checkpoint directory (or "default"): complete '
                                        'the scan')
    parser.add_argument('--student-points', type=Path, help='or: a student completion file')
    parser.add_argument('--teacher-name', default='Teacher',
                        help='title of the teacher panel (default: Teacher)')
    parser.add_argument('--name', default='Student',
                        help='title of the student panel (default: Student)')
    parser.add_argument('--steps', type=int, help='student steps (default: the model\'s own)')
    parser.add_argument('--teacher-steps', type=int,
                        help='teacher steps (default: the model\'s own)')
    parser.add_argument('--refine', action='store_true', help='refine computed completions')
    parser.add_argument('--seed', type=int, default=0, help='sampling seed (default: 0)')
    parser.add_argument('--device', default='auto',
                        help='auto, cpu, cuda or cuda:N (default: auto)')
    parser.add_argument('--bin-columns', type=int, default=4,
                        help='float32 values per point in .bin files: KITTI 4, nuScenes 5 '
                             '(default: 4)')
    parser.add_argument('--title', default='', help='figure title (default: none)')
    parser.add_argument('--extent', type=float,
                        help='half-width of the bird\'s-eye view in metres (default: from data)')
    parser.add_argument('--width', type=int, default=2400,
                        help='image width in pixels (default: 2400)')
    parser.add_argument('--out', required=True, type=Path, help='output PNG file')


def _model_panel(path: str, scan: np.ndarray, name: str, steps: int | None, refine: bool,
                 seed: int, device: str) -> tuple[str, np.ndarray, float]:
    from distdpo_ros.completion import Completer

    completer = Completer.from_pretrained(path, device=device)
    steps = SamplingSettings(steps).resolved(completer.config).steps
    completer.complete(scan, steps=steps, seed=seed)  # warm-up, untimed
    started = time.perf_counter()
    points = completer.complete(scan, steps=steps, refine=refine, seed=seed)
    seconds = time.perf_counter() - started
    title = f'{name} · {steps} steps' + (' (Refined)' if refine else '')
    return title, points, seconds


def run(args: argparse.Namespace) -> int:
    from distdpo_ros import metrics
    from distdpo_ros.pointio import read_points
    from distdpo_training.evaluation.render import Panel, crop_to_radius, render_figure

    if args.out.suffix.lower() != '.png':
        raise UserError(f'--out {args.out}: the figure is written as PNG, name it *.png')
    for flag, model, points in (('teacher', args.teacher, args.teacher_points),
                                ('model', args.model, args.student_points)):
        if model and points:
            raise UserError(f'give either --{flag} or its points file, not both')
    scan = read_points(args.scan, bin_columns=args.bin_columns)
    gt = read_points(args.gt, bin_columns=args.bin_columns) if args.gt is not None else None
    computed: list[tuple[str, np.ndarray, float | None]] = []
    for model, points, name, steps in ((args.teacher, args.teacher_points, args.teacher_name,
                                        args.teacher_steps),
                                       (args.model, args.student_points, args.name, args.steps)):
        if model:
            computed.append(_model_panel(model, scan, name, steps, args.refine, args.seed,
                                         args.device))
        elif points is not None:
            computed.append((name, read_points(points, bin_columns=args.bin_columns), None))
    shown = [c for _, c, _ in computed] + ([gt] if gt is not None else [])
    radius = max((float(np.linalg.norm(c, axis=1).max()) for c in shown if len(c)),
                 default=None)
    panels = [Panel('Input scan', crop_to_radius(scan, radius))]
    if gt is not None:
        panels.append(Panel('Ground truth', gt))
    for title, points, seconds in computed:
        details = []
        if gt is not None and len(points) and len(gt):
            details.append(f'CD {metrics.chamfer_distance(points, gt):.3f} m')
        if seconds is not None:
            details.append(f'{seconds:.2f} s')
        panels.append(Panel(title, points, ' · '.join(details)))
    path = render_figure(panels, args.out, title=args.title, extent=args.extent,
                         width_px=args.width, seed=args.seed)
    print(f'wrote {path}', file=sys.stderr)
    return 0
