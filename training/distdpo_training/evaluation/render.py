"""Pictures people can look at: the paper's Fig.-1 layout and the quality/time-vs-steps plots.

`render_figure` draws one column per cloud (input scan, ground truth, teacher, student, ...), a
bird's-eye view on top and a perspective view below, every point coloured by height with one colour
scale, one set of view limits and one camera for all panels, so the panels compare at a glance.
matplotlib is used through the Agg canvas only (no display, no pyplot global state).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros.atomic import atomic_writer

COLORMAP = 'turbo'
MAX_POINTS_PER_PANEL = 60_000  # drawn per panel (seeded subsample); the title gives the count
BACKGROUND = '#ffffff'
TEXT = '#1a1a1a'
FRAME = '#b8bec6'


@dataclass
class Panel:
    """One cloud of the figure: its title (first line) and an optional detail line."""

    title: str
    points: np.ndarray
    detail: str = ''


@dataclass(frozen=True)
class View:
    """What every panel shares: BEV half-extent, height colour range and the perspective camera."""

    extent: float
    z_low: float
    z_high: float

    @property
    def eye(self) -> np.ndarray:
        """Camera behind and to the left of the vehicle, looking forward and down."""
        return np.array([-0.62 * self.extent, 0.42 * self.extent, 0.36 * self.extent])

    @property
    def target(self) -> np.ndarray:
        return np.array([0.18 * self.extent, -0.08 * self.extent, self.z_low])


def common_view(clouds: Sequence[np.ndarray], extent: float | None = None) -> View:
    """View limits shared by all panels: robust ranges of all clouds together (or fixed extent)."""
    parts = [np.asarray(c, dtype=np.float64)[:, :3] for c in clouds if len(c)]
    if not parts:
        raise ValueError('render: every cloud is empty, nothing to draw')
    stacked = np.concatenate(parts)
    if extent is None:
        radius = np.percentile(np.abs(stacked[:, :2]), 99.0)
        extent = max(5.0, 5.0 * math.ceil(radius / 5.0))
    z_low, z_high = np.percentile(stacked[:, 2], [1.0, 99.5])
    if z_high - z_low < 0.5:
        z_high = z_low + 0.5
    return View(extent=float(extent), z_low=float(z_low), z_high=float(z_high))


def crop_to_radius(points: np.ndarray, radius: float | None) -> np.ndarray:
    """The xyz of the points closer than ``radius`` to the sensor (all of them for None)."""
    xyz = np.asarray(points)[:, :3]
    if radius is None:
        return xyz
    return xyz[np.einsum('ij,ij->i', xyz, xyz) < radius * radius]


def _drawn(points: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    if len(points) <= max_points:
        return points
    keep = np.random.default_rng(seed).choice(len(points), max_points, replace=False)
    return points[np.sort(keep)]


def _project(points: np.ndarray, view: View
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pinhole projection (focal length 1): image coordinates and depth of the points in front
    of the camera, and the mask selecting those points."""
    forward = view.target - view.eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    rel = points - view.eye
    depth = rel @ forward
    front = depth > 0.5
    rel, depth = rel[front], depth[front]
    image = np.column_stack([rel @ right, rel @ up]) / depth[:, None]
    return image, depth, front


def _style(ax: Any) -> None:
    ax.set_facecolor(BACKGROUND)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(FRAME)


def _bev(ax: Any, points: np.ndarray, view: View, norm: Any, cmap: Any, size: float) -> None:
    order = np.argsort(points[:, 2])  # high points drawn last, so walls and cars stay visible
    p = points[order]
    ax.scatter(p[:, 0], p[:, 1], c=p[:, 2], s=size, cmap=cmap, norm=norm, marker='o',
               linewidths=0, rasterized=True)
    ax.set_xlim(-view.extent, view.extent)
    ax.set_ylim(-view.extent, view.extent)
    ax.set_aspect('equal')
    ax.plot([0], [0], marker=(3, 0, -90), color=TEXT, markersize=5)  # the sensor, facing +x


def _perspective(ax: Any, points: np.ndarray, view: View, norm: Any, cmap: Any,
                 size: float, aspect: float) -> None:
    image, depth, front = _project(points, view)
    order = np.argsort(-depth)  # far to near: the painter's algorithm
    image, depth, colours = image[order], depth[order], points[front][order, 2]
    reference = np.linalg.norm(view.target - view.eye)
    sizes = size * np.clip((reference / depth) ** 2, 0.15, 6.0)
    ax.scatter(image[:, 0], image[:, 1], c=colours, s=sizes, cmap=cmap, norm=norm, marker='o',
               linewidths=0, rasterized=True)
    half_width = math.tan(math.radians(34.0))
    ax.set_xlim(-half_width, half_width)
    ax.set_ylim(-half_width / aspect, half_width / aspect)
    ax.set_aspect('equal')


def render_figure(panels: Sequence[Panel], out: str | os.PathLike, *, title: str = '',
                  extent: float | None = None, width_px: int = 2400, dpi: int = 150,
                  max_points: int = MAX_POINTS_PER_PANEL, seed: int = 0) -> Path:
    """Write the Fig.-1-style PNG (BEV row over a perspective row) and return its path.

    The image is exactly ``width_px`` wide; its height follows from the number of panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError('render: no panels to draw')
    clouds = [np.asarray(p.points, dtype=np.float64)[:, :3] for p in panels]
    view = common_view(clouds, extent)
    columns = len(panels)
    panel_px = width_px / (columns + 0.12)  # room for the colour bar
    height_px = int(round(panel_px * 1.72 + (60 if title else 0)))
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor=BACKGROUND,
                 layout='constrained')
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.01, hspace=0.01)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, columns, height_ratios=[1.0, 0.68])
    norm = Normalize(view.z_low, view.z_high, clip=True)
    base = 2.2 * panel_px / 1600.0  # marker area grows with the panel size
    for col, (panel, cloud) in enumerate(zip(panels, clouds, strict=True)):
        drawn = _drawn(cloud, max_points, seed + col)
        # sparse clouds get larger dots (area up to 5x) so that they stay visible
        density = float(np.clip(math.sqrt(25_000 / max(1, len(drawn))), 1.0, 5.0))
        top = fig.add_subplot(grid[0, col])
        bottom = fig.add_subplot(grid[1, col])
        for ax in (top, bottom):
            _style(ax)
        _bev(top, drawn, view, norm, COLORMAP, 0.6 * base * density)
        _perspective(bottom, drawn, view, norm, COLORMAP, 0.5 * base * density, 1 / 0.68)
        heading = f'{panel.title}\n{len(cloud):,} points'
        if panel.detail:
            heading += f' · {panel.detail}'
        top.set_title(heading, color=TEXT, fontsize=10, loc='center')
    bar = fig.colorbar(_mappable(norm), ax=fig.axes, shrink=0.6, pad=0.01, label='height z [m]')
    bar.ax.yaxis.label.set_color(TEXT)
    bar.ax.tick_params(colors=TEXT, labelsize=8)
    for spine in bar.ax.spines.values():
        spine.set_color(FRAME)
    if title:
        fig.suptitle(title, color=TEXT, fontsize=12)
    out = Path(out)
    with atomic_writer(out) as handle:
        fig.savefig(handle, format='png', facecolor=BACKGROUND, dpi=dpi)
    return out


def _mappable(norm: Any) -> Any:
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=COLORMAP)


# ---------------------------------------------------------------------------------------------
# evaluation plots


BASELINE_STYLES = ('--', ':', '-.', (0, (5, 1, 1, 1, 1, 1)))  # one per input baseline


def plot_versus_steps(rows: Sequence[Mapping[str, Any]], out: str | os.PathLike,
                      metrics: Sequence[tuple[str, str]], *, panel_px: int = 420,
                      dpi: int = 150) -> Path:
    """One subplot per (key, label) in ``metrics``: value against sampler steps, a line per model.

    ``rows`` are evaluation summary rows with ``model``, ``steps``, ``refine`` and the keys; rows
    with a ``baseline`` (the input baselines) are drawn as dotted horizontal lines. The legend
    sits below the subplots; each subplot is about ``panel_px`` pixels wide.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, list[Mapping[str, Any]]] = {}
    levels = [r for r in rows if r.get('baseline')]  # input baselines: horizontal lines
    rows = [r for r in rows if not r.get('baseline')]
    for row in rows:
        name = row['model'] + (' (Refined)' if row.get('refine') else '')
        series.setdefault(name, []).append(row)
    count = len(metrics)
    entries = len(series) + len(levels)
    legend_rows = math.ceil(entries / min(entries, 2 * count)) if entries else 0
    fig = Figure(figsize=(count * panel_px / dpi, (panel_px * 0.85 + 28 * legend_rows) / dpi),
                 dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, count, squeeze=False)[0]
    steps = sorted({int(r['steps']) for r in rows})
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for index, (name, points) in enumerate(series.items()):
            points = sorted((r for r in points if _finite(r.get(key))), key=lambda r: r['steps'])
            refined = name.endswith('(Refined)')
            ax.plot([r['steps'] for r in points], [r[key] for r in points],
                    marker='s' if refined else 'o', linestyle='--' if refined else '-',
                    color=f'C{index}', label=name, markersize=4)
        for shade, level in enumerate(levels):
            if _finite(level.get(key)):
                ax.axhline(level[key], color=str(0.1 + 0.15 * shade),
                           linestyle=BASELINE_STYLES[shade % len(BASELINE_STYLES)],
                           linewidth=1.3, label=level['model'])
        ax.set_xscale('log', base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel('sampler steps (NFE)', fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    entries = len(series) + len(levels)
    if entries:
        fig.legend(*axes[0].get_legend_handles_labels(), loc='outside lower center',
                   ncols=min(entries, 2 * count), fontsize=7, frameon=False)
    out = Path(out)
    with atomic_writer(out) as handle:
        fig.savefig(handle, format='png', dpi=dpi)
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
