"""`distdpo bench metrics`: speed and peak memory of our metrics against the reference's methods.

On a 180,000-point prediction against a 180,000-point ground truth (a synthetic street scene, or
your own clouds with --pred/--gt), in one run:

- CD: ours (scipy cKDTree, all cores) against Open3D ``compute_point_cloud_distance`` both ways,
  which is what LiDiff / Distillation-DPO use;
- completion IoU: ours (sparse int64 voxel keys) against dense ``np.histogramdd`` occupancy grids
  over the ±50 m cube (LiDiff after e5305f9) at 0.5 m and 0.2 m; 0.1 m dense needs 1000³ bins
  (~25 GB) and is extrapolated from 0.2 m (bins x8) unless --dense-0.1 is given;
- JSD (BEV): ours against the reference's dense 200³ histograms;
- EMD: ours, plus its approximation error measured against the exact W1 of smaller clouds.

Times are medians of --repeats runs, ours and the reference alternating in one process so that
load changes on a shared machine hit both alike (the dense 0.2 m IoU runs once). Peak memory is
measured separately, one fresh process per metric: the growth of the peak resident set size over
the loaded clouds. The JSON also says how well the results agree (exactly, for these).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros.errors import UserError

SCENE_POINTS = 180_000


# ---------------------------------------------------------------------------------------------
# the clouds


def street_scene(points: int, seed: int, noise: float = 0.0, outliers: float = 0.0
                 ) -> np.ndarray:
    """Points sampled on a synthetic street within 50 m: road, facades, cars, poles, trees.

    Two calls with different seeds sample the same surfaces independently; ``noise`` adds
    Gaussian jitter, ``outliers`` replaces that fraction of points by uniform ones in the cube.
    """
    scene = np.random.default_rng(1234)  # the geometry is fixed; only the sampling varies
    rng = np.random.default_rng(seed)
    cars = np.column_stack([scene.uniform(-45, 45, 24), scene.choice([-6.5, 6.5], 24)])
    poles = np.column_stack([scene.uniform(-45, 45, 14), scene.choice([-9.0, 9.0], 14)])
    kind = rng.choice(5, points, p=[0.45, 0.3, 0.12, 0.05, 0.08])
    out = np.empty((points, 3))
    n = np.bincount(kind, minlength=5)
    # road and sidewalks: a disc of 50 m, sidewalks 15 cm higher beyond |y| > 8 m
    r, a = 50 * np.sqrt(rng.uniform(0, 1, n[0])), rng.uniform(0, 2 * np.pi, n[0])
    ground = np.column_stack([r * np.cos(a), r * np.sin(a), np.full(n[0], -1.73)])
    ground[np.abs(ground[:, 1]) > 8, 2] += 0.15
    out[kind == 0] = ground
    # facades at |y| = 12 (left) and 15 m (right), up to 9 m high, with gaps
    side = rng.choice([-12.0, 15.0], n[1])
    x = rng.uniform(-48, 48, n[1])
    x += np.where(np.sin(x / 3.0) > 0.85, 2.5, 0.0)
    out[kind == 1] = np.column_stack([x, side, rng.uniform(-1.58, 7.5, n[1])])
    # cars: boxes 4.2 x 1.8 x 1.5 m, points on their surface
    pick = cars[rng.integers(0, len(cars), n[2])]
    local = rng.uniform(-0.5, 0.5, (n[2], 3)) * [4.2, 1.8, 1.5]
    face = rng.integers(0, 3, n[2])
    rows = np.arange(n[2])
    local[rows, face] = np.sign(local[rows, face]) * np.array([2.1, 0.9, 0.75])[face]
    out[kind == 2] = np.column_stack([pick + local[:, :2], local[:, 2] - 0.98])
    # poles: cylinders of radius 0.15 m, 6 m high
    pick = poles[rng.integers(0, len(poles), n[3])]
    angle = rng.uniform(0, 2 * np.pi, n[3])
    out[kind == 3] = np.column_stack([pick + 0.15 * np.column_stack([np.cos(angle),
                                                                     np.sin(angle)]),
                                      rng.uniform(-1.73, 4.3, n[3])])
    # tree crowns: fuzzy spheres of radius 2 m above the poles
    pick = poles[rng.integers(0, len(poles), n[4])] + [1.5, 0.0]
    direction = rng.normal(size=(n[4], 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    crown = direction * rng.uniform(1.4, 2.0, (n[4], 1)) + [0, 0, 5.5]
    out[kind == 4] = crown + np.column_stack([pick, np.zeros(n[4])])
    if noise:
        out += rng.normal(0, noise, out.shape)
    if outliers:
        chosen = rng.random(points) < outliers
        out[chosen] = rng.uniform([-50, -50, -2], [50, 50, 8], (int(chosen.sum()), 3))
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the measured tasks (looked up by name in the child process)


def _cd_ours(pred: np.ndarray, gt: np.ndarray) -> float:
    from distdpo_ros.metrics import chamfer_distance

    return chamfer_distance(pred, gt)


def _cd_open3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """The reference: Open3D point clouds, compute_point_cloud_distance both ways."""
    import open3d as o3d

    cloud_pred = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pred.astype(np.float64)))
    cloud_gt = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(gt.astype(np.float64)))
    to_gt = np.asarray(cloud_pred.compute_point_cloud_distance(cloud_gt))
    to_pred = np.asarray(cloud_gt.compute_point_cloud_distance(cloud_pred))
    return float((to_gt.mean() + to_pred.mean()) / 2)


def _jsd_ours(pred: np.ndarray, gt: np.ndarray) -> float:
    from distdpo_ros.metrics import jsd_bev

    return jsd_bev(pred, gt)


def _jsd_dense(pred: np.ndarray, gt: np.ndarray) -> float:
    """The reference: 200³ histograms, occupancy clipped to 1, summed over z, scipy JS."""
    from scipy.spatial.distance import jensenshannon

    def bev(points: np.ndarray) -> np.ndarray:
        hist = np.histogramdd(points, bins=200, range=[(-50.0, 50.0)] * 3)[0]
        column = np.clip(hist, 0.0, 1.0).sum(-1)
        return (column / column.sum()).ravel()

    return float(jensenshannon(bev(gt), bev(pred)))


def _iou_ours(voxel: float) -> Callable[[np.ndarray, np.ndarray], list[int]]:
    def task(pred: np.ndarray, gt: np.ndarray) -> list[int]:
        from distdpo_ros.metrics import iou_counts

        c = iou_counts(pred, gt, voxel)
        return [c.tp, c.fp, c.fn]

    return task


def _iou_dense(voxel: float) -> Callable[[np.ndarray, np.ndarray], list[int]]:
    def task(pred: np.ndarray, gt: np.ndarray) -> list[int]:
        """The reference CompletionIoU.update after e5305f9 (dense occupancy, int copies)."""
        bins = int(100.0 / voxel)
        box = [(-50.0, 50.0)] * 3
        occ_gt = np.histogramdd(gt, bins=bins, range=box)[0].astype(bool).astype(int)
        occ_pred = np.histogramdd(pred, bins=bins, range=box)[0].astype(bool).astype(int)
        tp = int(((occ_gt == 1) & (occ_pred == 1)).sum())
        fn = int(((occ_gt == 1) & (occ_pred == 0)).sum())
        fp = int(((occ_gt == 0) & (occ_pred == 1)).sum())
        return [tp, fp, fn]

    return task


def _emd_ours(pred: np.ndarray, gt: np.ndarray) -> float:
    from distdpo_ros.metrics import emd

    return emd(pred, gt)


def _scan_metrics(pred: np.ndarray, gt: np.ndarray) -> float:
    from distdpo_ros.metrics import scan_metrics

    return scan_metrics(pred, gt)['cd']


TASKS: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
    'cd_ours': _cd_ours, 'cd_open3d': _cd_open3d,
    'jsd_ours': _jsd_ours, 'jsd_dense': _jsd_dense,
    'iou_ours_0.5': _iou_ours(0.5), 'iou_dense_0.5': _iou_dense(0.5),
    'iou_ours_0.2': _iou_ours(0.2), 'iou_dense_0.2': _iou_dense(0.2),
    'iou_ours_0.1': _iou_ours(0.1), 'iou_dense_0.1': _iou_dense(0.1),
    'emd_ours': _emd_ours, 'all_metrics_ours': _scan_metrics,
}


SLOW = ('iou_dense_0.2', 'iou_dense_0.1')  # timed once: tens of seconds and gigabytes each


def _load(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """The clouds, after every module a task uses is imported (imports are never measured)."""
    import open3d  # noqa: F401
    import scipy.optimize  # noqa: F401
    import scipy.spatial.distance  # noqa: F401

    import distdpo_ros.metrics  # noqa: F401

    return np.load(os.path.join(folder, 'pred.npy')), np.load(os.path.join(folder, 'gt.npy'))


def _time_child(names: list[str], folder: str, repeats: int, queue: Any) -> None:
    """Time tasks in alternating rounds in one process, so that load changes hit all alike;
    one untimed warm-up call each first (except the slow dense ones)."""
    try:
        pred, gt = _load(folder)
        times: dict[str, list[float]] = {name: [] for name in names}
        values: dict[str, Any] = {}
        for name in names:
            if name not in SLOW:
                TASKS[name](pred, gt)
        for round_ in range(repeats):
            for name in names:
                if round_ and name in SLOW:
                    continue
                started = time.perf_counter()
                values[name] = TASKS[name](pred, gt)
                times[name].append(time.perf_counter() - started)
        queue.put({name: {'seconds': float(np.median(times[name])), 'runs': len(times[name]),
                          'value': values[name]} for name in names})
    except BaseException as exc:  # report, do not hang the parent
        queue.put({'error': f'{type(exc).__name__}: {exc}'})


def _memory_child(name: str, folder: str, queue: Any) -> None:
    """Growth of the peak resident set size over the loaded clouds during one run of a task."""
    try:
        pred, gt = _load(folder)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        TASKS[name](pred, gt)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        queue.put({'peak_mb': round(max(0, after - before) / 1024.0, 1)})
    except BaseException as exc:
        queue.put({'error': f'{type(exc).__name__}: {exc}'})


def _in_fresh_process(target: Callable[..., None], *args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context('spawn')
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    if 'error' in result:
        raise UserError(f'bench metrics: {args[0]} failed: {result["error"]}')
    return result


def emd_error(seed: int, points: int = 6000) -> dict[str, Any]:
    """EMD of ``points``-point street clouds: exact W1 against our sampled estimates."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    from distdpo_ros.metrics import emd

    gt = street_scene(points, seed + 10).astype(np.float64)
    pred = street_scene(points, seed + 11, noise=0.05, outliers=0.1).astype(np.float64)
    started = time.perf_counter()
    cost = cdist(pred, gt)
    rows, cols = linear_sum_assignment(cost)
    exact = float(cost[rows, cols].mean())
    out: dict[str, Any] = {'points': points, 'exact_w1_m': exact,
                           'exact_seconds': time.perf_counter() - started}
    for sample in (1024, 2048):
        values = [emd(pred, gt, points=sample, seed=s) for s in range(3)]
        out[f'emd_{sample}_m'] = float(np.mean(values))
        out[f'emd_{sample}_seed_std_m'] = float(np.std(values))
        out[f'emd_{sample}_relative_error'] = float(np.mean(values) / exact - 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split('\n\n')[0].split(': ', 1)[1]
    parser.add_argument('--json', action='store_true',
                        help='print the full result as JSON (default: a short summary)')
    parser.add_argument('--points', type=int, default=SCENE_POINTS,
                        help='points per synthetic cloud (default: 180000)')
    parser.add_argument('--pred', type=Path, help='use this prediction cloud instead')
    parser.add_argument('--gt', type=Path, help='use this ground-truth cloud instead')
    parser.add_argument('--repeats', type=int, default=3,
                        help='timed rounds per metric, median reported (default: 3)')
    parser.add_argument('--dense-0.1', dest='dense_fine', action='store_true',
                        help='also run the dense 0.1 m IoU (needs ~25 GB of RAM)')
    parser.add_argument('--skip-emd-error', action='store_true',
                        help='skip the EMD approximation measurement (~15 s)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the synthetic clouds (default: 0)')


def _clouds(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    if (args.pred is None) != (args.gt is None):
        raise UserError('give both --pred and --gt, or neither')
    if args.pred is not None:
        from distdpo_ros.pointio import read_points

        return read_points(args.pred), read_points(args.gt), f'{args.pred} vs {args.gt}'
    if args.points < 10:
        raise UserError(f'--points must be >= 10, got {args.points}')
    gt = street_scene(args.points, args.seed)
    pred = street_scene(args.points, args.seed + 1, noise=0.05, outliers=0.1)
    return pred, gt, 'synthetic street scene (5 cm noise, 10 % outliers in the prediction)'


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    pred, gt, source = _clouds(args)
    load_before = os.getloadavg()[0]
    groups = [['cd_ours', 'cd_open3d'], ['jsd_ours', 'jsd_dense'],
              ['iou_ours_0.5', 'iou_dense_0.5'], ['iou_ours_0.2', 'iou_dense_0.2'],
              ['iou_ours_0.1'] + (['iou_dense_0.1'] if args.dense_fine else []),
              ['emd_ours', 'all_metrics_ours']]
    names = [name for group in groups for name in group]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix='distdpo-bench-') as folder:
        np.save(os.path.join(folder, 'pred.npy'), pred)
        np.save(os.path.join(folder, 'gt.npy'), gt)
        with tqdm(total=len(groups) + len(names), desc='bench metrics', file=sys.stderr) as bar:
            for group in groups:
                results.update(_in_fresh_process(_time_child, group, folder, args.repeats))
                bar.update()
            for name in names:
                results[name].update(_in_fresh_process(_memory_child, name, folder))
                bar.update()
    report = _report(results, pred, gt, source, args)
    report['load_average_1min'] = {'start': load_before, 'end': os.getloadavg()[0]}
    if not args.skip_emd_error:
        report['emd_approximation'] = emd_error(args.seed)
    print(json.dumps(report, indent=2) if args.json else _summary(report))
    return 0


def _summary(report: dict[str, Any]) -> str:
    """A few readable lines: seconds and peak memory, ours against the reference."""
    m = report['measurements']
    lines = [f'{report["clouds"]["pred_points"]:,} vs {report["clouds"]["gt_points"]:,} points, '
             f'{report["cpu_count"]} CPUs, load {report["load_average_1min"]["start"]:.1f}']
    for label, ours, reference in (('CD', 'cd_ours', 'cd_open3d'),
                                   ('JSD BEV', 'jsd_ours', 'jsd_dense'),
                                   ('IoU 0.5 m', 'iou_ours_0.5', 'iou_dense_0.5'),
                                   ('IoU 0.2 m', 'iou_ours_0.2', 'iou_dense_0.2'),
                                   ('IoU 0.1 m', 'iou_ours_0.1', 'iou_dense_0.1'),
                                   ('EMD', 'emd_ours', None),
                                   ('all metrics', 'all_metrics_ours', None)):
        line = f'{label:<12} ours {m[ours]["seconds"]:7.3f} s {m[ours]["peak_mb"]:8.1f} MB'
        ref = m.get(reference) if reference else None
        if ref is None and reference == 'iou_dense_0.1':
            ref = report['iou_dense_0.1_extrapolated']
            line += '   dense (extrapolated)'
        elif ref is not None:
            line += '   reference'
        if ref is not None:
            line += f' {ref["seconds"]:7.3f} s {ref["peak_mb"]:8.1f} MB'
        lines.append(line)
    if 'emd_approximation' in report:
        e = report['emd_approximation']
        lines.append(f'EMD error vs exact W1 of {e["points"]} points: '
                     f'{100 * e["emd_2048_relative_error"]:+.1f} % at 2048, '
                     f'{100 * e["emd_1024_relative_error"]:+.1f} % at 1024')
    return '\n'.join(lines)


def _report(results: dict[str, Any], pred: np.ndarray, gt: np.ndarray, source: str,
            args: argparse.Namespace) -> dict[str, Any]:
    def ratio(slow: str, fast: str) -> float:
        return round(results[slow]['seconds'] / results[fast]['seconds'], 2)

    report: dict[str, Any] = {
        'clouds': {'pred_points': len(pred), 'gt_points': len(gt), 'source': source},
        'cpu_count': os.cpu_count(),
        'measurements': {k: {kk: vv for kk, vv in v.items() if kk != 'value'}
                         for k, v in results.items()},
        'speedup': {'cd_vs_open3d': ratio('cd_open3d', 'cd_ours'),
                    'jsd_vs_dense': ratio('jsd_dense', 'jsd_ours'),
                    'iou_0.5_vs_dense': ratio('iou_dense_0.5', 'iou_ours_0.5'),
                    'iou_0.2_vs_dense': ratio('iou_dense_0.2', 'iou_ours_0.2')},
        'peak_memory_ratio': {
            name: round(results[slow]['peak_mb'] / max(results[fast]['peak_mb'], 0.1), 1)
            for name, slow, fast in (('cd_open3d_vs_ours', 'cd_open3d', 'cd_ours'),
                                     ('jsd_dense_vs_ours', 'jsd_dense', 'jsd_ours'),
                                     ('iou_0.5_dense_vs_ours', 'iou_dense_0.5', 'iou_ours_0.5'),
                                     ('iou_0.2_dense_vs_ours', 'iou_dense_0.2', 'iou_ours_0.2'))},
        'agreement': {
            'cd_relative_difference': abs(results['cd_ours']['value']
                                          / results['cd_open3d']['value'] - 1.0),
            'jsd_absolute_difference': abs(results['jsd_ours']['value']
                                           - results['jsd_dense']['value']),
            'iou_counts_equal_0.5': results['iou_ours_0.5']['value']
            == results['iou_dense_0.5']['value'],
            'iou_counts_equal_0.2': results['iou_ours_0.2']['value']
            == results['iou_dense_0.2']['value'],
        },
        'values': {'cd_m': results['cd_ours']['value'], 'jsd_bev': results['jsd_ours']['value'],
                   'emd_m': results['emd_ours']['value'],
                   'iou_counts_tp_fp_fn': {v: results[f'iou_ours_{v}']['value']
                                           for v in ('0.5', '0.2', '0.1')}},
    }
    dense = results.get('iou_dense_0.1')
    if dense is not None:
        report['speedup']['iou_0.1_vs_dense'] = ratio('iou_dense_0.1', 'iou_ours_0.1')
    else:  # 1000³ bins are 8x the 500³ of 0.2 m: time and memory scale with the bin count
        fine = results['iou_dense_0.2']
        report['iou_dense_0.1_extrapolated'] = {
            'seconds': round(8 * fine['seconds'], 1), 'peak_mb': round(8 * fine['peak_mb']),
            'how': 'dense 0.2 m measurement x 8 (bins 1000^3 / 500^3); run with --dense-0.1 '
                   'on a machine with ~25 GB free to measure it',
            'speedup_estimate': round(8 * fine['seconds'] / results['iou_ours_0.1']['seconds'],
                                      1)}
    return report
