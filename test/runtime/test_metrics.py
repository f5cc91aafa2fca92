"""Metrics against brute-force definitions (reference §5) and hand-made known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import simpson
from scipy.optimize import linear_sum_assignment, linprog
from scipy.spatial.distance import cdist, jensenshannon

from distdpo_ros import metrics as m


def _cloud(rng: np.random.Generator, n: int, scale: float = 20.0) -> np.ndarray:
    return rng.uniform(-scale, scale, (n, 3))


def _grid(spacing: float = 1.0, side: int = 6) -> np.ndarray:
    axis = np.arange(side) * spacing
    return np.stack(np.meshgrid(axis, axis, axis, indexing='ij'), -1).reshape(-1, 3)


# ------------------------------------------------------------------------ brute-force references


def _brute_nn(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return cdist(query, ref).min(axis=1)


def _brute_prf(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """The reference PrecisionRecall(0.05, 0.10, 100).compute_auc for a single scan."""
    thresholds = np.linspace(0.05, 0.10, 100)
    d_pg, d_gp = _brute_nn(pred, gt), _brute_nn(gt, pred)
    rows = []
    for t in thresholds:
        p = 100.0 / len(d_pg) * np.count_nonzero(d_pg < t)
        r = 100.0 / len(d_gp) * np.count_nonzero(d_gp < t)
        rows.append((p, r, 0.0 if p == 0 or r == 0 else 2 * p * r / (p + r)))
    dx = thresholds[1] - thresholds[0]
    perfect = simpson(np.ones_like(thresholds), dx=dx)
    return tuple(simpson(np.array(col), dx=dx) / perfect for col in zip(*rows, strict=True))


def _dense_hist(points: np.ndarray, voxel: float, half: float = 50.0) -> np.ndarray:
    bins = int(2 * half / voxel)
    return np.histogramdd(points, bins=bins, range=[(-half, half)] * 3)[0]


def _dense_jsd(pred: np.ndarray, gt: np.ndarray, bev: bool) -> float:
    """The reference compute_hist_metrics on dense 200³ histograms."""
    h_pred, h_gt = _dense_hist(pred, 0.5), _dense_hist(gt, 0.5)
    if bev:
        h_pred, h_gt = np.clip(h_pred, 0, 1).sum(-1), np.clip(h_gt, 0, 1).sum(-1)
    p, q = h_gt.ravel() / h_gt.sum(), h_pred.ravel() / h_pred.sum()
    return float(jensenshannon(p, q))


def _dense_iou_counts(pred: np.ndarray, gt: np.ndarray, voxel: float,
                      legacy: bool) -> tuple[int, int, int]:
    """The reference CompletionIoU.update: new (raw coordinates) or released (rounded indices)."""
    if legacy:
        pred, gt = np.round(pred / voxel).astype(int), np.round(gt / voxel).astype(int)
    occ_pred, occ_gt = _dense_hist(pred, voxel) > 0, _dense_hist(gt, voxel) > 0
    return (int((occ_gt & occ_pred).sum()), int((occ_pred & ~occ_gt).sum()),
            int((occ_gt & ~occ_pred).sum()))


def _exact_w1(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between uniform measures of any sizes by linear programming (transport polytope)."""
    n, k = len(a), len(b)
    cost = cdist(a, b).ravel()
    rows = np.kron(np.eye(n), np.ones(k))
    cols = np.kron(np.ones(n), np.eye(k))
    res = linprog(cost, A_eq=np.vstack([rows, cols]),
                  b_eq=np.concatenate([np.full(n, 1 / n), np.full(k, 1 / k)]), bounds=(0, None))
    assert res.status == 0
    return float(res.fun)


# ----------------------------------------------------------------------------- Chamfer distance


def test_chamfer_matches_brute_force_on_random_clouds() -> None:
    rng = np.random.default_rng(0)
    pred, gt = _cloud(rng, 137), _cloud(rng, 211)
    expected = 0.5 * (_brute_nn(pred, gt).mean() + _brute_nn(gt, pred).mean())
    assert m.chamfer_distance(pred, gt) == pytest.approx(expected, rel=1e-12)
    assert m.chamfer_distance(pred.astype(np.float32), gt) == pytest.approx(expected, rel=1e-6)


def test_chamfer_known_answers() -> None:
    grid = _grid()
    assert m.chamfer_distance(grid, grid) == 0.0
    # every shifted point keeps its original as nearest neighbour (shift < half the spacing)
    assert m.chamfer_distance(grid + [0.3, 0.0, 0.0], grid) == pytest.approx(0.3)
    assert m.chamfer_distance([[0, 0, 0]], [[3, 4, 0]]) == pytest.approx(5.0)
    # different sizes: pred→gt = 1, gt→pred = (1 + 3) / 2
    assert m.chamfer_distance([[0, 0, 0]], [[1, 0, 0], [3, 0, 0]]) == pytest.approx(1.5)


def test_chamfer_ignores_extra_columns_and_accepts_tensors() -> None:
    rng = np.random.default_rng(1)
    pred, gt = _cloud(rng, 50), _cloud(rng, 60)
    with_intensity = np.hstack([pred, rng.uniform(size=(50, 1))])
    expected = m.chamfer_distance(pred, gt)
    assert m.chamfer_distance(with_intensity, gt) == expected
    assert m.chamfer_distance(torch.from_numpy(pred), torch.from_numpy(gt)) == expected


@pytest.mark.parametrize('bad, message', [
    (np.zeros((5, 2)), 'shape'), (np.zeros(6), 'shape'),
    (np.array([[0.0, np.nan, 0.0]]), 'NaN'), (np.zeros((0, 3)), 'no points'),
])
def test_bad_clouds_raise_one_clear_error(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        m.chamfer_distance(bad, np.zeros((3, 3)))


def test_torch_brute_force_nn_is_exact_at_large_coordinates() -> None:
    """The GPU path (run here on CPU tensors) keeps centimetre accuracy 50 m from the origin."""
    rng = np.random.default_rng(2)
    gt = rng.uniform(40.0, 50.0, (400, 3))
    query = gt[:300] + rng.normal(0.0, 0.01, (300, 3))
    expected = _brute_nn(query, gt)
    got = m._nn_distances_torch(torch.from_numpy(query).float(), torch.from_numpy(gt).float(),
                                chunk_bytes=8 * 400 * 7)  # 7 rows per chunk: exercises chunking
    np.testing.assert_allclose(got, _brute_nn(query.astype(np.float32).astype(np.float64),
                                              gt.astype(np.float32).astype(np.float64)),
                               atol=1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------- precision / recall


def test_prf_matches_reference_definition() -> None:
    rng = np.random.default_rng(3)
    gt = _cloud(rng, 300, scale=1.0)
    pred = np.vstack([gt[:200] + rng.normal(0, 0.04, (200, 3)), _cloud(rng, 50, scale=1.0)])
    got = m.precision_recall_fscore(pred, gt)
    expected = _brute_prf(pred, gt)
    assert got == pytest.approx(expected, rel=1e-9)
    assert 0 < got.precision < 100 and 0 < got.recall < 100


def test_prf_known_answers() -> None:
    grid = _grid(spacing=1.0)
    assert m.precision_recall_fscore(grid, grid) == pytest.approx(m.PRF(100.0, 100.0, 100.0))
    assert m.precision_recall_fscore(grid + [0.3, 0, 0], grid) == m.PRF(0.0, 0.0, 0.0)
    # a 7 cm shift is inside the thresholds above 7 cm only: 60 of 100 thresholds, area ~60 %
    shifted = m.precision_recall_fscore(grid + [0.07, 0, 0], grid)
    assert shifted.precision == pytest.approx(60.0, abs=1.5)
    assert shifted.precision == shifted.recall == shifted.fscore
    # different sizes: half the prediction is far away -> P 50 %, R 100 %, F 2/3
    far = np.vstack([grid, grid + [100.0, 0, 0]])
    assert m.precision_recall_fscore(far, grid) == pytest.approx(m.PRF(50.0, 100.0, 200 / 3))


# ----------------------------------------------------------------------------- JSD


def test_jsd_matches_dense_reference_histograms() -> None:
    rng = np.random.default_rng(4)
    gt = _cloud(rng, 3000, scale=30.0)
    pred = np.vstack([gt[:2000] + rng.normal(0, 0.4, (2000, 3)), _cloud(rng, 800, scale=60.0)])
    assert m.jsd_bev(pred, gt) == pytest.approx(_dense_jsd(pred, gt, bev=True), rel=1e-12)
    assert m.jsd_3d(pred, gt) == pytest.approx(_dense_jsd(pred, gt, bev=False), rel=1e-12)


def test_jsd_known_answers() -> None:
    grid = _grid(spacing=2.0) - 5.0
    assert m.jsd_bev(grid, grid) == 0.0
    assert m.jsd_3d(grid, grid) == 0.0
    disjoint = grid + [30.0, 0, 0]
    assert m.jsd_bev(disjoint, grid) == pytest.approx(math.sqrt(math.log(2)))
    # lifted by 20 m: the same columns with the same occupancy (BEV 0), no shared voxel (3-D max)
    lifted = grid + [0, 0, 20.0]
    assert m.jsd_bev(lifted, grid) == pytest.approx(0.0, abs=1e-12)
    assert m.jsd_3d(lifted, grid) == pytest.approx(math.sqrt(math.log(2)))
    # different sizes: every point twice -> same occupancy and proportional counts
    doubled = np.vstack([grid, grid])
    assert m.jsd_bev(doubled, grid) == pytest.approx(0.0, abs=1e-12)
    assert m.jsd_3d(doubled, grid) == pytest.approx(0.0, abs=1e-12)


def test_jsd_outside_the_cube_is_an_error() -> None:
    with pytest.raises(ValueError, match='inside the histogram cube'):
        m.jsd_bev([[80.0, 0, 0]], [[1.0, 0, 0]])


# ----------------------------------------------------------------------------- completion IoU


@pytest.mark.parametrize('voxel', [0.5, 2.0])
def test_iou_matches_dense_histograms_whole_cube(voxel: float) -> None:
    rng = np.random.default_rng(5)
    gt = _cloud(rng, 4000, scale=55.0)  # some points fall outside the cube on purpose
    pred = np.vstack([gt[:3000] + rng.normal(0, 0.3, (3000, 3)), _cloud(rng, 500, scale=55.0)])
    counts = m.iou_counts(pred, gt, voxel)
    assert (counts.tp, counts.fp, counts.fn) == _dense_iou_counts(pred, gt, voxel, legacy=False)
    assert m.completion_iou(pred, gt, voxel) == pytest.approx(
        counts.tp / (counts.tp + counts.fp + counts.fn))


def test_iou_legacy_crop_matches_the_released_code() -> None:
    rng = np.random.default_rng(6)
    gt = _cloud(rng, 4000, scale=40.0)
    pred = np.vstack([gt[:3000] + rng.normal(0, 0.3, (3000, 3)), _cloud(rng, 500, scale=40.0)])
    counts = m.iou_counts_legacy_crop(pred, gt, 0.5)
    assert (counts.tp, counts.fp, counts.fn) == _dense_iou_counts(pred, gt, 0.5, legacy=True)


@pytest.mark.parametrize('voxel', [0.2, 0.1])
def test_iou_fine_voxels_match_python_sets(voxel: float) -> None:
    rng = np.random.default_rng(7)
    gt = _cloud(rng, 2000, scale=52.0)
    pred = gt + rng.normal(0, voxel, gt.shape)

    def whole(points: np.ndarray) -> set[tuple[int, ...]]:
        inside = points[np.all(np.abs(points) <= 50.0, axis=1)]
        return {tuple(int(v) for v in np.floor((p + 50.0) / voxel)) for p in inside}

    def legacy(points: np.ndarray) -> set[tuple[int, ...]]:
        idx = np.rint(points / voxel).astype(int)
        return {tuple(i) for i in idx[np.all(np.abs(idx) <= 50, axis=1)].tolist()}

    for fn, make in ((m.iou_counts, whole), (m.iou_counts_legacy_crop, legacy)):
        a, b = make(pred), make(gt)
        assert fn(pred, gt, voxel) == m.IoUCounts(len(a & b), len(a - b), len(b - a))


def test_iou_known_answers() -> None:
    grid = _grid(spacing=1.0) + 0.25  # voxel centres of 0.5 m voxels
    assert m.completion_iou(grid, grid, 0.5) == 1.0
    assert m.completion_iou(grid + [0.5, 0, 0], grid, 0.5) == 0.0  # one voxel over: disjoint
    assert m.completion_iou(grid + [60.0, 0, 0], grid, 0.5) == 0.0  # outside the cube: FN only
    assert m.iou_counts(grid + [60.0, 0, 0], grid, 0.5) == m.IoUCounts(0, 0, len(grid))
    assert m.iou_counts([[50.0, 50.0, 50.0]], [[49.9, 49.9, 49.9]], 0.5).tp == 1  # closed edge
    assert math.isnan(m.completion_iou(np.zeros((0, 3)), np.zeros((0, 3)), 0.5))


def test_whole_cube_iou_differs_from_legacy_crop_beyond_25_m() -> None:
    """The fix: the released IoU at 0.5 m never sees content beyond ±25 m."""
    rng = np.random.default_rng(8)
    near = rng.uniform(-20, 20, (2000, 3))
    far = rng.uniform(30, 45, (2000, 3))
    gt = np.vstack([near, far])
    pred = np.vstack([near, far + [0, 0, 3.0]])  # the far content is completed wrongly
    assert m.completion_iou_legacy_crop(pred, gt, 0.5) == 1.0
    whole = m.completion_iou(pred, gt, 0.5)
    assert whole < 0.7
    assert whole == pytest.approx(_iou_from(_dense_iou_counts(pred, gt, 0.5, legacy=False)))


def _iou_from(counts: tuple[int, int, int]) -> float:
    tp, fp, fn = counts
    return tp / (tp + fp + fn)


def test_sequence_iou_accumulates_counts_not_per_scan_means() -> None:
    grid = _grid(spacing=1.0) + 0.25
    scans = [(grid, grid), (grid[:10], grid)]  # IoU 1.0 and 10 / 216
    total = m.IoUCounts(0, 0, 0)
    for pred, gt in scans:
        total = total + m.iou_counts(pred, gt, 0.5)
    assert total == m.IoUCounts(tp=226, fp=0, fn=206)
    assert total.iou == pytest.approx(226 / 432)


# ----------------------------------------------------------------------------- EMD


def test_emd_equals_exact_assignment_on_equal_size_clouds() -> None:
    rng = np.random.default_rng(9)
    for n in (1, 17, 300):
        a, b = _cloud(rng, n), _cloud(rng, n)
        cost = cdist(a, b)
        rows, cols = linear_sum_assignment(cost)
        assert m.emd(a, b) == pytest.approx(cost[rows, cols].mean(), rel=1e-12)


def test_emd_different_sizes_is_exact_when_lcm_is_small() -> None:
    rng = np.random.default_rng(10)
    a, b = _cloud(rng, 7, scale=3.0), _cloud(rng, 5, scale=3.0)
    assert m.emd(a, b) == pytest.approx(_exact_w1(a, b), rel=1e-7)
    assert m.emd([[0, 0, 0]], [[1, 0, 0], [3, 0, 0]]) == pytest.approx(2.0)


def test_emd_known_answers() -> None:
    grid = _grid(spacing=1.0)
    assert m.emd(grid, grid) == 0.0
    shift = np.array([3.0, -4.0, 0.0])  # W1 of a translation is its length, whatever the shape
    assert m.emd(grid + shift, grid) == pytest.approx(5.0)
    assert m.emd(grid + [100.0, 0, 0], grid) == pytest.approx(100.0)


def test_emd_subsample_is_seeded_and_approaches_the_exact_value() -> None:
    rng = np.random.default_rng(11)
    surface = np.column_stack([rng.uniform(-20, 20, (2, 1200)).T, np.zeros(1200)])
    other = surface + rng.normal(0, 0.05, surface.shape) + [0.5, 0, 0]
    exact = m.emd(surface, other, points=1200)
    coarse = m.emd(surface, other, points=300, seed=3)
    assert coarse == m.emd(surface, other, points=300, seed=3)
    assert exact <= m.emd(surface, other, points=600) <= coarse
    assert coarse < 4 * exact


def test_space_filling_subsample_takes_distinct_points() -> None:
    rng = np.random.default_rng(12)
    cloud = _cloud(rng, 1000)
    sample = m.space_filling_subsample(cloud, 100, np.random.default_rng(0))
    assert len(np.unique(sample, axis=0)) == 100
    assert np.isin(sample.view([('', float)] * 3), cloud.view([('', float)] * 3)).all()
    # evenly spread: every 20 m octant of the 40 m cube gets about an eighth of the sample
    octant = (sample > 0) @ np.array([1, 2, 4])
    assert np.bincount(octant, minlength=8).min() >= 9


# ----------------------------------------------------------------------------- all at once


def test_scan_metrics_agrees_with_the_single_metrics() -> None:
    rng = np.random.default_rng(13)
    gt = _cloud(rng, 500)
    pred = gt + rng.normal(0, 0.05, gt.shape)
    row = m.scan_metrics(pred, gt, emd_points=256)
    prf = m.precision_recall_fscore(pred, gt)
    assert row['cd'] == m.chamfer_distance(pred, gt)
    assert (row['precision'], row['recall'], row['fscore']) == prf
    assert row['jsd'] == m.jsd_bev(pred, gt) and row['jsd_3d'] == m.jsd_3d(pred, gt)
    assert row['emd'] == m.emd(pred, gt, points=256)
    for v in m.IOU_VOXEL_SIZES:
        assert row['iou_counts'][str(v)] == list(vars(m.iou_counts(pred, gt, v)).values())
        legacy = m.iou_counts_legacy_crop(pred, gt, v)
        assert row['iou_counts_legacy'][str(v)] == [legacy.tp, legacy.fp, legacy.fn]
