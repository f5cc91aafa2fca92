"""Scene-completion metrics of LiDiff / Distillation-DPO (reference §5), correct and fast.

Every function takes two clouds, ``pred`` and ``gt``: (N, 3) arrays of any size in metres (numpy,
anything ``np.asarray`` accepts, or torch tensors; columns beyond xyz are ignored).

- ``chamfer_distance``: ½ (mean NN distance pred→gt + mean NN distance gt→pred), Euclidean, not
  squared (the reference uses Open3D ``compute_point_cloud_distance``).
- ``precision_recall_fscore``: P = % of predicted points closer than τ to the GT, R = % of GT
  points closer than τ to the prediction, F = 2PR/(P+R), each integrated (Simpson) over τ in
  [5 cm, 10 cm] (100 thresholds) and divided by the area of a perfect predictor, in %. The area is
  linear in the per-threshold values, so the mean of per-scan areas equals the reference's area
  of per-threshold means.
- ``jsd_bev`` / ``jsd_3d``: Jensen-Shannon *distance* (scipy, natural log) between 0.5 m
  histograms over the ±50 m cube; BEV = occupied voxels per (x, y) column, 3-D = point counts.
- ``completion_iou``: voxel IoU over the whole ±50 m cube (voxel index floor((p + 50) / v), the
  binning of ``np.histogramdd`` over [-50, 50]) on sparse int64-hashed voxel sets, so 0.1 m voxels
  cost O(N log N) instead of the reference's dense 1000³ histograms (~25 GB).
  ``completion_iou_legacy_crop`` reproduces the released code before LiDiff e5305f9 (still in
  Distillation-DPO): integer indices round(p / v) histogrammed over [-50, 50], which only scores
  the central ±50·v cube (±25 m at 0.5 m, ±10 m at 0.2 m, ±5 m at 0.1 m). For a sequence, add the
  ``IoUCounts`` of all scans and read ``.iou`` (TP/FP/FN accumulated over the sequence, as the
  reference does), rather than averaging per-scan IoUs.
- ``emd``: earth mover's distance (W1, Euclidean, metres: mean transport distance per point) by
  exact assignment (``scipy.optimize.linear_sum_assignment``). Exact on the clouds themselves
  when lcm(N, M) <= ``points`` (e.g. equal sizes up to ``points``: the uniform measures are
  replicated to the least common multiple). Larger clouds are represented by ``points`` points
  each, drawn by systematic sampling along a Morton (Z-order) curve with a seeded random offset:
  every point has the same inclusion probability and the sample covers space much more evenly
  than a random one. EMD between finite samples of surfaces is dominated by the sampling
  resolution, so values are comparable only at the same ``points``. Measured (``distdpo bench
  metrics``: synthetic street clouds of 6,000 points, prediction with 5 cm noise and 10 %
  outliers; exact W1 of the full clouds 2.219 m): Morton samples of 2,048 points give 2.421 m
  (+9.1 %, std over seeds 0.3 %), 1,024 points 2.720 m (+22.6 %). An earlier check on a plainer
  scene (exact 0.864 m) gave +16 % at 2,048 points with Morton samples and +59 % with random
  samples (std 6 %), which is why the samples follow a space-filling curve. The released
  Sinkhorn EMD (epsilon = 1 mm on
  0.5 m voxels) is numerically degenerate and skips scans with >130k voxels (reference §5); it is
  not reproduced.

Nearest-neighbour searches use scipy's cKDTree on all cores; when a cloud is a CUDA tensor they
run as a chunked float64 brute force on that GPU instead. Empty clouds raise ValueError where a
metric is undefined (CD, P/R/F, JSD, EMD); IoU counts are defined for empty clouds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy.integrate import simpson
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist, jensenshannon

PR_THRESHOLDS = np.linspace(0.05, 0.10, 100)  # metres, reference PrecisionRecall(0.05, 0.10, 100)
CUBE_HALF_EXTENT = 50.0  # metres, the reference's histogram range [-50, 50] on every axis
JSD_VOXEL = 0.5  # metres
IOU_VOXEL_SIZES = (0.5, 0.2, 0.1)  # metres
EMD_POINTS = 2048  # points per cloud for the exact assignment (cost matrix 2048² float64 = 34 MB)

_MORTON_BITS = 21  # bits per axis; 3 * 21 = 63 bits fit an int64 key


# ---------------------------------------------------------------------------------------------
# input handling and nearest neighbours


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split('.')[0] == 'torch'


def _is_cuda_tensor(x: Any) -> bool:
    return _is_torch(x) and bool(getattr(x, 'is_cuda', False))


def as_xyz(points: Any, name: str = 'points') -> np.ndarray:
    """Return the xyz columns of an (N, C >= 3) array or tensor as a float64 (N, 3) numpy array.

    Raises ValueError naming ``name`` for a wrong shape or non-finite coordinates.
    """
    if _is_torch(points):
        points = points.detach().cpu().numpy()
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise ValueError(f'{name}: expected an (N, 3) point array, got shape {arr.shape}')
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f'{name}: expected numeric coordinates, got dtype {arr.dtype}')
    xyz = np.ascontiguousarray(arr[:, :3], dtype=np.float64)
    if not np.isfinite(xyz).all():
        raise ValueError(f'{name}: coordinates contain NaN or Inf')
    return xyz


def _nonempty(points: np.ndarray, name: str, metric: str) -> np.ndarray:
    if len(points) == 0:
        raise ValueError(f'{metric}: "{name}" has no points, the metric is undefined')
    return points


def _check_tensor(points: Any, name: str) -> Any:
    """Validate a torch tensor of points (shape and finiteness) without leaving its device."""
    if points.ndim != 2 or points.shape[1] < 3:
        shape = tuple(points.shape)
        raise ValueError(f'{name}: expected an (N, 3) point array, got shape {shape}')
    if not bool(points[:, :3].isfinite().all()):
        raise ValueError(f'{name}: coordinates contain NaN or Inf')
    return points


def _nn_distances_torch(query: Any, ref: Any, chunk_bytes: int = 1 << 30) -> np.ndarray:
    """Brute-force NN distances in float64 on the device of the first tensor input, in chunks.

    Squared distances are |q|² + |r|² - 2 q·r; float64 keeps them exact to ~1e-12 m² at 50 m
    coordinates, where float32 would be off by ~3e-4 m² (1.7 cm at the 5 cm P/R thresholds).
    """
    import torch

    device = next((x.device for x in (query, ref) if _is_torch(x)), torch.device('cpu'))
    q = torch.as_tensor(query, device=device)[:, :3].to(torch.float64)
    r = torch.as_tensor(ref, device=device)[:, :3].to(torch.float64)
    ref_sq = (r * r).sum(dim=1)
    rows = max(1, chunk_bytes // (8 * max(1, len(r))))
    out = torch.empty(len(q), dtype=torch.float64, device=device)
    for start in range(0, len(q), rows):
        qc = q[start:start + rows]
        d2 = torch.addmm(ref_sq[None, :], qc, r.T, alpha=-2.0).min(dim=1).values
        out[start:start + rows] = (d2 + (qc * qc).sum(dim=1)).clamp_min_(0.0).sqrt_()
    return out.cpu().numpy()


def _kdtree(points: np.ndarray) -> cKDTree:
    """A KD-tree built for one batch of queries (sliding midpoint: ~4x faster to build)."""
    return cKDTree(points, balanced_tree=False, compact_nodes=False)


def _on_gpu(*clouds: Any) -> bool:
    return any(_is_cuda_tensor(c) for c in clouds)


def nearest_distances(query: Any, ref: Any) -> np.ndarray:
    """Euclidean distance from every point of ``query`` to its nearest point of ``ref`` (float64).

    cKDTree on all CPU cores; a chunked brute force on the GPU when either input is a CUDA tensor.
    """
    if _on_gpu(query, ref):
        q = _check_tensor(query, 'query') if _is_torch(query) else as_xyz(query, 'query')
        r = _check_tensor(ref, 'ref') if _is_torch(ref) else as_xyz(ref, 'ref')
    else:
        q, r = as_xyz(query, 'query'), as_xyz(ref, 'ref')
    if len(q) == 0 or len(r) == 0:
        raise ValueError('nearest_distances: both clouds need points')
    if _on_gpu(q, r):
        return _nn_distances_torch(q, r)
    return _kdtree(r).query(q, k=1, workers=-1)[0]


def _both_directions(pred: Any, gt: Any, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(pred→gt, gt→pred) NN distances; ValueError naming an empty cloud."""
    for cloud, name in ((pred, 'pred'), (gt, 'gt')):
        if len(cloud) == 0:
            raise ValueError(f'{metric}: "{name}" has no points, the metric is undefined')
    if _on_gpu(pred, gt):
        return nearest_distances(pred, gt), nearest_distances(gt, pred)
    p, g = as_xyz(pred, 'pred'), as_xyz(gt, 'gt')
    return _kdtree(g).query(p, k=1, workers=-1)[0], _kdtree(p).query(g, k=1, workers=-1)[0]


# ---------------------------------------------------------------------------------------------
# Chamfer distance and precision / recall / F-score


def chamfer_from_distances(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray) -> float:
    """½ (mean pred→gt + mean gt→pred) of precomputed NN distances."""
    return 0.5 * (float(np.mean(d_pred_to_gt)) + float(np.mean(d_gt_to_pred)))


def chamfer_distance(pred: Any, gt: Any) -> float:
    """Symmetric Chamfer distance in metres: mean of the two mean NN distances (not squared)."""
    return chamfer_from_distances(*_both_directions(pred, gt, 'chamfer_distance'))


class PRF(NamedTuple):
    """Precision, recall and F-score in percent."""

    precision: float
    recall: float
    fscore: float


def _fraction_below(distances: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Percentage of ``distances`` strictly below each threshold."""
    counts = np.searchsorted(np.sort(distances), thresholds, side='left')
    return 100.0 * counts / len(distances)


def prf_curves_from_distances(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray,
                              thresholds: Sequence[float] = PR_THRESHOLDS
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F-score (%) at each threshold from precomputed NN distances."""
    t = np.asarray(thresholds, dtype=np.float64)
    precision = _fraction_below(d_pred_to_gt, t)
    recall = _fraction_below(d_gt_to_pred, t)
    denom = precision + recall
    fscore = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom),
                       where=(precision > 0) & (recall > 0))
    return precision, recall, fscore


def _normalised_area(values: np.ndarray, thresholds: np.ndarray) -> float:
    if len(thresholds) == 1:
        return float(values[0])
    return float(simpson(values, x=thresholds) / simpson(np.ones_like(values), x=thresholds))


def prf_from_distances(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray,
                       thresholds: Sequence[float] = PR_THRESHOLDS) -> PRF:
    """Threshold-integrated P/R/F (%) from precomputed NN distances (see module docstring)."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or len(t) == 0 or np.any(np.diff(t) <= 0):
        raise ValueError('thresholds: need a non-empty increasing 1-D sequence')
    curves = prf_curves_from_distances(d_pred_to_gt, d_gt_to_pred, t)
    return PRF(*(_normalised_area(c, t) for c in curves))


def precision_recall_fscore(pred: Any, gt: Any,
                            thresholds: Sequence[float] = PR_THRESHOLDS) -> PRF:
    """Precision / recall / F-score in %, integrated over ``thresholds`` (5-10 cm by default)."""
    return prf_from_distances(*_both_directions(pred, gt, 'precision_recall_fscore'), thresholds)


def chamfer_and_fscore(pred: Any, gt: Any) -> tuple[float, float]:
    """(CD in metres, F-score in %) from one pair of nearest-neighbour searches."""
    d_pg, d_gp = _both_directions(pred, gt, 'chamfer_and_fscore')
    return chamfer_from_distances(d_pg, d_gp), prf_from_distances(d_pg, d_gp).fscore


# ---------------------------------------------------------------------------------------------
# voxel keys: Jensen-Shannon distance and completion IoU


def _cube_bins(voxel_size: float, extent: float) -> int:
    if not voxel_size > 0 or not extent > 0:
        raise ValueError(f'voxel_size and extent must be > 0, got {voxel_size}, {extent}')
    bins = int(round(2.0 * extent / voxel_size))
    if bins < 1 or bins ** 3 >= 2 ** 63:
        raise ValueError(f'voxel_size {voxel_size} m gives {bins} bins per axis over ±{extent} m')
    return bins


def cube_voxel_keys(points: np.ndarray, voxel_size: float,
                    extent: float = CUBE_HALF_EXTENT) -> tuple[np.ndarray, int]:
    """int64 voxel keys (one per point inside [-extent, extent]³) and the number of bins per axis.

    Voxel index floor((p + extent) / voxel_size), the last bin closed on the right: the binning of
    ``np.histogramdd(points, bins, range=[(-extent, extent)] * 3)``.
    Key = (ix * bins + iy) * bins + iz, so key // bins identifies the (x, y) column.
    """
    bins = _cube_bins(voxel_size, extent)
    inside = np.all((points >= -extent) & (points <= extent), axis=1)
    idx = np.floor((points[inside] + extent) * (bins / (2.0 * extent))).astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    return (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2], bins


def legacy_crop_voxel_keys(points: np.ndarray, voxel_size: float,
                           extent: float = CUBE_HALF_EXTENT) -> np.ndarray:
    """int64 keys of the released CompletionIoU before LiDiff e5305f9 (one per kept point).

    Integer indices round(p / v) (numpy's round half to even) were histogrammed over [-50, 50], so
    only indices within ±50 on every axis count: the central ±50·v metre cube (for v <= 1 m).
    """
    if not voxel_size > 0:
        raise ValueError(f'voxel_size must be > 0, got {voxel_size}')
    half = int(math.floor(extent))
    idx = np.rint(points / voxel_size)
    inside = np.all(np.abs(idx) <= half, axis=1)
    idx = idx[inside].astype(np.int64) + half
    side = 2 * half + 1
    return (idx[:, 0] * side + idx[:, 1]) * side + idx[:, 2]


def _aligned_counts(keys_a: np.ndarray, keys_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of two key arrays over the union of their keys (zero bins carry no JS mass)."""
    union, inverse = np.unique(np.concatenate([keys_a, keys_b]), return_inverse=True)
    counts_a = np.bincount(inverse[:len(keys_a)], minlength=len(union)).astype(np.float64)
    counts_b = np.bincount(inverse[len(keys_a):], minlength=len(union)).astype(np.float64)
    return counts_a, counts_b


def _js_distance(counts_pred: np.ndarray, counts_gt: np.ndarray, metric: str) -> float:
    for counts, name in ((counts_pred, 'pred'), (counts_gt, 'gt')):
        if counts.sum() == 0:
            raise ValueError(f'{metric}: "{name}" has no points inside the histogram cube')
    return float(jensenshannon(counts_gt / counts_gt.sum(), counts_pred / counts_pred.sum()))


def jsd_bev(pred: Any, gt: Any, voxel_size: float = JSD_VOXEL,
            extent: float = CUBE_HALF_EXTENT) -> float:
    """JS distance of bird's-eye-view occupancy: occupied voxels per (x, y) column."""
    p, g = as_xyz(pred, 'pred'), as_xyz(gt, 'gt')
    keys_p, bins = cube_voxel_keys(p, voxel_size, extent)
    keys_g, _ = cube_voxel_keys(g, voxel_size, extent)
    columns_p = np.unique(keys_p) // bins  # occupancy (counts clipped to 1), then summed over z
    columns_g = np.unique(keys_g) // bins
    return _js_distance(*_aligned_counts(columns_p, columns_g), 'jsd_bev')


def jsd_3d(pred: Any, gt: Any, voxel_size: float = JSD_VOXEL,
           extent: float = CUBE_HALF_EXTENT) -> float:
    """JS distance of the raw 3-D point-count histograms (reference ``bev=False``)."""
    keys_p, _ = cube_voxel_keys(as_xyz(pred, 'pred'), voxel_size, extent)
    keys_g, _ = cube_voxel_keys(as_xyz(gt, 'gt'), voxel_size, extent)
    return _js_distance(*_aligned_counts(keys_p, keys_g), 'jsd_3d')


@dataclass(frozen=True)
class IoUCounts:
    """Voxel confusion counts; add them over the scans of a sequence, then read ``iou``."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: IoUCounts) -> IoUCounts:
        return IoUCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def iou(self) -> float:
        """TP / (TP + FP + FN); NaN when both voxel sets are empty."""
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else float('nan')


def _counts(keys_pred: np.ndarray, keys_gt: np.ndarray) -> IoUCounts:
    occupied_pred = np.unique(keys_pred)
    occupied_gt = np.unique(keys_gt)
    tp = len(np.intersect1d(occupied_pred, occupied_gt, assume_unique=True))
    return IoUCounts(tp=tp, fp=len(occupied_pred) - tp, fn=len(occupied_gt) - tp)


def iou_counts(pred: Any, gt: Any, voxel_size: float,
               extent: float = CUBE_HALF_EXTENT) -> IoUCounts:
    """TP/FP/FN of occupied voxels over the whole [-extent, extent]³ cube."""
    keys_p, _ = cube_voxel_keys(as_xyz(pred, 'pred'), voxel_size, extent)
    keys_g, _ = cube_voxel_keys(as_xyz(gt, 'gt'), voxel_size, extent)
    return _counts(keys_p, keys_g)


def iou_counts_legacy_crop(pred: Any, gt: Any, voxel_size: float,
                           extent: float = CUBE_HALF_EXTENT) -> IoUCounts:
    """TP/FP/FN of the released cropped IoU (only the central ±extent·voxel_size cube)."""
    keys_p = legacy_crop_voxel_keys(as_xyz(pred, 'pred'), voxel_size, extent)
    keys_g = legacy_crop_voxel_keys(as_xyz(gt, 'gt'), voxel_size, extent)
    return _counts(keys_p, keys_g)


def completion_iou(pred: Any, gt: Any, voxel_size: float,
                   extent: float = CUBE_HALF_EXTENT) -> float:
    """Completion IoU of one scan over the whole ±50 m cube (use IoUCounts sums for sequences)."""
    return iou_counts(pred, gt, voxel_size, extent).iou


def completion_iou_legacy_crop(pred: Any, gt: Any, voxel_size: float,
                               extent: float = CUBE_HALF_EXTENT) -> float:
    """The released (pre-June-2025) cropped IoU, for comparison with published numbers only."""
    return iou_counts_legacy_crop(pred, gt, voxel_size, extent).iou


# ---------------------------------------------------------------------------------------------
# earth mover's distance


def _spread_bits(values: np.ndarray) -> np.ndarray:
    """Insert two zero bits between the low 21 bits of each value (Morton interleaving)."""
    x = values.astype(np.uint64) & np.uint64(0x1FFFFF)
    for shift, mask in ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF),
                        (8, 0x100F00F00F00F00F), (4, 0x10C30C30C30C30C3),
                        (2, 0x1249249249249249)):
        x = (x | (x << np.uint64(shift))) & np.uint64(mask)
    return x


def morton_order(points: np.ndarray) -> np.ndarray:
    """Indices sorting ``points`` along a Z-order curve over their bounding cube."""
    low = points.min(axis=0)
    span = float(np.max(points.max(axis=0) - low)) or 1.0
    cells = np.floor((points - low) / span * (2 ** _MORTON_BITS - 1)).astype(np.uint64)
    code = (_spread_bits(cells[:, 0]) | (_spread_bits(cells[:, 1]) << np.uint64(1))
            | (_spread_bits(cells[:, 2]) << np.uint64(2)))
    return np.argsort(code, kind='stable')


def space_filling_subsample(points: np.ndarray, count: int,
                            rng: np.random.Generator) -> np.ndarray:
    """``count`` points by systematic sampling along the Morton curve with a random offset."""
    if count >= len(points):
        return points
    step = len(points) / count
    picks = np.floor(rng.uniform(0.0, step) + step * np.arange(count)).astype(np.int64)
    return points[morton_order(points)[np.minimum(picks, len(points) - 1)]]


def emd(pred: Any, gt: Any, points: int = EMD_POINTS, seed: int = 0) -> float:
    """Earth mover's distance (W1, metres) by exact assignment; see the module docstring.

    Exact for the clouds themselves when lcm(N, M) <= ``points``; otherwise exact between
    ``min(points, N, M)``-point space-filling-curve samples of each cloud (seeded by ``seed``).
    """
    p = _nonempty(as_xyz(pred, 'pred'), 'pred', 'emd')
    g = _nonempty(as_xyz(gt, 'gt'), 'gt', 'emd')
    if points < 1:
        raise ValueError(f'emd: points must be >= 1, got {points}')
    common = math.lcm(len(p), len(g))
    if common <= points:
        a = np.repeat(p, common // len(p), axis=0)
        b = np.repeat(g, common // len(g), axis=0)
    else:
        rng = np.random.default_rng(seed)
        count = min(points, len(p), len(g))
        a = space_filling_subsample(p, count, rng)
        b = space_filling_subsample(g, count, rng)
    cost = cdist(a, b)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


# ---------------------------------------------------------------------------------------------
# everything for one scan


def scan_metrics(pred: Any, gt: Any, *, voxel_sizes: Sequence[float] = IOU_VOXEL_SIZES,
                 thresholds: Sequence[float] = PR_THRESHOLDS, emd_points: int = EMD_POINTS,
                 seed: int = 0) -> dict[str, Any]:
    """All metrics of one scan, sharing the two NN searches; JSON-serialisable.

    Keys: cd, precision, recall, fscore, jsd (BEV), jsd_3d, emd, points_pred, points_gt and
    ``iou_counts`` / ``iou_counts_legacy`` mapping str(voxel size) to [tp, fp, fn].
    """
    d_pg, d_gp = _both_directions(pred, gt, 'scan_metrics')
    p, g = as_xyz(pred, 'pred'), as_xyz(gt, 'gt')
    prf = prf_from_distances(d_pg, d_gp, thresholds)
    return {
        'cd': chamfer_from_distances(d_pg, d_gp),
        'precision': prf.precision,
        'recall': prf.recall,
        'fscore': prf.fscore,
        'jsd': jsd_bev(p, g),
        'jsd_3d': jsd_3d(p, g),
        'emd': emd(p, g, points=emd_points, seed=seed),
        'points_pred': len(p),
        'points_gt': len(g),
        'iou_counts': {str(v): _as_list(iou_counts(p, g, v)) for v in voxel_sizes},
        'iou_counts_legacy': {str(v): _as_list(iou_counts_legacy_crop(p, g, v))
                              for v in voxel_sizes},
    }


def _as_list(counts: IoUCounts) -> list[int]:
    return [counts.tp, counts.fp, counts.fn]
