"""The input baselines every quality number stands beside: what a user has without the model.

For one raw scan and a model's config (its range, scan points M and replication K):

- ``raw scan``: every point of the scan inside the model's range window (all of them);
- ``conditioning points``: the M points the model is conditioned on (the Completer's own
  pre-processing, :func:`distdpo_ros.completion.preprocess`: the raw scan's points in range,
  subsampled);
- ``jittered conditioning``: those points tiled K times plus 0.2 m Gaussian noise, x_init +
  0.2 N(0, I): what a model that learned nothing useful but kept its input would return;
- ``raw scan subsampled``: the scan randomly subsampled to the model's output size K x M
  (what forwarding the input gives a user for the same number of points).

A completion model adds information only where it beats these on the same scans. The clouds are
deterministic for a (scan, seed). Evaluation, validation during training and the demo all take
them from here.
"""

from __future__ import annotations

import numpy as np

from distdpo_ros.completion import subsample_scan, valid_points
from distdpo_ros.config import ModelConfig

JITTER = 0.2  # metres, the noise of the jittered baseline
RAW, CONDITIONING, JITTERED, SUBSAMPLED = (
    'raw scan', 'conditioning points', 'jittered conditioning', 'raw scan subsampled')
BASELINES = (RAW, CONDITIONING, JITTERED, SUBSAMPLED)
SHORT = {RAW: 'raw', CONDITIONING: 'cond', JITTERED: 'jit', SUBSAMPLED: 'sub'}  # table columns


def input_clouds(valid: np.ndarray, conditioning: np.ndarray, config: ModelConfig,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Every baseline cloud (P, 3) float32 by name, from a scan's points inside the model's range
    window (`valid`, :func:`distdpo_ros.completion.valid_points`) and its conditioning points."""
    rng = np.random.default_rng(seed)
    count = min(config.full_points, len(valid))
    tiled = np.tile(conditioning, (config.replication, 1))
    return {
        RAW: valid,
        CONDITIONING: conditioning,
        JITTERED: (tiled + JITTER * rng.standard_normal(tiled.shape)).astype(np.float32),
        SUBSAMPLED: np.ascontiguousarray(valid[np.sort(rng.choice(len(valid), count,
                                                                  replace=False))]),
    }


def scan_input_clouds(points: np.ndarray, config: ModelConfig, seed: int = 0,
                      source: str = 'scan') -> dict[str, np.ndarray]:
    """:func:`input_clouds` of a raw (N, 3|>=4) scan, pre-processed as the Completer does."""
    valid = valid_points(points, config, source)
    return input_clouds(valid, subsample_scan(valid, config.scan_points), config, seed)


def beats(model: dict, baseline: dict) -> tuple[bool, bool]:
    """(lower CD, higher F-score) of a model's metrics against a baseline's on the same scans."""
    return (model['cd'] < baseline['cd'], model['fscore'] > baseline['fscore'])
