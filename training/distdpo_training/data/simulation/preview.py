"""Bird's-eye pictures of scans, height-coloured, side by side (real next to simulated)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distdpo_ros.atomic import atomic_writer


def save_birds_eye(out_png: str | os.PathLike, scans: Sequence[tuple[str, np.ndarray]],
                   extent: float = 50.0, z_range: tuple[float, float] = (-2.2, 3.0),
                   size: float = 7.0) -> Path:
    """Draw each (title, points (N, >=3)) as a top view of +-`extent` m around the sensor,
    coloured by height, in one row; write the PNG atomically and return its path."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    fig, axes = plt.subplots(1, len(scans), figsize=(size * len(scans), size), squeeze=False,
                             facecolor='black')
    for ax, (title, points) in zip(axes[0], scans, strict=True):
        p = np.asarray(points)
        order = np.argsort(p[:, 2])                 # draw high points last (on top)
        p = p[order]
        ax.scatter(p[:, 0], p[:, 1], c=p[:, 2], s=0.15, cmap='turbo', vmin=z_range[0],
                   vmax=z_range[1], linewidths=0, rasterized=True)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect('equal')
        ax.set_facecolor('black')
        ax.set_title(f'{title}  ({len(p):,} points)', color='white', fontsize=13)
        ax.tick_params(colors='gray', labelsize=8)
        for spine in ax.spines.values():
            spine.set_color('gray')
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_png) as handle:
        fig.savefig(handle, format='png', dpi=110, facecolor='black')
    plt.close(fig)
    return out_png


def save_preview(out_png: str | os.PathLike, sequence_dir: str | os.PathLike,
                 real_scan: str | os.PathLike | None = None, frame: int = 0) -> Path:
    """Bird's-eye picture of scan `frame` of a (simulated) sequence folder, next to a real KITTI
    .bin scan when one is given (real on the left)."""
    from distdpo_training.data.kitti import read_scan

    sequence_dir = Path(sequence_dir)
    scans = []
    if real_scan is not None:
        scans.append((f'real: {Path(real_scan).name}', read_scan(real_scan)))
    scan_path = sequence_dir / 'velodyne' / f'{frame:06d}.bin'
    scans.append((f'simulated: sequence {sequence_dir.name}, scan {frame}', read_scan(scan_path)))
    return save_birds_eye(out_png, scans)
