"""A Velodyne HDL-64E as mounted on the KITTI car, ray-cast with open3d's RaycastingScene.

Beam pattern: the 64 ring elevations measured on a real KITTI scan (sequence 00, frame 0; +2.5 deg
down to -23.5 deg, 1/3 deg apart in the upper block and 1/2 deg in the lower), 2,048 azimuth
steps per revolution (10 Hz), each ring with its own small azimuth offset like the real lasers.
The sensor sits 1.73 m above the road. Returns: 80 m range cut, 1.3 m minimum range, rays blocked
by the car's own roof removed, Gaussian range noise of 2 cm (plus material noise, foliage
penetration and window panes that let the beam into the room or lose it), random dropout, and a
remission that depends on the surface reflectivity, the incidence angle, the range and the laser
(per-ring gains measured on real KITTI scans).

The static world is one RaycastingScene built once per sequence; moving agents are a second, small
scene rebuilt every frame and only the rays that can reach them are cast against it.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from distdpo_training.data.simulation import materials as M
from distdpo_training.data.simulation.mesh import Mesh

# Ring elevations (deg), top to bottom: the per-ring medians measured on KITTI sequence 00 frame 0
# (the first 64 segments of ../shared/data/sensor/kitti_seq00_000000_ring_elevations_deg.txt; the
# 65th segment there is the lowest ring's other half, split at the scan start).
ELEVATIONS_DEG = np.array([
    2.503, 2.413, 2.083, 1.727, 1.366, 1.029, 0.678, 0.375, 0.004, -0.389, -0.717, -1.038,
    -1.426, -1.772, -2.104, -2.462, -2.763, -3.130, -3.439, -3.775, -4.111, -4.435, -4.748,
    -5.048, -5.405, -5.757, -6.081, -6.363, -6.700, -7.060, -7.322, -7.661, -8.198, -8.737,
    -9.222, -9.659, -10.085, -10.619, -11.166, -11.618, -12.054, -12.485, -12.982, -13.482,
    -14.028, -14.524, -14.987, -15.421, -15.930, -16.534, -17.073, -17.598, -18.115, -18.541,
    -18.961, -19.479, -20.008, -20.500, -21.060, -21.511, -21.899, -22.462, -23.011, -23.530])
N_RINGS = len(ELEVATIONS_DEG)
# Remission gain of each laser relative to the others: per-ring median remission over the median
# of all rings, averaged over four real KITTI scans (sequence 00 frames 94, 95, 198, 199); the
# lasers of an HDL-64E differ, some read much darker (rings 21, 35, 36, 42, 51).
RING_GAIN = np.array([
    1.22, 1.09, 1.02, 0.90, 1.13, 1.02, 1.24, 1.05, 1.20, 0.96, 1.12, 1.15, 1.20, 1.10, 1.01,
    1.05, 1.07, 1.05, 1.17, 0.89, 1.06, 0.62, 1.06, 1.06, 0.93, 0.97, 1.04, 1.03, 1.03, 0.77,
    1.02, 1.05, 0.93, 0.88, 0.95, 0.66, 0.46, 0.95, 1.12, 1.06, 0.88, 0.97, 0.62, 0.97, 0.97,
    0.97, 0.98, 0.90, 0.82, 1.00, 1.11, 0.36, 0.93, 0.81, 0.77, 0.93, 1.00, 1.11, 0.73, 0.80,
    0.73, 1.00, 1.14, 1.10], np.float32)
N_AZIMUTH = 2048
SCAN_PERIOD = 0.1           # s per revolution (10 Hz)
SENSOR_HEIGHT = 1.73        # m above the road
MAX_RANGE = 80.0
MIN_RANGE = 1.3
RANGE_NOISE = 0.02
DROPOUT = 0.004             # chance that any return is lost
# The ego car's roof below the sensor: a flat footprint EGO_DEPTH below it, a half ellipse ahead
# (semi-axes forward, sideways) and a wider one behind. Rays that reach the roof plane inside it
# never return. Fitted to the sectors missing from the lowest rings of real KITTI scans (lowest
# ring: about +-20 deg ahead and +-40 deg behind; rings above -19 deg: free).
EGO_DEPTH = 0.5
EGO_AHEAD = (1.35, 0.66)
EGO_BEHIND = (1.55, 1.0)


# Per-material tables: chance of losing a return, range noise (sensor + material).
_LOSS = (DROPOUT + M.MAT_DROPOUT).astype(np.float32)
_SIGMA = np.sqrt(RANGE_NOISE ** 2 + M.MAT_NOISE ** 2).astype(np.float32)
REMISSION_GAIN = 1.4     # KITTI remission per unit of surface reflectivity at normal incidence
_WEAK = 0.04    # echoes weaker than this may be lost: P = 0.4 exp(-150 signal)


@dataclasses.dataclass
class Scan:
    """One revolution: points (N, 4) float32 x y z remission in the sensor frame, SemanticKITTI
    labels (N,) uint32, ring (N,) uint16 (0 = top), time (N,) float32 s from the scan start."""

    points: np.ndarray
    labels: np.ndarray
    ring: np.ndarray
    time: np.ndarray


def _ring_offsets() -> np.ndarray:
    """A fixed, well-spread fraction of an azimuth step per ring (golden-ratio sequence)."""
    return (np.arange(N_RINGS) * 0.6180339887) % 1.0


def ray_grid(n_azimuth: int = N_AZIMUTH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit directions (R*A, 3) in ring-major order (ring 0 = top, azimuth counter-clockwise from
    +x), with ring index and azimuth index per ray."""
    el = np.radians(ELEVATIONS_DEG)[:, None]
    step = 2 * np.pi / n_azimuth
    az = (np.arange(n_azimuth)[None, :] + _ring_offsets()[:, None]) * step
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                  np.broadcast_to(np.sin(el), az.shape)], -1)
    ring, azi = np.meshgrid(np.arange(N_RINGS), np.arange(n_azimuth), indexing='ij')
    return d.reshape(-1, 3), ring.ravel(), azi.ravel()


def _blocked_by_ego(directions: np.ndarray) -> np.ndarray:
    """Rays from the sensor origin that reach the ego roof plane inside the roof footprint."""
    down = directions[:, 2] < -1e-6
    reach = EGO_DEPTH / np.maximum(-directions[:, 2], 1e-6)      # ray length to the roof plane
    x, y = directions[:, 0] * reach, directions[:, 1] * reach
    a = np.where(x >= 0, EGO_AHEAD[0], EGO_BEHIND[0])
    b = np.where(x >= 0, EGO_AHEAD[1], EGO_BEHIND[1])
    return down & ((x / a) ** 2 + (y / b) ** 2 < 1.0)


class HDL64E:
    """Casts one revolution against a static scene plus moving agents and models the returns.

    `scan` may run in several threads at once (open3d releases the GIL while casting)."""

    def __init__(self, static: Mesh, facades: np.ndarray, n_azimuth: int = N_AZIMUTH) -> None:
        import open3d as o3d

        self._o3d = o3d
        directions, ring, azimuth = ray_grid(n_azimuth)
        keep = ~_blocked_by_ego(directions)
        self.directions = directions[keep].astype(np.float32)
        self._columns = np.ascontiguousarray(self.directions.T)    # (3, N) for fast gathers
        self.ring = ring[keep].astype(np.uint16)
        self.time = (azimuth[keep] * (SCAN_PERIOD / n_azimuth)).astype(np.float32)
        self.ring_azimuth = ring[keep] * n_azimuth + azimuth[keep]
        self.n_azimuth = n_azimuth
        self.n_rays = n_azimuth * N_RINGS            # every firing, blocked ones included
        self.static = static
        self.facades = facades
        self._static_scene = self._scene(static.vertices, static.faces)
        self._static_scene.cast_rays(self._o3d.core.Tensor(np.zeros((1, 6), np.float32)))
        # Seconds spent per stage over all scans: static cast, agent scene + cast, returns.
        self.timings = {'cast_static': 0.0, 'cast_agents': 0.0, 'returns': 0.0}
        self._lock = threading.Lock()

    def _scene(self, vertices: np.ndarray, faces: np.ndarray):
        scene = self._o3d.t.geometry.RaycastingScene()
        if len(faces):
            scene.add_triangles(self._o3d.core.Tensor(np.ascontiguousarray(vertices, np.float32)),
                                self._o3d.core.Tensor(np.ascontiguousarray(faces, np.uint32)))
        return scene

    def _cast(self, scene, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ans = scene.cast_rays(self._o3d.core.Tensor(rays))
        return (ans['t_hit'].numpy(), ans['primitive_ids'].numpy(),
                ans['primitive_normals'].numpy())

    def _candidates(self, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
        """Rays (indices into the kept rays) whose direction passes within the bounding spheres
        (sensor frame) of the moving agents."""
        mask = np.zeros((N_RINGS, self.n_azimuth), bool)
        el = np.radians(ELEVATIONS_DEG)
        dist = np.linalg.norm(centers, axis=1)
        for c, r, dd in zip(centers, radii, dist, strict=True):
            if dd > MAX_RANGE + r:
                continue
            if dd <= r * 1.05:
                mask[:] = True
                break
            spread = np.arcsin(min(r / dd, 1.0))
            elc = np.arcsin(c[2] / dd)
            rings = (el >= elc - spread) & (el <= elc + spread)
            azc = np.arctan2(c[1], c[0]) % (2 * np.pi)
            half = spread / np.cos(min(abs(elc) + spread, 1.5))
            lo = int(np.floor((azc - half) / (2 * np.pi) * self.n_azimuth)) - 1
            hi = int(np.ceil((azc + half) / (2 * np.pi) * self.n_azimuth)) + 1
            mask[np.ix_(rings, np.arange(lo, hi + 1) % self.n_azimuth)] = True
        return np.flatnonzero(mask.ravel()[self.ring_azimuth])

    def scan(self, pose: np.ndarray, rng: np.random.Generator, agents: Mesh | None = None,
             agent_centers: np.ndarray | None = None, agent_radii: np.ndarray | None = None
             ) -> Scan:
        """One revolution from the sensor at `pose` (4x4, sensor to world). `agents` is the
        moving agents' mesh in world coordinates; their bounding spheres (world centres, radii)
        select the rays cast against it."""
        tic = time.perf_counter()
        rot, origin = pose[:3, :3].astype(np.float32), pose[:3, 3]
        rays = np.empty((len(self.directions), 6), np.float32)
        rays[:, :3] = origin
        # einsum: numpy's BLAS matmul is far slower on (N, 3) x (3, 3) with busy cores.
        np.einsum('nj,ij->ni', self.directions, rot, out=rays[:, 3:])
        t_hit, prim, normal = self._cast(self._static_scene, rays)
        tic = self._tick('cast_static', tic)
        rows = prim_a = None
        if agents is not None and agents.n_faces and agent_centers is not None:
            cand = self._candidates(np.einsum('nj,ji->ni', agent_centers - origin, rot),
                                    agent_radii)
            if len(cand):
                t_a, prim_a, normal_a = self._cast(self._scene(agents.vertices, agents.faces),
                                                   rays[cand])
                closer = t_a < t_hit[cand]
                rows, prim_a = cand[closer], prim_a[closer]
                t_hit[rows], normal[rows] = t_a[closer], normal_a[closer]
                prim[rows] = 0
        tic = self._tick('cast_agents', tic)
        incidence = np.abs(np.einsum('ni,ni->n', normal, rays[:, 3:]))
        idx = np.flatnonzero(t_hit <= MAX_RANGE + 0.5)          # misses are inf
        face = prim[idx]
        attrs = [a[face] for a in (self.static.label, self.static.instance, self.static.rho,
                                   self.static.material, self.static.owner)]
        if rows is not None:
            in_range = t_hit[rows] <= MAX_RANGE + 0.5
            rows, prim_a = rows[in_range], prim_a[in_range]
        if rows is not None and len(rows):
            mine = np.searchsorted(idx, rows)             # rows are in idx: sorted, in range
            for column, values in zip(attrs, (agents.label, agents.instance, agents.rho,
                                               agents.material), strict=False):
                column[mine] = values[prim_a]
            attrs[4][mine] = -1
        scan = self._returns(idx, t_hit[idx], incidence[idx], rays, normal, origin, *attrs,
                             rng=rng)
        self._tick('returns', tic)
        return scan

    def _tick(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.timings[stage] += now - since
        return now

    def _returns(self, idx: np.ndarray, t: np.ndarray, incidence: np.ndarray, rays: np.ndarray,
                 normal: np.ndarray, origin: np.ndarray, label: np.ndarray, inst: np.ndarray,
                 rho: np.ndarray, mat: np.ndarray, owner: np.ndarray,
                 rng: np.random.Generator) -> Scan:
        """Turn the hits of rays `idx` (range `t`, |cos| of the incidence angle, face attributes;
        all rays and normals for the few that need geometry) into measured returns: windows,
        foliage, noise, dropout, remission."""
        n = len(idx)
        u = rng.random((3, n), dtype=np.float32)      # dropout, weak echo, speckle
        keep = u[0] >= _LOSS[mat]
        # Window panes: the beam goes into the room (a return behind the facade) or is lost.
        facade = np.flatnonzero(M.MAT_WINDOWS[mat])
        if len(facade):
            rows = idx[facade]
            f = facade[self._in_window(t[facade], rays[rows, 3:], normal[rows], origin,
                                       owner[facade])]
            v = rng.random((2, len(f)), dtype=np.float32)
            keep[f] &= v[0] >= 0.15                                # 15 % lost
            inside = f[v[0] >= 0.6]                                # 40 % from inside the room
            t[inside] += 0.1 - 0.6 * np.log1p(-0.99 * v[1, v[0] >= 0.6])
            rho[f] = 0.08                                          # the rest: off the glass
        # Foliage and glass: pulses end somewhere inside the crown or the car.
        depth = M.MAT_DEPTH[mat]
        porous = np.flatnonzero(depth)
        t[porous] += rng.standard_exponential(len(porous), dtype=np.float32) * depth[porous]
        t += rng.standard_normal(n, dtype=np.float32) * _SIGMA[mat]
        # Echo strength: reflectivity and incidence; weak (dark, grazing, far) echoes get lost.
        strength = rho * (0.6 + 0.4 * incidence)
        signal = strength * np.minimum(1.0, np.square(30.0 / t))
        weak = np.flatnonzero(signal < _WEAK)
        keep[weak] &= u[1, weak] >= 0.4 * np.exp(-150.0 * signal[weak])
        keep &= (t >= MIN_RANGE) & (t <= MAX_RANGE)
        ok = np.flatnonzero(keep)
        idx, t = idx[ok], t[ok]
        points = np.empty((len(ok), 4), np.float32)
        for k in range(3):
            np.multiply(self._columns[k][idx], t, out=points[:, k])
        ring = self.ring[idx]
        points[:, 3] = _remission(strength[ok] * RING_GAIN[ring], t, u[2, ok])
        labels = label[ok].astype(np.uint32) | (inst[ok].astype(np.uint32) << 16)
        return Scan(points, labels, ring, self.time[idx])

    def _in_window(self, t: np.ndarray, dirs: np.ndarray, n: np.ndarray, origin: np.ndarray,
                   owner: np.ndarray) -> np.ndarray:
        """Whether facade hits (range, world direction, normal, building) fall on a window pane
        of their building's window grid."""
        p = origin + dirs * t[:, None]
        horiz = np.hypot(n[:, 0], n[:, 1])
        wall = horiz > 0.7
        tangent = np.stack([-n[:, 1], n[:, 0]], 1) / np.maximum(horiz, 1e-6)[:, None]
        phase, pitch, width, floor, base = self.facades[owner].T
        along = (p[:, 0] * tangent[:, 0] + p[:, 1] * tangent[:, 1] + phase) % pitch
        up = p[:, 2] - base
        in_floor = (up % floor)
        return wall & (up > 0.8) & (along < width) & (in_floor > 0.85) & (in_floor < 2.35)


def _remission(strength: np.ndarray, t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """KITTI-like remission in [0, 1], quantised to 0.01: echo strength with +-30 % speckle,
    fading beyond 25 m to 0 at 60-80 m (as in KITTI, where most returns past 60 m read 0)."""
    value = REMISSION_GAIN * strength * (0.7 + 0.6 * u)
    far = np.flatnonzero(t > 25.0)
    value[far] *= np.exp(-np.square((t[far] - 25.0) / 20.0))
    return np.clip(np.round(value - 0.015, 2), 0.0, 0.99)
