"""Simulated drives: the ego trajectory, the frame loop and writing SemanticKITTI folders and bags.

One sequence = one procedural world (urban or suburban, built once), an ego vehicle driving along
its main street in the right lane with a varying speed (cruise speeds that change every few
seconds, slowing for curves, now and then stopping), moving traffic, and one HDL-64E scan every
0.1 s. Frames are :class:`distdpo_training.data.kitti.Frame` objects; they are written with the
project's SemanticKITTI writer (poses in the KITTI camera convention with the real KITTI `Tr`) and,
with `bag`, its rosbag2 writer at the same time.

Everything is drawn from numpy generators seeded by (seed, sequence) for the world and by
(seed, sequence, frame) for sensor noise, so a sequence is the same whatever else is simulated.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from distdpo_ros.errors import UserError
from distdpo_ros.validation import check_seed
from distdpo_training.data.frames import Frame
from distdpo_training.data.kitti import KittiWriter
from distdpo_training.data.simulation.agents import Agents, build_agents
from distdpo_training.data.simulation.mesh import Mesh
from distdpo_training.data.simulation.scene import Street, World, build_world, plan_street
from distdpo_training.data.simulation.sensor import HDL64E, MAX_RANGE, SCAN_PERIOD, SENSOR_HEIGHT

# Velodyne -> camera 0 of KITTI odometry sequence 00 (calib.txt `Tr`), so that simulated
# poses.txt files use the same convention as real ones: T_velo = inv(Tr) @ P_cam @ Tr.
KITTI_TR = np.array([
    [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02],
    [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02],
    [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01],
    [0.0, 0.0, 0.0, 1.0]])
START_S = 90.0          # m of street behind the first frame
END_MARGIN = 100.0      # m of street ahead of the last frame
MAX_SPEED = 13.0        # m/s
AGENT_REACH = MAX_RANGE + 10.0
_TIMING_LOCK = threading.Lock()


@dataclasses.dataclass
class EgoTrack:
    """Arc length (F,) and speed (F,) of the ego vehicle along the main street, per frame."""

    s: np.ndarray
    speed: np.ndarray


def ego_track(rng: np.random.Generator, street: Street, urban: bool, frames: int) -> EgoTrack:
    """Drive the street: cruise targets changing every 4-12 s, curve speed limits with a look-
    ahead, gentle acceleration limits, and an occasional stop of a few seconds."""
    line = street.line
    cruise = (5.0, 11.0) if urban else (7.0, MAX_SPEED)
    s, v = START_S, rng.uniform(*cruise)
    target, until = v, 0.0
    out_s, out_v = np.empty(frames), np.empty(frames)
    for f in range(frames):
        t = f * SCAN_PERIOD
        if t >= until:
            stop = rng.random() < 0.12
            target = 0.0 if stop else rng.uniform(*cruise)
            until = t + (rng.uniform(2, 6) if stop else rng.uniform(4, 12))
        ahead = s + np.linspace(0, max(v, 3.0) * 3.0, 8)
        limit = np.sqrt(2.0 / np.maximum(np.abs(line.curvature_at(ahead)).max(), 1e-4))
        goal = min(target, limit)
        accel = np.clip((goal - v) / 1.5, -2.5, 1.5)
        out_s[f], out_v[f] = s, v
        v = max(v + accel * SCAN_PERIOD, 0.0)
        s += v * SCAN_PERIOD
    return EgoTrack(out_s, out_v)


def sensor_pose(street: Street, s: float, lateral: float) -> np.ndarray:
    """4x4 sensor-to-world pose of the LiDAR 1.73 m above the lane at arc length `s`, its axes
    following the road (x forward along the lane, z along the road's normal)."""
    xy, heading = street.line.place(s, lateral)
    ground = float(street.ground(xy)[0])
    grad = street.elevation.gradient(xy)[0]
    up = np.array([-grad[0], -grad[1], 1.0])
    up /= np.linalg.norm(up)
    forward = np.array([np.cos(heading[0]), np.sin(heading[0]), 0.0])
    forward -= up * (forward @ up)
    forward /= np.linalg.norm(forward)
    pose = np.eye(4)
    pose[:3, :3] = np.column_stack([forward, np.cross(up, forward), up])
    pose[:3, 3] = [xy[0, 0], xy[0, 1], ground] + up * SENSOR_HEIGHT
    return pose


@dataclasses.dataclass
class Sequence:
    """A simulated sequence ready to render frame by frame."""

    world: World
    ego: EgoTrack
    agents: Agents
    poses: np.ndarray          # (F, 4, 4) sensor -> world
    sensor: HDL64E
    seed: int
    index: int
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ego.s)

    def agent_mesh(self, frame: int) -> tuple[Mesh, np.ndarray, np.ndarray]:
        """The agents near the sensor at `frame`, in world coordinates, with bounding spheres."""
        agents = self.agents
        rot, trans, present = agents.poses(self.world.street, frame)
        centers = np.einsum('nij,nj->ni', rot, agents.centers) + trans
        near = present & (np.linalg.norm(centers - self.poses[frame, :3, 3], axis=1)
                          < AGENT_REACH)
        mesh = agents.mesh
        faces = near[mesh.owner]
        vertices = agents.world_vertices(rot, trans)
        sub = Mesh(vertices, mesh.faces[faces], mesh.label[faces], mesh.instance[faces],
                   mesh.rho[faces], mesh.material[faces], mesh.owner[faces])
        return sub, centers[near], agents.radii[near]

    def frame(self, f: int) -> Frame:
        """Render frame `f` (pose relative to the first frame, like KITTI's poses.txt)."""
        tic = time.perf_counter()
        mesh, centers, radii = self.agent_mesh(f)
        self._add_time('agents', tic)
        rng = np.random.default_rng([self.seed, self.index, f, 1])
        scan = self.sensor.scan(self.poses[f], rng, mesh, centers, radii)
        pose = np.linalg.solve(self.poses[0], self.poses[f])
        return Frame(index=f, stamp_ns=f * int(SCAN_PERIOD * 1e9), points=scan.points,
                     pose=pose, labels=scan.labels, extra={'ring': scan.ring, 'time': scan.time})

    def _add_time(self, stage: str, since: float) -> None:
        with _TIMING_LOCK:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - since

    def frames(self, workers: int = 2) -> Iterator[Frame]:
        """All frames in order, rendered `workers` at a time in threads (open3d casts without
        the GIL, so one frame's ray casting overlaps another's numpy work and the caller's
        writing). The result does not depend on `workers`."""
        if workers <= 1:
            for f in range(len(self)):
                yield self.frame(f)
            return
        with ThreadPoolExecutor(workers) as pool:
            pending = deque(pool.submit(self.frame, f) for f in range(min(workers + 1, len(self))))
            for f in range(len(pending), len(self) + len(pending)):
                frame = pending.popleft().result()
                if f < len(self):
                    pending.append(pool.submit(self.frame, f))
                yield frame


def _check_sizes(frames: int, seed: int) -> None:
    if frames < 1:
        raise UserError(f'--frames must be at least 1, got {frames}')
    check_seed(seed)


def make_sequence(seed: int, index: int, frames: int, urban: bool | None = None,
                  n_azimuth: int | None = None) -> Sequence:
    """Build world, ego track, traffic and sensor of sequence `index` (style from the seed
    unless `urban` is given)."""
    _check_sizes(frames, seed)
    rng = np.random.default_rng([seed, index, 0])
    urban = bool(rng.random() < 0.5) if urban is None else urban
    timings = {}
    tic = time.perf_counter()
    # Plan a street long enough at top speed, drive it, then build only what the drive sees.
    street = plan_street(rng, START_S + frames * SCAN_PERIOD * MAX_SPEED + END_MARGIN, urban)
    ego = ego_track(rng, street, urban, frames)
    world = build_world(rng, street, urban, length=ego.s[-1] + END_MARGIN)
    agents = build_agents(rng, street, ego.s, ego.speed, street.ego_lane, SCAN_PERIOD,
                          world.instances)
    poses = np.stack([sensor_pose(street, s, street.ego_lane) for s in ego.s])
    timings['world'] = time.perf_counter() - tic
    tic = time.perf_counter()
    kwargs = {} if n_azimuth is None else {'n_azimuth': n_azimuth}
    sensor = HDL64E(world.static, world.facades, **kwargs)
    timings['static_scene'] = time.perf_counter() - tic
    return Sequence(world, ego, agents, poses, sensor, seed, index, timings)


def write_simulated(seq: Sequence, folder: str | os.PathLike,
                    bag_path: str | os.PathLike | None = None, overwrite: bool = False,
                    on_frame: Callable[[Frame], object] | None = None) -> None:
    """Render every frame of `seq` into a SemanticKITTI sequence folder (poses in the KITTI
    camera convention with KITTI's Tr) and, with `bag_path`, a rosbag2 (MCAP) at the same time.
    `on_frame` is called with every frame written; time spent writing goes to
    `seq.timings['write']`."""
    with KittiWriter(folder, tr=KITTI_TR, overwrite=overwrite) as writer:
        def written() -> Iterator[Frame]:
            for frame in seq.frames():
                tic = time.perf_counter()
                writer.write(frame)
                seq._add_time('write', tic)
                if on_frame is not None:
                    on_frame(frame)
                yield frame

        if bag_path is None:
            for _ in written():
                pass
        else:
            from distdpo_training.data.bags import write_sequence_bag

            write_sequence_bag(bag_path, written())


def simulate_dataset(out: str | os.PathLike, sequences: int = 1, frames: int = 50,
                     seed: int = 0, bag: bool = False, first: int = 0,
                     overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Simulate `sequences` drives of `frames` scans into OUT/sequences/SS (SS from `first`);
    with `bag` also OUT/bags/SS (rosbag2, MCAP). Returns the sequence folders."""
    from tqdm import tqdm

    _check_sizes(frames, seed)
    if sequences < 1:
        raise UserError(f'--sequences must be at least 1, got {sequences}')
    if first < 0 or first + sequences > 100:
        raise UserError(f'sequence numbers {first}..{first + sequences - 1} do not fit in 00..99')
    out = Path(out)
    folders = []
    bar = tqdm(total=sequences * frames, unit='scan', desc='simulate', disable=not progress,
               dynamic_ncols=True)
    try:
        for k in range(first, first + sequences):
            name = f'{k:02d}'
            bag_path = out / 'bags' / name
            if bag and bag_path.exists():
                if not overwrite:
                    raise UserError(f'{bag_path}: already exists; use --overwrite or a new OUT')
                shutil.rmtree(bag_path)
            bar.set_postfix_str(f'sequence {name}: building the world')
            seq = make_sequence(seed, k, frames)
            bar.set_postfix_str(f'sequence {name} ({"urban" if seq.world.urban else "suburban"})')
            folder = out / 'sequences' / name
            write_simulated(seq, folder, bag_path if bag else None, overwrite,
                            on_frame=lambda _: bar.update(1))
            folders.append(folder)
    finally:
        bar.close()
    return folders
