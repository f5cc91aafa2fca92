"""Speed of the simulator, measured: scans per second of `distdpo simulate` and where time goes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from distdpo_training.data.simulation.drive import make_sequence, write_simulated


def bench_simulate(workdir: str | os.PathLike, frames: int = 100, seed: int = 0,
                   sequences: int = 2) -> dict:
    """Simulate `sequences` drives of `frames` scans into `workdir` (as `distdpo simulate`
    does, SemanticKITTI files included) and report scans per second end to end, per scan once
    the world exists, the CPU time per scan (all threads; it does not depend on how busy the
    machine is the way wall time does), and the milliseconds per scan of each stage. Stage times
    are wall times summed over the two render threads, which overlap."""
    tic = time.perf_counter()
    import open3d  # noqa: F401  (a one-off cost of every run, reported apart)

    import_s = time.perf_counter() - tic
    stages: dict[str, float] = {}
    points = []
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    total_start = time.perf_counter()
    cpu_start = time.process_time()
    for index in range(sequences):
        seq = make_sequence(seed, index, frames)
        folder = Path(workdir) / 'bench-simulate' / 'sequences' / f'{index:02d}'
        write_simulated(seq, folder, overwrite=True,
                        on_frame=lambda frame: points.append(len(frame.points)))
        for stage, seconds in {**seq.timings, **seq.sensor.timings}.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    total = time.perf_counter() - total_start
    cpu = time.process_time() - cpu_start
    scans = sequences * frames
    setup = stages['world'] + stages['static_scene']
    per_scan = (total - setup) / scans
    return {
        'sequences': sequences, 'frames': frames, 'seed': seed,
        'cpu_threads': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
        else os.cpu_count(),
        'load_average_at_start': None if load is None else round(load, 2),
        'points_per_scan': round(float(np.mean(points))),
        'scans_per_s': round(scans / total, 2),
        'scans_per_s_after_world_build': round(1.0 / per_scan, 2),
        'open3d_import_s': round(import_s, 3),
        'world_build_s_per_sequence': round(stages['world'] / sequences, 3),
        'static_scene_build_s_per_sequence': round(stages['static_scene'] / sequences, 3),
        'ms_per_scan': {
            stage: round(stages[stage] / scans * 1000, 2)
            for stage in ('agents', 'cast_static', 'cast_agents', 'returns', 'write')},
        'ms_per_scan_total': round(per_scan * 1000, 2),
        'cpu_ms_per_scan_all_included': round(cpu / scans * 1000, 2),
    }
