"""The street a drive follows: a curving centre line, a smooth elevation field and the road ribbon.

The centre line is integrated from a curvature profile (straights and arcs joined by clothoid
ramps), so heading and position are smooth; its heading stays within +-60 deg of the start so the
street never folds back on itself. Heights everywhere come from one smooth elevation field, so the
road, side streets, terrain and objects agree without seams. The ribbon is the road cross-section
(lanes, markings, curbs, grass strips, sidewalks, verges) swept along the centre line, with the
curb opened where a side street joins.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy.spatial import cKDTree

from distdpo_training.data.simulation import materials as M
from distdpo_training.data.simulation.mesh import MeshBuilder

MAX_HEADING = np.radians(60.0)
SAMPLE_STEP = 0.5     # m between centre-line samples
DASH_ON, DASH_PERIOD = 3.0, 9.0   # dashed lane lines: 3 m paint every 9 m


@dataclasses.dataclass
class Elevation:
    """Smooth ground height z = sum_k a_k sin(k . xy + phi_k); grades stay below a few percent."""

    wave: np.ndarray    # (K, 2) wave vectors (rad/m)
    amp: np.ndarray     # (K,)
    phase: np.ndarray   # (K,)

    @classmethod
    def random(cls, rng: np.random.Generator, max_grade: float = 0.03) -> Elevation:
        k = 4
        wavelength = rng.uniform(150.0, 600.0, k)
        angle = rng.uniform(0, 2 * np.pi, k)
        wave = (2 * np.pi / wavelength)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        amp = rng.uniform(0.3, 1.0, k) * max_grade / (k * np.linalg.norm(wave, axis=1))
        return cls(wave, amp, rng.uniform(0, 2 * np.pi, k))

    def height(self, xy: np.ndarray) -> np.ndarray:
        return np.sin(np.einsum('nj,kj->nk', xy, self.wave) + self.phase) @ self.amp

    def gradient(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) height gradient."""
        return np.einsum('nk,kj->nj', np.cos(np.einsum('nj,kj->nk', xy, self.wave) + self.phase)
                         * self.amp, self.wave)


@dataclasses.dataclass
class Centerline:
    """Centre line sampled by arc length: s (M,), xy (M, 2), unwrapped heading (M,), curvature."""

    s: np.ndarray
    xy: np.ndarray
    heading: np.ndarray
    curvature: np.ndarray

    def __post_init__(self) -> None:
        self._tree = cKDTree(self.xy)

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def at(self, s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Position (N, 2) and heading (N,) at arc lengths `s` (linear interpolation)."""
        s = np.atleast_1d(np.asarray(s, np.float64))
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        return np.stack([x, y], 1), np.interp(s, self.s, self.heading)

    def place(self, s: np.ndarray | float, d: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """World xy of the point at arc length s and signed lateral offset d (left positive)."""
        xy, h = self.at(s)
        normal = np.stack([-np.sin(h), np.cos(h)], 1)
        return xy + normal * np.asarray(d, np.float64).reshape(-1, 1), h

    def nearest(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance of points (N, 2) to the centre line and the index of the nearest sample
        (samples are 0.5 m apart: the distance is off by less than 1 cm)."""
        return self._tree.query(np.asarray(xy, np.float64).reshape(-1, 2))

    def truncated(self, length: float) -> Centerline:
        """The first `length` m of this centre line."""
        n = int(np.searchsorted(self.s, length, side='right'))
        return Centerline(self.s[:n], self.xy[:n], self.heading[:n], self.curvature[:n])

    def curvature_at(self, s: np.ndarray | float) -> np.ndarray:
        return np.interp(np.atleast_1d(s), self.s, self.curvature)


def random_centerline(rng: np.random.Generator, length: float, urban: bool) -> Centerline:
    """A street of `length` m: straights and arcs joined by clothoid ramps (urban: tighter)."""
    n = int(np.ceil(length / SAMPLE_STEP)) + 1
    kappa = np.zeros(n)
    ramp = int(12.0 / SAMPLE_STEP)
    heading, i = 0.0, int(rng.uniform(20, 60) / SAMPLE_STEP)
    while i < n:
        if rng.random() < 0.4:                                   # a straight
            i += int(rng.uniform(30, 150) / SAMPLE_STEP)
            continue
        radius = rng.uniform(22, 60) if urban else rng.uniform(50, 300)
        turn = np.radians(rng.uniform(30, 90) if urban else rng.uniform(10, 50))
        sign = rng.choice([-1.0, 1.0])
        if abs(heading + sign * turn) > MAX_HEADING:
            sign = -sign
        target = float(np.clip(heading + sign * turn, -MAX_HEADING, MAX_HEADING))
        turn = abs(target - heading)
        if turn < np.radians(5):
            i += ramp
            continue
        arc = max(int(turn * radius / SAMPLE_STEP) - ramp, 1)
        seg = np.concatenate([np.linspace(0, 1, ramp), np.ones(arc), np.linspace(1, 0, ramp)])
        seg *= np.sign(target - heading) * turn / (seg.sum() * SAMPLE_STEP)   # turns exactly
        end = min(i + len(seg), n)
        kappa[i:end] = seg[:end - i]
        heading += seg[:end - i].sum() * SAMPLE_STEP
        i = end + int(rng.uniform(20, 80) / SAMPLE_STEP)
    theta = np.concatenate([[0.0], np.cumsum((kappa[1:] + kappa[:-1]) / 2) * SAMPLE_STEP])
    mid = (theta[1:] + theta[:-1]) / 2
    steps = np.stack([np.cos(mid), np.sin(mid)], 1) * SAMPLE_STEP
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, 0)])
    return Centerline(np.arange(n) * SAMPLE_STEP, xy, theta, kappa)


def straight_line(start: np.ndarray, heading: float, length: float) -> Centerline:
    """A straight centre line (side streets)."""
    s = np.arange(0.0, length + SAMPLE_STEP / 2, SAMPLE_STEP)
    direction = np.array([np.cos(heading), np.sin(heading)])
    return Centerline(s, start + s[:, None] * direction, np.full(len(s), heading),
                      np.zeros(len(s)))


@dataclasses.dataclass(frozen=True)
class CrossSection:
    """One side of the road, from the centre outwards (all widths in m)."""

    lanes: int
    lane_width: float
    parking: float        # parking-lane width (0 = none)
    curb: float           # curb height
    grass: float          # grass strip between curb and sidewalk
    sidewalk: float
    verge: float          # terrain between sidewalk and the ribbon edge

    @property
    def road_edge(self) -> float:
        return self.lanes * self.lane_width + self.parking

    @property
    def sidewalk_span(self) -> tuple[float, float]:
        start = self.road_edge + self.grass
        return start, start + self.sidewalk

    @property
    def width(self) -> float:
        return self.road_edge + self.grass + self.sidewalk + self.verge

    def surface(self, d: np.ndarray, crown: float) -> np.ndarray:
        """Height of the ground surface at lateral distances |d| (relative to the centre line)."""
        xp, fp = _beyond_curb(self, crown)
        d_abs = np.abs(np.asarray(d, np.float64))
        edge = self.road_edge
        return np.where(d_abs > edge, np.interp(d_abs, xp, fp), -crown * np.minimum(d_abs, edge))

    def strips(self, crown: float) -> list[tuple[float, float, int, int, float, int]]:
        """Breakpoints (d, dz, label, material, rho, dash) outward; the strip from a breakpoint to
        the next has that breakpoint's attributes (dash: 0 none, 1 dashed line, 2 solid line)."""
        half = 0.075
        out: list[tuple[float, float, int, int, float, int]] = []

        def z(d: float) -> float:
            return -crown * d

        def paint(d: float, dash: int) -> None:
            out.append((max(d - half, 0.0), z(max(d - half, 0.0)), M.ROAD, M.MARKING, 0.55, dash))
            out.append((d + half, z(d + half), M.ROAD, M.ASPHALT, 0.0, 0))

        paint(0.0, 1 if self.lanes == 1 else 2)   # centre line
        for k in range(1, self.lanes):
            paint(k * self.lane_width, 1)
        if self.parking > 0:
            paint(self.lanes * self.lane_width, 2)
        edge = self.road_edge
        z_edge = z(edge)
        top = z_edge + self.curb
        out.append((edge, z_edge, M.SIDEWALK, M.CONCRETE, 0.0, 0))       # curb face
        d = edge
        if self.grass > 0:
            out.append((edge, top, M.TERRAIN, M.GRASS, 0.0, 0))
            d += self.grass
        out.append((d, top + 0.01 * (d - edge), M.SIDEWALK, M.CONCRETE, 0.0, 0))
        d += self.sidewalk
        out.append((d, top + 0.01 * (d - edge), M.TERRAIN, M.GRASS, 0.0, 0))
        d += self.verge
        out.append((d, top + 0.01 * (d - edge), M.TERRAIN, M.GRASS, 0.0, 0))
        return out


@functools.lru_cache(maxsize=64)
def _beyond_curb(section: CrossSection, crown: float) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (d, height) of a cross-section from the kerb top outwards (the curb is a
    vertical step: its top belongs to the points beyond the road edge)."""
    strips = section.strips(crown)
    xp = np.array([p[0] for p in strips])
    fp = np.array([p[1] for p in strips])
    beyond = xp > section.road_edge - 1e-9
    return xp[beyond][1:], fp[beyond][1:]


def add_ribbon(builder: MeshBuilder, line: Centerline, elevation: Elevation,
               left: CrossSection, right: CrossSection, openings: list[tuple[float, float, int]],
               rho: np.ndarray, step: float = 1.0, crown: float = 0.02,
               z_offset: float = 0.0) -> None:
    """Sweep the cross-section along `line` into `builder`.

    `openings` are (s_from, s_to, side) ranges where a side street joins (side +1 left, -1 right):
    there the road surface continues flat from the curb line to the ribbon edge. `rho` is the base
    reflectivity per material id for strips without their own value; `z_offset` lifts the whole
    ribbon relative to the elevation field (side streets meet the main road at its curb line).
    """
    s = np.arange(0.0, line.length, step)
    sides = []
    for section in (left, right):
        strips = section.strips(crown)
        d = np.array([p[0] for p in strips])
        dz = np.array([p[1] for p in strips])
        curb = next(i for i, p in enumerate(strips) if p[2] == M.SIDEWALK)
        sides.append((d, dz, strips[:-1], curb))
    (dl, zl, al, el), (dr, zr, ar, er) = sides
    nl, nr = len(dl), len(dr)
    # Vertex columns from the left edge to the right edge; both sides share the centre column.
    offsets = np.concatenate([dl[::-1], -dr[1:]])
    base_dz = np.concatenate([zl[::-1], zr[1:]])
    strips = al[::-1] + ar                     # strip c joins columns c and c + 1
    # Beyond the curb line: left breakpoints k > el are columns 0 .. nl-2-el, right ones k > er
    # are columns nl+er .. nl+nr-2; the strips from the curb line outwards likewise.
    open_cols = (np.arange(0, nl - 1 - el), np.arange(nl + er, nl + nr - 1))
    open_strips = (np.arange(0, nl - 1 - el), np.arange(nl - 1 + er, nl + nr - 2))
    curb_dz = (zl[el], zr[er])

    heading = line.at(s)[1]
    normal = np.stack([-np.sin(heading), np.cos(heading)], 1)
    xy = line.at(s)[0][:, None, :] + normal[:, None, :] * offsets[None, :, None]   # (S, C, 2)
    dz = np.repeat(base_dz[None], len(s), 0)
    opened = np.zeros((len(s), 2), bool)
    for s0, s1, side in openings:
        k = 0 if side > 0 else 1
        rows = (s >= s0) & (s <= s1)
        opened[rows, k] = True
        dz[np.ix_(rows, open_cols[k])] = curb_dz[k]
    z = elevation.height(xy.reshape(-1, 2)).reshape(len(s), -1) + dz + z_offset
    verts = np.concatenate([xy, z[..., None]], 2).reshape(-1, 3)

    n_cols = len(offsets)
    rows, cols = np.meshgrid(np.arange(len(s) - 1), np.arange(n_cols - 1), indexing='ij')
    a = rows * n_cols + cols
    faces = np.stack([np.stack([a, a + n_cols + 1, a + 1], -1),
                      np.stack([a, a + n_cols, a + n_cols + 1], -1)], 2).reshape(-1, 3)
    quads = (len(s) - 1, 1)
    label = np.tile(np.array([p[2] for p in strips]), quads)
    mat = np.tile(np.array([p[3] for p in strips]), quads)
    rh = np.tile(np.array([p[4] or rho[p[3]] for p in strips], np.float32), quads)
    dash = np.tile(np.array([p[5] for p in strips]), quads)
    unpainted = (dash == 1) & ((s[:-1, None] % DASH_PERIOD) >= DASH_ON)
    mat[unpainted], rh[unpainted] = M.ASPHALT, rho[M.ASPHALT]
    for k in range(2):
        rows_open = opened[:-1, k] | opened[1:, k]
        idx = np.ix_(rows_open, open_strips[k])
        label[idx], mat[idx], rh[idx] = M.ROAD, M.ASPHALT, rho[M.ASPHALT]
    builder.add_attributed(verts, faces, np.repeat(label.ravel(), 2), np.repeat(mat.ravel(), 2),
                           np.repeat(rh.ravel(), 2))
