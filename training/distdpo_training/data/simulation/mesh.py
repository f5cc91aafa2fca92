"""Triangle meshes with per-face attributes, and the primitives the procedural world is made of.

Every face carries what the ray caster needs to turn a hit into a LiDAR point: its SemanticKITTI
class, an instance id, a base reflectivity and a material (which decides range noise, dropout and
foliage or window effects, see :mod:`materials`). Parts are collected in a :class:`MeshBuilder`
and concatenated once, so one RaycastingScene holds a whole street and a primitive id from a hit
indexes the attribute arrays directly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Unit cube [0, 1]^3, outward-facing triangles (counter-clockwise seen from outside).
_CUBE_V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0],
                    [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], np.float64)
_CUBE_F = np.array([[0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4],
                    [1, 2, 6], [1, 6, 5], [2, 3, 7], [2, 7, 6], [3, 0, 4], [3, 4, 7]], np.int64)


def _icosphere() -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere subdivided once: 42 vertices, 80 faces (a cheap round blob)."""
    g = (1 + 5 ** 0.5) / 2
    v = [[-1, g, 0], [1, g, 0], [-1, -g, 0], [1, -g, 0], [0, -1, g], [0, 1, g], [0, -1, -g],
         [0, 1, -g], [g, 0, -1], [g, 0, 1], [-g, 0, -1], [-g, 0, 1]]
    f = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
         [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
         [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]]
    verts = [np.array(p, np.float64) / np.linalg.norm(p) for p in v]
    mid: dict[tuple[int, int], int] = {}

    def midpoint(a: int, b: int) -> int:
        key = (min(a, b), max(a, b))
        if key not in mid:
            m = verts[a] + verts[b]
            verts.append(m / np.linalg.norm(m))
            mid[key] = len(verts) - 1
        return mid[key]

    faces = []
    for a, b, c in f:
        ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
        faces += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
    return np.array(verts), np.array(faces, np.int64)


_SPHERE_V, _SPHERE_F = _icosphere()


def yaw_matrix(yaw: float) -> np.ndarray:
    """Rotation about +z by `yaw` radians."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclasses.dataclass
class Mesh:
    """Vertices (V, 3) float32, faces (F, 3) int32 and one attribute value per face."""

    vertices: np.ndarray
    faces: np.ndarray
    label: np.ndarray      # (F,) uint16 SemanticKITTI semantic class
    instance: np.ndarray   # (F,) uint16 instance id (0 = stuff)
    rho: np.ndarray        # (F,) float32 base reflectivity in [0, 1]
    material: np.ndarray   # (F,) uint8 material id (materials.MATERIALS)
    owner: np.ndarray      # (F,) int32 index of the object that owns the face (-1 = none)

    @property
    def n_faces(self) -> int:
        return len(self.faces)


class MeshBuilder:
    """Collects parts (vertices in world coordinates, faces, attributes) into one Mesh."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, ...]] = []

    def add(self, vertices: np.ndarray, faces: np.ndarray, label: int, material: int,
            rho: float, instance: int = 0, owner: int = -1) -> None:
        """Add a part whose `faces` index its own `vertices`; one attribute value for all faces."""
        n = len(faces)
        self.add_attributed(vertices, faces, np.full(n, label), np.full(n, material),
                            np.full(n, rho), np.full(n, instance), np.full(n, owner))

    def add_attributed(self, vertices: np.ndarray, faces: np.ndarray, label: np.ndarray,
                       material: np.ndarray, rho: np.ndarray, instance: np.ndarray | None = None,
                       owner: np.ndarray | None = None) -> None:
        """Add a part with one attribute value per face."""
        n = len(faces)
        self._parts.append((
            np.asarray(vertices, np.float64), np.asarray(faces, np.int64),
            np.asarray(label, np.uint16), np.zeros(n, np.uint16) if instance is None
            else np.asarray(instance, np.uint16), np.asarray(rho, np.float32),
            np.asarray(material, np.uint8),
            np.full(n, -1, np.int32) if owner is None else np.asarray(owner, np.int32)))

    def box(self, center_bottom: np.ndarray, size: tuple[float, float, float],
            rotation: np.ndarray, label: int, material: int, rho: float, instance: int = 0,
            owner: int = -1) -> None:
        """A box of `size` (length along local x, width along y, height), rotated about its
        bottom-face centre `center_bottom`."""
        local = (_CUBE_V - [0.5, 0.5, 0.0]) * np.asarray(size, np.float64)
        self.add(local @ rotation.T + center_bottom, _CUBE_F, label, material, rho, instance,
                 owner)

    def prism(self, center_bottom: np.ndarray, radius: float, height: float, sides: int,
              label: int, material: int, rho: float, instance: int = 0, owner: int = -1,
              radius_top: float | None = None) -> None:
        """An open-bottom prism with `sides` faces approximating a (tapered) vertical cylinder."""
        a = np.linspace(0, 2 * np.pi, sides, endpoint=False)
        rt = radius if radius_top is None else radius_top
        ring = np.stack([np.cos(a), np.sin(a)], 1)
        bottom = np.column_stack([ring * radius, np.zeros(sides)])
        top = np.column_stack([ring * rt, np.full(sides, height)])
        verts = np.vstack([bottom, top, [[0.0, 0.0, height]]]) + center_bottom
        i = np.arange(sides)
        j = (i + 1) % sides
        walls = np.concatenate([np.stack([i, j, j + sides], 1),
                                np.stack([i, j + sides, i + sides], 1)])
        cap = np.stack([np.full(sides, 2 * sides), i + sides, j + sides], 1)
        self.add(verts, np.concatenate([walls, cap]), label, material, rho, instance, owner)

    def blob(self, center: np.ndarray, radii: tuple[float, float, float], roughness: float,
             rng: np.random.Generator, label: int, material: int, rho: float,
             instance: int = 0, owner: int = -1) -> None:
        """An irregular ellipsoid (tree crown, bush): an icosphere with random radial bumps."""
        bumps = 1.0 + roughness * rng.uniform(-1.0, 1.0, len(_SPHERE_V))
        verts = _SPHERE_V * bumps[:, None] * np.asarray(radii) + center
        self.add(verts, _SPHERE_F, label, material, rho, instance, owner)

    def gable_roof(self, center_bottom: np.ndarray, length: float, width: float, height: float,
                   rotation: np.ndarray, label: int, material: int, rho: float,
                   owner: int = -1) -> None:
        """A gable roof (triangular prism, ridge along local x) sitting on `center_bottom`."""
        hl, hw = length / 2, width / 2
        local = np.array([[-hl, -hw, 0], [hl, -hw, 0], [hl, hw, 0], [-hl, hw, 0],
                          [-hl, 0, height], [hl, 0, height]], np.float64)
        faces = np.array([[0, 1, 5], [0, 5, 4], [2, 3, 4], [2, 4, 5], [1, 2, 5], [3, 0, 4]])
        self.add(local @ rotation.T + center_bottom, faces, label, material, rho, 0, owner)

    def build(self) -> Mesh:
        """Concatenate all parts into one Mesh (no parts gives an empty Mesh)."""
        if not self._parts:
            return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32),
                        np.zeros(0, np.uint16), np.zeros(0, np.uint16), np.zeros(0, np.float32),
                        np.zeros(0, np.uint8), np.zeros(0, np.int32))
        offsets = np.cumsum([0] + [len(p[0]) for p in self._parts[:-1]])
        faces = np.concatenate([p[1] + o for p, o in zip(self._parts, offsets, strict=True)])
        columns = [np.concatenate([p[k] for p in self._parts]) for k in range(2, 7)]
        return Mesh(np.concatenate([p[0] for p in self._parts]).astype(np.float32),
                    faces.astype(np.int32), *columns)
