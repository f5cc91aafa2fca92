"""Road users: the shapes of cars, trucks, people and cyclists, and the moving traffic of a drive.

Shapes are a handful of boxes each (body, cabin with glass, wheels; legs, torso, head), built in
a local frame with x forward and the ground at z = 0. Moving agents follow the main street: cars in
the lanes (oncoming, overtaking, and a lead car keeping a time gap to the ego vehicle), cyclists
along the road edge and pedestrians on the sidewalks. Their arc-length positions are precomputed
for every frame, so an agent's pose at frame f is a cheap lookup; their faces carry the moving
SemanticKITTI classes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from distdpo_training.data.simulation import materials as M
from distdpo_training.data.simulation.mesh import Mesh, MeshBuilder

if TYPE_CHECKING:
    from distdpo_training.data.simulation.scene import Street

# (local vertices, faces, class, material, reflectivity)
Part = tuple[np.ndarray, np.ndarray, int, int, float]

# Car sizes: length, width, height ranges (m) and the share of each kind.
CAR_KINDS = {
    'compact': ((3.7, 4.1), (1.62, 1.75), (1.40, 1.52), 0.25),
    'sedan': ((4.4, 4.95), (1.75, 1.86), (1.40, 1.50), 0.35),
    'suv': ((4.4, 4.9), (1.85, 1.98), (1.62, 1.80), 0.2),
    'van': ((4.9, 5.6), (1.95, 2.05), (1.95, 2.4), 0.16),
    'truck': ((7.0, 9.5), (2.35, 2.5), (2.9, 3.6), 0.04),
}


def _box(center_bottom: tuple[float, float, float], size: tuple[float, float, float], label: int,
         material: int, rho: float) -> Part:
    b = MeshBuilder()
    b.box(np.asarray(center_bottom, np.float64), size, np.eye(3), label, material, rho)
    mesh = b.build()
    return mesh.vertices.astype(np.float64), mesh.faces, label, material, rho


def vehicle_parts(rng: np.random.Generator, trucks: bool = True
                  ) -> tuple[list[Part], float, float]:
    """A random car, SUV, van or (if `trucks`) truck: its parts, length and width."""
    names = [k for k in CAR_KINDS if trucks or k != 'truck']
    share = np.array([CAR_KINDS[k][3] for k in names])
    kind = names[rng.choice(len(names), p=share / share.sum())]
    (l0, l1), (w0, w1), (h0, h1), _ = CAR_KINDS[kind]
    length, width, height = rng.uniform(l0, l1), rng.uniform(w0, w1), rng.uniform(h0, h1)
    paint = float(rng.choice([0.06, 0.12, 0.25, 0.45, 0.6]) * rng.uniform(0.8, 1.2))
    label = M.TRUCK if kind == 'truck' else M.CAR
    wheel = 0.62 if kind != 'truck' else 0.95
    parts = [
        _box((x, y * (width / 2 - 0.14), 0.0), (wheel, 0.24, wheel), label, M.PAINT, 0.04)
        for x in (length * 0.33, -length * 0.33) for y in (-1, 1)
    ]
    if kind == 'truck':
        cab = 2.2
        parts.append(_box((length / 2 - cab / 2, 0, 0.45), (cab, width, height - 0.45), label,
                          M.PAINT, paint))
        parts.append(_box((-cab / 2, 0, 0.9), (length - cab - 0.2, width, height - 0.7), label,
                          M.WALL, rng.uniform(0.3, 0.6)))
        return parts, length, width
    belt = 0.25 + 0.5 * (height - 0.25) if kind != 'van' else 0.25 + 0.45 * (height - 0.25)
    parts.append(_box((0, 0, 0.25), (length, width, belt - 0.25), label, M.PAINT, paint))
    cabin = length * (0.5 if kind in ('compact', 'sedan') else 0.72)
    offset = -length * (0.06 if kind in ('compact', 'sedan') else 0.1)
    parts.append(_box((offset, 0, belt), (cabin, width * 0.9, height - belt - 0.06), label,
                      M.GLASS, 0.05))
    parts.append(_box((offset, 0, height - 0.06), (cabin * 0.92, width * 0.86, 0.06), label,
                      M.PAINT, paint))
    return parts, length, width


def person_parts(rng: np.random.Generator, label: int = M.PERSON) -> list[Part]:
    """A standing or walking person about 1.55-1.95 m tall."""
    h = rng.uniform(1.55, 1.95)
    cloth = rng.uniform(0.08, 0.4)
    return [
        _box((0, 0, 0), (0.28, 0.36, 0.47 * h), label, M.CLOTH, cloth * 0.8),
        _box((0, 0, 0.47 * h), (0.26, 0.46, 0.38 * h), label, M.CLOTH, cloth),
        _box((0, 0, 0.85 * h), (0.2, 0.18, 0.15 * h), label, M.CLOTH, rng.uniform(0.2, 0.4)),
    ]


def bicycle_parts(rng: np.random.Generator, label: int = M.BICYCLE) -> list[Part]:
    """A bicycle: two wheels and a frame, 1.75 m long."""
    frame = rng.uniform(0.15, 0.4)
    return [
        _box((0.55, 0, 0), (0.68, 0.05, 0.68), label, M.METAL, 0.2),
        _box((-0.55, 0, 0), (0.68, 0.05, 0.68), label, M.METAL, 0.2),
        _box((0, 0, 0.35), (1.1, 0.06, 0.45), label, M.METAL, frame),
        _box((0.45, 0, 0.8), (0.08, 0.55, 0.1), label, M.METAL, frame),
    ]


def cyclist_parts(rng: np.random.Generator) -> list[Part]:
    """A bicycle with its rider (SemanticKITTI labels both as bicyclist)."""
    rider = person_parts(rng, M.BICYCLIST)
    legs = _box((0.1, 0, 0.2), (0.2, 0.4, 0.6), M.BICYCLIST, M.CLOTH, rng.uniform(0.1, 0.35))
    upper = [(v * [1, 1, 0.62] + [-0.1, 0, 0.75], f, lb, m, r) for v, f, lb, m, r in rider[1:]]
    return [*bicycle_parts(rng, M.BICYCLIST), legs, *upper]


@dataclasses.dataclass
class Agents:
    """Moving road users: their local mesh and their arc-length track for every frame.

    `mesh` holds every agent in its local frame (face `owner` = agent index, classes already
    moving); `vertex_owner` maps vertices to agents; `track` (A, F) the arc length along the main
    street per frame, `lateral` (A,) the signed offset, `backwards` (A,) whether it drives against
    the street direction; `centers` (A, 3) and `radii` (A,) are local bounding spheres.
    """

    mesh: Mesh
    vertex_owner: np.ndarray
    track: np.ndarray
    lateral: np.ndarray
    backwards: np.ndarray
    centers: np.ndarray
    radii: np.ndarray

    def __len__(self) -> int:
        return len(self.lateral)

    def poses(self, street: Street, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per agent at `frame`: rotation (A, 3, 3), translation (A, 3), present on the street."""
        s = self.track[:, frame]
        present = (s >= 0) & (s <= street.line.length)
        xy, heading = street.line.place(np.clip(s, 0, street.line.length), self.lateral)
        yaw = heading + np.where(self.backwards, np.pi, 0.0)
        z = street.ground(xy)
        c, si = np.cos(yaw), np.sin(yaw)
        rot = np.zeros((len(s), 3, 3))
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, -si, si, c, 1
        return rot, np.column_stack([xy, z]), present

    def world_vertices(self, rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
        """All agents' vertices placed with their poses (float32)."""
        o = self.vertex_owner
        v = self.mesh.vertices.astype(np.float64)
        return (np.einsum('nij,nj->ni', rot[o], v) + trans[o]).astype(np.float32)


def build_agents(rng: np.random.Generator, street: Street, ego_track: np.ndarray,
                 ego_speed: np.ndarray, ego_lane: float, dt: float, first_instance: int) -> Agents:
    """Traffic for a drive whose ego arc length and speed per frame are given."""
    frames = len(ego_track)
    t = np.arange(frames) * dt
    length = street.line.length
    builder = MeshBuilder()
    tracks, lateral, backwards = [], [], []
    instance = first_instance

    def add(parts: list[Part], track: np.ndarray, d: float, back: bool) -> None:
        nonlocal instance
        instance += 1
        owner = len(tracks)
        for verts, faces, label, mat, rho in parts:
            builder.add(verts, faces, M.MOVING[label], mat, rho, instance, owner)
        tracks.append(track)
        lateral.append(d)
        backwards.append(back)

    right, left = street.right, street.left
    # Oncoming cars in every lane of the left side, spread along the street.
    for lane in range(left.lanes):
        d = (lane + 0.5) * left.lane_width
        for s0 in _spread(rng, length + 200, rng.uniform(35, 90)):
            parts, _, _ = vehicle_parts(rng)
            add(parts, s0 - rng.uniform(7, 14) * t, d, True)
    # Same-direction cars in the other lanes on the right (they overtake or fall behind).
    for lane in range(right.lanes - 1):
        d = -(lane + 0.5) * right.lane_width
        for s0 in _spread(rng, length + 200, rng.uniform(40, 90)):
            parts, _, _ = vehicle_parts(rng)
            add(parts, s0 - 100 + rng.uniform(6, 14) * t, d, False)
    # A lead car in the ego lane keeps a time gap (it stops when the ego vehicle stops).
    if rng.random() < 0.6:
        gap = rng.uniform(8, 14) + rng.uniform(1.0, 2.0) * ego_speed
        track = np.maximum.accumulate(ego_track + gap)
        parts, _, _ = vehicle_parts(rng, trucks=False)
        add(parts, track, ego_lane, False)
    # Cyclists at the edge of the oncoming lanes, pedestrians on both sidewalks.
    edge = left.lanes * left.lane_width - 0.7
    for s0 in _spread(rng, length, rng.uniform(80, 250)):
        add(cyclist_parts(rng), s0 - rng.uniform(3.0, 6.5) * t, edge, True)
    for side, section in ((1, left), (-1, right)):
        lo, hi = section.sidewalk_span
        for s0 in _spread(rng, length, rng.uniform(25, 80)):
            back = bool(rng.random() < 0.5)
            speed = rng.uniform(0.9, 1.7) * (-1 if back else 1)
            d = side * rng.uniform(lo + 0.35, max(hi - 0.35, lo + 0.4))
            add(person_parts(rng), s0 + speed * t, d, back)
    mesh = builder.build()
    vertex_owner = np.zeros(len(mesh.vertices), np.int32)
    vertex_owner[mesh.faces.ravel()] = np.repeat(mesh.owner, 3)
    n = len(tracks)
    lo = np.full((n, 3), np.inf)
    hi = np.full((n, 3), -np.inf)
    np.minimum.at(lo, vertex_owner, mesh.vertices)
    np.maximum.at(hi, vertex_owner, mesh.vertices)
    return Agents(mesh, vertex_owner, np.array(tracks, np.float64).reshape(n, frames),
                  np.array(lateral, np.float64), np.array(backwards, bool), (lo + hi) / 2,
                  np.linalg.norm(hi - lo, axis=1) / 2)


def _spread(rng: np.random.Generator, length: float, spacing: float) -> np.ndarray:
    """Random positions along [0, length] about `spacing` apart."""
    n = max(int(length / spacing), 1)
    return np.sort(rng.uniform(0, length, n))

