"""The procedural world of one simulated sequence: a street and everything along it.

A world is built once per sequence from its own random generator: the main street (a curving
centre line with lanes, markings, curbs, sidewalks), side streets joining it, the terrain around
(smooth hills away from the road), buildings in rows with varied frontage, height and setback
(urban blocks or suburban houses with gable roofs, hedges, fences and yards), street trees and yard
trees (trunk + irregular crown), bushes, street lights, signs, parked cars of several sizes,
standing people and parked bicycles. Moving traffic is in :mod:`agents`. The static geometry is
one triangle mesh with per-face attributes (:class:`mesh.Mesh`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distdpo_training.data.simulation import materials as M
from distdpo_training.data.simulation.agents import bicycle_parts, person_parts, vehicle_parts
from distdpo_training.data.simulation.mesh import Mesh, MeshBuilder, yaw_matrix
from distdpo_training.data.simulation.road import (
    Centerline,
    CrossSection,
    Elevation,
    add_ribbon,
    random_centerline,
    straight_line,
)

CROWN = 0.02          # road cross slope
TERRAIN_CELL = 2.0    # m, terrain grid spacing
TERRAIN_REACH = 100.0  # m of terrain on each side of the main street
# Default reflectivity per material (objects with their own colour override it).
RHO = np.array([0.30, 0.60, 0.34, 0.36, 0.30, 0.30, 0.30, 0.05, 0.40, 0.25, 0.30, 0.95,
                0.20, 0.18], np.float32)
assert len(RHO) == len(M.MATERIALS)


@dataclasses.dataclass
class SideStreet:
    """A straight street joining the main one at arc length `s` on `side` (+1 left, -1 right)."""

    s: float
    side: int
    line: Centerline
    section: CrossSection

    @property
    def half_width(self) -> float:
        return self.section.width


@dataclasses.dataclass
class Street:
    """The main street, its side streets and the ground around them (heights everywhere)."""

    line: Centerline
    elevation: Elevation
    hills: Elevation
    left: CrossSection
    right: CrossSection
    side_streets: list[SideStreet] = dataclasses.field(default_factory=list)

    def section(self, side: int) -> CrossSection:
        return self.left if side > 0 else self.right

    @property
    def ego_lane(self) -> float:
        """Lateral offset of the ego lane centre (the outermost right lane)."""
        return -(self.right.lanes - 0.5) * self.right.lane_width

    def offset(self, xy: np.ndarray) -> np.ndarray:
        """Signed lateral offset (left positive) of points from the main centre line."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        dist, idx = self.line.nearest(xy)
        h = self.line.heading[idx]
        rel = xy - self.line.xy[idx]
        side = np.cos(h) * rel[:, 1] - np.sin(h) * rel[:, 0]
        return dist * np.where(side < 0, -1.0, 1.0)

    def _widths(self, d: np.ndarray) -> np.ndarray:
        return np.where(d > 0, self.left.width, self.right.width)

    def terrain_height(self, xy: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
        """Terrain outside the ribbons: the verge level near the street, rolling hills beyond
        (`d`: the points' lateral offsets when already known)."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        d = self.offset(xy) if d is None else d
        level = np.where(d > 0, self.left.surface(self.left.width, CROWN),
                         self.right.surface(self.right.width, CROWN))
        t = np.clip((np.abs(d) - self._widths(d)) / 25.0, 0.0, 1.0)
        hills = t * t * (3 - 2 * t) * self.hills.height(xy)
        return self.elevation.height(xy) + level - 0.03 + hills

    def ground(self, xy: np.ndarray) -> np.ndarray:
        """Surface height anywhere: the cross-section inside the main street, terrain outside."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        d = self.offset(xy)
        z = self.terrain_height(xy, d)
        inside = np.abs(d) < self._widths(d)
        profile = np.where(d > 0, self.left.surface(d, CROWN), self.right.surface(d, CROWN))
        z[inside] = self.elevation.height(xy[inside]) + profile[inside]
        return z

    def clear_of_streets(self, xy: np.ndarray, margin: float = 0.3) -> bool:
        """True when all points are off the main street's ribbon and off every side street."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        d = self.offset(xy)
        if (np.abs(d) < self._widths(d) + margin).any():
            return False
        return not self.on_side_street(xy, margin).any()

    def on_side_street(self, xy: np.ndarray, margin: float = 0.0,
                       from_centre: bool = False) -> np.ndarray:
        """Per point: whether it lies on a side street's ribbon (grown by `margin`); with
        `from_centre` the side streets reach back to the main street's centre line."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if not self.side_streets:
            return np.zeros(len(xy), bool)
        streets = self.side_streets
        origin = np.array([st.line.xy[0] for st in streets])
        heading = np.array([st.line.heading[0] for st in streets])
        length = np.array([st.line.length for st in streets])
        half = np.array([st.half_width for st in streets])
        start = np.array([self.section(st.side).width if from_centre else 0.0 for st in streets])
        rel = xy[:, None, :] - origin[None]
        c, s = np.cos(heading), np.sin(heading)
        u = rel[..., 0] * c + rel[..., 1] * s
        v = rel[..., 1] * c - rel[..., 0] * s
        return ((u > -start - margin) & (u < length + margin)
                & (np.abs(v) < half + margin)).any(1)


@dataclasses.dataclass
class World:
    """Everything a sequence needs: the street, the static mesh and the facade window layouts."""

    urban: bool
    street: Street
    static: Mesh
    facades: np.ndarray      # (B, 5) per building (face owner): u phase, window pitch,
    #                          window width, floor height, base z
    instances: int           # instance ids used by static objects (agents continue after)

    @property
    def ego_lane(self) -> float:
        return self.street.ego_lane


# ----------------------------------------------------------------------------------------------
# Footprints: oriented rectangles used to keep objects apart
# ----------------------------------------------------------------------------------------------

class Footprints:
    """Oriented rectangles (centre, half sizes, yaw) with a vectorised overlap test."""

    def __init__(self) -> None:
        self.center = np.zeros((0, 2))
        self.half = np.zeros((0, 2))
        self.yaw = np.zeros(0)

    def add(self, center: np.ndarray, half: tuple[float, float], yaw: float) -> None:
        self.center = np.vstack([self.center, np.reshape(center, (1, 2))])
        self.half = np.vstack([self.half, np.reshape(half, (1, 2))])
        self.yaw = np.append(self.yaw, yaw)

    def overlaps(self, center: np.ndarray, half: tuple[float, float], yaw: float,
                 margin: float = 0.0) -> bool:
        """Whether the rectangle (grown by `margin`) meets any stored one (separating axes)."""
        if not len(self.yaw):
            return False
        center = np.reshape(center, 2)
        ha = np.asarray(half, np.float64) + margin
        near = np.linalg.norm(self.center - center, axis=1) < (
            np.linalg.norm(self.half, axis=1) + np.linalg.norm(ha))
        if not near.any():
            return False
        hb, yb, delta = self.half[near], self.yaw[near], self.center[near] - center
        axes_a = np.array([[np.cos(yaw), np.sin(yaw)], [-np.sin(yaw), np.cos(yaw)]])
        axes_b = np.stack([np.stack([np.cos(yb), np.sin(yb)], 1),
                           np.stack([-np.sin(yb), np.cos(yb)], 1)], 1)        # (K, 2, 2)
        separated = np.zeros(len(hb), bool)
        for i in range(2):
            reach = ha[i] + (np.abs(axes_b @ axes_a[i]) * hb).sum(1)
            separated |= np.abs(delta @ axes_a[i]) > reach
            axis = axes_b[:, i]
            reach = (np.abs(axis @ axes_a.T) * ha).sum(1) + hb[:, i]
            separated |= np.abs((delta * axis).sum(1)) > reach
        return not separated.all()


@dataclasses.dataclass
class _Layout:
    """What placement needs while the world is being assembled."""

    urban: bool
    rng: np.random.Generator
    street: Street
    builder: MeshBuilder = dataclasses.field(default_factory=MeshBuilder)
    taken: Footprints = dataclasses.field(default_factory=Footprints)
    facades: list[list[float]] = dataclasses.field(default_factory=list)
    instance: int = 0

    def next_instance(self) -> int:
        self.instance += 1
        return self.instance

    @property
    def line(self) -> Centerline:
        return self.street.line

    def section(self, side: int) -> CrossSection:
        return self.street.section(side)

    def ground(self, xy: np.ndarray) -> np.ndarray:
        return self.street.ground(xy)


def _rect_outline(center: np.ndarray, half: tuple[float, float], yaw: float,
                  samples: int = 3) -> np.ndarray:
    """Points along the outline of a rectangle (corners and points on its edges)."""
    t = np.linspace(-1, 1, samples)
    u = np.concatenate([t, np.ones(samples), t[::-1], -np.ones(samples)])
    v = np.concatenate([-np.ones(samples), t, np.ones(samples), t[::-1]])
    local = np.stack([u * half[0], v * half[1]], 1)
    r = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    return local @ r.T + np.reshape(center, 2)


# ----------------------------------------------------------------------------------------------
# Streets and terrain
# ----------------------------------------------------------------------------------------------

def _cross_sections(rng: np.random.Generator, urban: bool) -> tuple[CrossSection, CrossSection]:
    lanes = int(rng.choice([1, 2])) if urban else 1
    lane_width = rng.uniform(3.0, 3.6)
    curb = rng.uniform(0.10, 0.16)
    sections = []
    for _ in range(2):
        parking = rng.uniform(2.0, 2.4) if rng.random() < (0.55 if urban else 0.35) else 0.0
        if urban:
            sections.append(CrossSection(lanes, lane_width, parking, curb, 0.0,
                                         rng.uniform(2.5, 5.0), 0.6))
        else:
            sections.append(CrossSection(lanes, lane_width, parking, curb,
                                         rng.uniform(0.0, 2.5), rng.uniform(1.5, 2.5),
                                         rng.uniform(1.0, 2.5)))
    return sections[0], sections[1]


def _side_streets(rng: np.random.Generator, street: Street, urban: bool) -> list[SideStreet]:
    """Side streets at intervals, where the main street is nearly straight."""
    out: list[SideStreet] = []
    line = street.line
    s = rng.uniform(40, 90)
    while s < line.length - 40:
        window = np.arange(s - 25, s + 25, 2.0)
        if np.abs(line.curvature_at(window)).max() > 1 / 120:
            s += 15
            continue
        side = int(rng.choice([-1, 1]))
        main = street.section(side)
        section = CrossSection(1, rng.uniform(2.75, 3.5), 0.0, main.curb, 0.0,
                               rng.uniform(1.5, 3.5), rng.uniform(0.6, 2.0))
        xy, heading = line.place(s, side * main.width)
        road_heading = float(heading[0]) + side * np.pi / 2
        out.append(SideStreet(s, side, straight_line(xy[0], road_heading, rng.uniform(45, 85)),
                              section))
        s += rng.uniform(70, 160) if urban else rng.uniform(90, 220)
    return out


def _add_streets(lay: _Layout) -> None:
    street = lay.street
    openings = [(st.s - st.section.road_edge - 0.5, st.s + st.section.road_edge + 0.5, st.side)
                for st in street.side_streets]
    add_ribbon(lay.builder, street.line, street.elevation, street.left, street.right, openings,
               RHO, crown=CROWN)
    for st in street.side_streets:
        main = street.section(st.side)
        add_ribbon(lay.builder, st.line, street.elevation, st.section, st.section, [], RHO,
                   crown=0.0, z_offset=-CROWN * main.road_edge)


def _add_terrain(lay: _Layout) -> None:
    """A regular grid around the streets; under the ribbons it is sunk out of sight or cut."""
    street = lay.street
    lo = street.line.xy.min(0) - TERRAIN_REACH
    hi = street.line.xy.max(0) + TERRAIN_REACH
    gx = np.arange(lo[0], hi[0] + TERRAIN_CELL, TERRAIN_CELL)
    gy = np.arange(lo[1], hi[1] + TERRAIN_CELL, TERRAIN_CELL)
    xx, yy = np.meshgrid(gx, gy, indexing='ij')
    xy = np.stack([xx.ravel(), yy.ravel()], 1)
    d = street.offset(xy)
    z = np.full(len(xy), np.nan)
    near = np.abs(d) < TERRAIN_REACH + 2 * TERRAIN_CELL
    z[near] = street.terrain_height(xy[near])
    under = near & (np.abs(d) < street._widths(d))
    under[near] |= street.on_side_street(xy[near], from_centre=True)
    z[under] = street.elevation.height(xy[under]) - 0.6
    ny = len(gy)
    i, j = np.meshgrid(np.arange(len(gx) - 1), np.arange(ny - 1), indexing='ij')
    a = (i * ny + j).ravel()
    quads = np.stack([a, a + ny, a + ny + 1, a + 1], 1)
    # Cells entirely under a ribbon are dropped; border cells stay, sunk where covered.
    quads = quads[np.isfinite(z[quads]).all(1) & ~under[quads].all(1)]
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    verts = np.column_stack([xy, np.nan_to_num(z, nan=-100.0)])
    n = len(faces)
    lay.builder.add_attributed(verts, faces, np.full(n, M.TERRAIN), np.full(n, M.GRASS),
                               RHO[M.GRASS] * lay.rng.uniform(0.75, 1.25, n))


# ----------------------------------------------------------------------------------------------
# Buildings and yards
# ----------------------------------------------------------------------------------------------

def _frontages(street: Street) -> list[tuple[Centerline, int, float, float, float]]:
    """Lines along which buildings stand: (line, side, frontage distance, s from, s to)."""
    out = [(street.line, side, street.section(side).width, 0.0, street.line.length)
           for side in (1, -1)]
    for st in street.side_streets:       # from a little past the corner
        start = street.section(st.side).width + 1.0
        out += [(st.line, side, st.half_width, start, st.line.length) for side in (1, -1)]
    return out


def _building(lay: _Layout, center: np.ndarray, yaw: float, length: float, depth: float,
              height: float) -> None:
    rng, b = lay.rng, lay.builder
    half = (length / 2, depth / 2)
    base = float(lay.ground(_rect_outline(center, half, yaw, 2)).min()) - 0.4
    owner = len(lay.facades)
    pitch = rng.uniform(1.8, 3.2)
    lay.facades.append([rng.uniform(0, pitch), pitch, rng.uniform(0.35, 0.6) * pitch,
                        rng.uniform(2.8, 3.4), base + 0.4 + rng.uniform(0.0, 0.8)])
    rot = yaw_matrix(yaw)
    rho = rng.uniform(0.15, 0.45)
    b.box(np.array([*center, base]), (length, depth, height + 0.4), rot, M.BUILDING, M.FACADE,
          rho, owner=owner)
    top = np.array([*center, base + height + 0.4])
    if not lay.urban:
        ridge_along = length >= depth
        size = (length + 0.6, depth + 0.6) if ridge_along else (depth + 0.6, length + 0.6)
        b.gable_roof(top, size[0], size[1], rng.uniform(2.0, 3.8),
                     rot if ridge_along else yaw_matrix(yaw + np.pi / 2), M.BUILDING, M.ROOF,
                     rng.uniform(0.1, 0.3))
    elif rng.random() < 0.35:          # a set-back top floor or a roof structure
        b.box(top, (length * 0.6, depth * 0.6, 2.5), rot, M.BUILDING, M.WALL, rho)
    lay.taken.add(center, half, yaw)


# Setback of the building rows from the frontage line (m): the street front, then rows behind.
SETBACKS = {True: ((0.0, 1.5), (22, 34), (45, 60)), False: ((4.0, 12.0), (26, 40), (50, 65))}


def _add_buildings(lay: _Layout) -> None:
    """Rows of buildings along every frontage: closed urban blocks (7-24 m high, small gaps) or
    detached suburban houses (gable roofs, front yards), two more rows behind."""
    rng = lay.rng
    for line, side, front, s_from, s_to in _frontages(lay.street):
        for row, setbacks in enumerate(SETBACKS[lay.urban]):
            s = s_from + rng.uniform(0, 8)
            while s < s_to:
                setback = rng.uniform(*setbacks)
                if lay.urban:
                    length, depth = rng.uniform(10, 30), rng.uniform(10, 16)
                    height = rng.uniform(7, 24)
                    gap = rng.uniform(0.3, 2.0) if rng.random() < 0.7 else rng.uniform(5, 14)
                else:
                    length, depth = rng.uniform(8, 15), rng.uniform(8, 12)
                    height = rng.uniform(3.0, 6.5)
                    gap = rng.uniform(5.0, 16.0)
                mid = s + length / 2
                if mid > s_to:
                    break
                xy, heading = line.place(mid, side * (front + setback + depth / 2))
                center, yaw = xy[0], float(heading[0])
                half = (length / 2, depth / 2)
                if (lay.street.clear_of_streets(_rect_outline(center, half, yaw), 0.2)
                        and not lay.taken.overlaps(center, half, yaw, 0.1)):
                    _building(lay, center, yaw, length, depth, height)
                    if not lay.urban and row == 0:
                        _yard(lay, line, side, front, s - gap / 2, s + length + gap / 2, setback)
                    s += length + gap
                else:
                    s += 3.0                     # try again a little further on


def _yard(lay: _Layout, line: Centerline, side: int, front: float, s0: float, s1: float,
          setback: float) -> None:
    """Suburban front yard: a hedge or fence on the front line, bushes and maybe a tree."""
    rng, b = lay.rng, lay.builder
    kind = rng.choice(['hedge', 'fence', 'wall', 'none'], p=[0.45, 0.2, 0.2, 0.15])
    if kind != 'none' and s1 - s0 > 3:
        length = (s1 - s0) * rng.uniform(0.75, 0.98)
        xy, heading = line.place((s0 + s1) / 2, side * (front + 0.7))
        rot = yaw_matrix(float(heading[0]))
        if lay.street.clear_of_streets(_rect_outline(xy[0], (length / 2, 0.6), float(heading[0])),
                                       0.0):
            base = np.array([xy[0, 0], xy[0, 1], float(lay.ground(xy)[0]) - 0.1])
            if kind == 'hedge':
                b.box(base, (length, rng.uniform(0.6, 1.2), rng.uniform(0.8, 1.9)), rot,
                      M.VEGETATION, M.FOLIAGE, rng.uniform(0.3, 0.5))
            elif kind == 'fence':
                b.box(base, (length, 0.06, rng.uniform(0.9, 1.8)), rot, M.FENCE, M.WALL,
                      rng.uniform(0.2, 0.5))
            else:   # a garden wall
                b.box(base, (length, 0.3, rng.uniform(0.6, 1.6)), rot, M.FENCE, M.WALL,
                      rng.uniform(0.25, 0.5))
    for _ in range(rng.integers(0, 3)):
        xy, _ = line.place(rng.uniform(s0, s1), side * (front + rng.uniform(1.5, max(setback,
                                                                                     1.6))))
        _bush(lay, xy[0], rng.uniform(0.4, 1.3))
    if setback > 6 and rng.random() < 0.5:
        xy, _ = line.place(rng.uniform(s0, s1), side * (front + rng.uniform(2.5, setback - 2.0)))
        _tree(lay, xy[0])


# ----------------------------------------------------------------------------------------------
# Vegetation, street furniture, parked things
# ----------------------------------------------------------------------------------------------

def _tree(lay: _Layout, xy: np.ndarray, size: float = 1.0) -> bool:
    """A trunk and an irregular crown, if the spot is free; returns whether it was placed."""
    rng, b = lay.rng, lay.builder
    if lay.taken.overlaps(xy, (0.5, 0.5), 0.0, 0.3):
        return False
    crown_r = rng.uniform(1.8, 4.2) * size
    z = float(lay.ground(xy)[0])
    trunk_h = rng.uniform(1.8, 4.0) * size
    trunk_r = rng.uniform(0.12, 0.30) * size
    b.prism(np.array([xy[0], xy[1], z - 0.2]), trunk_r, trunk_h + crown_r * 0.8, 7, M.TRUNK,
            M.BARK, rng.uniform(0.2, 0.35), radius_top=trunk_r * 0.6)
    radii = (crown_r * rng.uniform(0.85, 1.15), crown_r * rng.uniform(0.85, 1.15),
             crown_r * rng.uniform(0.8, 1.3))
    b.blob(np.array([xy[0], xy[1], z + trunk_h + radii[2] * rng.uniform(0.7, 0.9)]), radii, 0.3,
           rng, M.VEGETATION, M.FOLIAGE, rng.uniform(0.3, 0.5))
    lay.taken.add(xy, (0.4, 0.4), 0.0)
    return True


def _bush(lay: _Layout, xy: np.ndarray, r: float) -> None:
    if lay.taken.overlaps(xy, (r, r), 0.0, 0.2):
        return
    z = float(lay.ground(xy)[0])
    lay.builder.blob(np.array([xy[0], xy[1], z + r * 0.4]), (r, r * 1.2, r * 0.7), 0.3, lay.rng,
                     M.VEGETATION, M.FOLIAGE, lay.rng.uniform(0.3, 0.5))


def _add_street_trees(lay: _Layout) -> None:
    """Rows of trees in the grass strip, the verge or tree pits in wide sidewalks."""
    rng, street = lay.rng, lay.street
    for side in (1, -1):
        sec = street.section(side)
        if rng.random() > (0.75 if lay.urban else 0.95):
            continue
        if sec.grass > 1.2:
            d = sec.road_edge + sec.grass / 2
        elif not lay.urban:
            d = sec.width - sec.verge / 2
        elif sec.sidewalk > 2.6:
            d = sec.road_edge + 0.8
        else:
            continue
        spacing = rng.uniform(8, 16)
        for s in np.arange(rng.uniform(0, spacing), street.line.length, spacing):
            s += rng.uniform(-1, 1)
            if rng.random() < 0.15 or any(abs(s - st.s) < st.section.width + 3
                                          for st in street.side_streets if st.side == side):
                continue
            _tree(lay, street.line.place(s, side * d)[0][0])


def _add_back_vegetation(lay: _Layout) -> None:
    """Yard, park and back-lot trees and bushes filling the space behind the street."""
    rng, street = lay.rng, lay.street
    for count, reach, make in ((street.line.length / (6 if not lay.urban else 14), 75, 'tree'),
                               (street.line.length / 2.5, 60, 'bush')):
        for _ in range(int(count)):
            side = int(rng.choice([-1, 1]))
            d = street.section(side).width + rng.uniform(1.0, reach)
            xy = street.line.place(rng.uniform(0, street.line.length), side * d)[0][0]
            if not street.clear_of_streets(xy, 1.0):
                continue
            if make == 'tree':
                _tree(lay, xy, rng.uniform(0.8, 1.4))
            else:
                _bush(lay, xy, rng.uniform(0.5, 1.8))


def _add_verge_vegetation(lay: _Layout) -> None:
    """Hedges and bush rows along the back of the sidewalks, where nothing else stands."""
    rng, street = lay.rng, lay.street
    for side in (1, -1):
        sec = street.section(side)
        share = rng.uniform(0.2, 0.5) if lay.urban else rng.uniform(0.4, 0.8)
        s = rng.uniform(0, 10)
        while s < street.line.length:
            length = rng.uniform(3, 20)
            if rng.random() < share and _off_junctions(street, s + length / 2, side, 3.0):
                thick, height = rng.uniform(0.6, 1.4), rng.uniform(0.6, 2.2)
                xy, heading = street.line.place(s + length / 2,
                                                side * (sec.width - sec.verge + thick / 2 + 0.1))
                yaw = float(heading[0])
                if not lay.taken.overlaps(xy[0], (length / 2, thick / 2), yaw, 0.1):
                    base = np.array([xy[0, 0], xy[0, 1], float(lay.ground(xy)[0]) - 0.1])
                    lay.builder.box(base, (length, thick, height), yaw_matrix(yaw), M.VEGETATION,
                                    M.FOLIAGE, rng.uniform(0.3, 0.5))
                    lay.taken.add(xy[0], (length / 2, thick / 2), yaw)
            s += length + rng.uniform(1, 12)


def _add_poles_and_signs(lay: _Layout) -> None:
    """Street lights with an arm over the road every 25-40 m near the curb, and traffic signs
    (pole and plate facing the traffic) before side streets and here and there."""
    rng, b, street = lay.rng, lay.builder, lay.street
    for side in (1, -1):
        sec = street.section(side)
        spacing = rng.uniform(25, 40)
        for s in np.arange(rng.uniform(0, spacing), street.line.length, spacing):
            xy, heading = street.line.place(s, side * (sec.road_edge + 0.5))
            if lay.taken.overlaps(xy[0], (0.3, 0.3), 0.0) or not _off_junctions(street, s, side):
                continue
            z = float(lay.ground(xy)[0])
            height = rng.uniform(5.5, 8.5)
            b.prism(np.array([xy[0, 0], xy[0, 1], z - 0.1]), rng.uniform(0.07, 0.12), height, 6,
                    M.POLE, M.METAL, rng.uniform(0.25, 0.4), radius_top=0.06)
            arm = yaw_matrix(float(heading[0]) - side * np.pi / 2)     # lamp arm over the road
            reach = rng.uniform(1.0, 2.0)
            b.box(np.array([xy[0, 0], xy[0, 1], z + height - 0.3]) + arm[:, 0] * reach / 2,
                  (reach, 0.25, 0.2), arm, M.POLE, M.METAL, 0.35)
            lay.taken.add(xy[0], (0.2, 0.2), 0.0)
    # Traffic signs before every side street and scattered along the street.
    spots = [(st.s - st.section.road_edge - 2.5, st.side) for st in street.side_streets]
    spots += [(rng.uniform(0, street.line.length), int(rng.choice([-1, 1])))
              for _ in range(int(street.line.length / 60))]
    for s, side in spots:
        xy, heading = street.line.place(s, side * (street.section(side).road_edge + 0.4))
        if lay.taken.overlaps(xy[0], (0.3, 0.3), 0.0):
            continue
        z = float(lay.ground(xy)[0])
        height = rng.uniform(2.0, 2.6)
        b.prism(np.array([xy[0, 0], xy[0, 1], z - 0.1]), 0.04, height + 0.1, 6, M.POLE,
                M.METAL, 0.3)
        size = rng.uniform(0.6, 0.9)
        b.box(np.array([xy[0, 0], xy[0, 1], z + height - size / 2]), (0.04, size, size),
              yaw_matrix(float(heading[0])), M.TRAFFIC_SIGN, M.RETRO, rng.uniform(0.8, 0.98))
        lay.taken.add(xy[0], (0.2, 0.2), 0.0)


def _off_junctions(street: Street, s: float, side: int, margin: float = 2.0) -> bool:
    return all(abs(s - st.s) > st.section.road_edge + margin
               for st in street.side_streets if st.side == side)


def _place_parts(lay: _Layout, parts: list, xy: np.ndarray, yaw: float) -> None:
    rot = yaw_matrix(yaw)
    offset = np.array([xy[0], xy[1], float(lay.ground(xy)[0])])
    inst = lay.next_instance()
    for verts, faces, label, mat, rho in parts:
        lay.builder.add(verts @ rot.T + offset, faces, label, mat, rho, inst)


def _add_parked(lay: _Layout) -> None:
    """Parked cars in the parking lanes, people standing on sidewalks, parked bicycles."""
    rng, street = lay.rng, lay.street
    for side in (1, -1):
        sec = street.section(side)
        if sec.parking <= 0:
            continue
        s = rng.uniform(0, 10)
        while s < street.line.length:
            parts, length, width = vehicle_parts(rng, trucks=False)   # trucks do not fit
            mid = s + length / 2
            if rng.random() < 0.55 and _off_junctions(street, mid, side, 4 + length / 2):
                d = sec.road_edge - width / 2 - rng.uniform(0.1, 0.35)      # against the curb
                xy, heading = street.line.place(mid, side * d)
                _place_parts(lay, parts, xy[0], float(heading[0]) + np.pi * (rng.random() < 0.5))
            s += length + rng.uniform(0.8, 9.0)
    for _ in range(int(street.line.length / 60)):
        side = int(rng.choice([-1, 1]))
        lo, hi = street.section(side).sidewalk_span
        s = rng.uniform(0, street.line.length)
        standing = rng.random() < 0.6       # else a bicycle at the back of the sidewalk
        d = rng.uniform(lo + 0.4, hi - 0.3) if standing else hi - 0.4
        xy, heading = street.line.place(s, side * d)
        half = (0.3, 0.3) if standing else (0.9, 0.3)
        if lay.taken.overlaps(xy[0], half, float(heading[0]), 0.2):
            continue
        if standing:
            _place_parts(lay, person_parts(rng), xy[0], rng.uniform(0, 2 * np.pi))
        else:
            _place_parts(lay, bicycle_parts(rng), xy[0], float(heading[0]))
        lay.taken.add(xy[0], half, float(heading[0]))


def plan_street(rng: np.random.Generator, length: float, urban: bool) -> Street:
    """The main street of `length` m: centre line, cross-sections and ground elevation."""
    left, right = _cross_sections(rng, urban)
    return Street(random_centerline(rng, length, urban), Elevation.random(rng),
                  Elevation.random(rng, max_grade=0.08), left, right)


def build_world(rng: np.random.Generator, street: Street, urban: bool,
                length: float | None = None) -> World:
    """Build the static world along `street` (cut to its first `length` m when given): side
    streets, terrain, urban blocks or suburban houses, vegetation, street furniture, parking."""
    if length is not None:
        street.line = street.line.truncated(length)
    street.side_streets = _side_streets(rng, street, urban)
    lay = _Layout(urban, rng, street)
    _add_streets(lay)
    _add_terrain(lay)
    _add_poles_and_signs(lay)
    _add_street_trees(lay)
    _add_buildings(lay)
    _add_verge_vegetation(lay)
    _add_back_vegetation(lay)
    _add_parked(lay)
    return World(urban, street, lay.builder.build(),
                 np.array(lay.facades, np.float32).reshape(-1, 5), lay.instance)
