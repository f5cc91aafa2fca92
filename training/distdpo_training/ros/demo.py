"""The out-of-the-box demo: a simulated drive through the completion node, scored and drawn.

`run_demo` does the product's main job end to end on one machine, offline:

1. simulate a short HDL-64E drive (SemanticKITTI layout + a rosbag2, :mod:`.simulation`);
2. build its static ground-truth map (:mod:`.maps`, what `distdpo build-maps` does);
3. replay the bag through the `distdpo_completion` node over DDS, one scan at a time, and record
   the completed clouds into a new bag (:mod:`.replay`, what `distdpo replay --lockstep --record`
   does), timing each scan from publishing it to receiving its completion;
4. score every recorded completion against the ground truth (CD, F-score, JSD, ...);
5. draw a Fig.-1-style picture of one scan: input, ground truth, the node's completion (and the
   teacher's, when the model came with one) (:mod:`.render`);

then writes ``summary.json`` and returns the summary for the caller to print.

The output folder is marked as the demo's own (``.distdpo-demo``), so that a re-run may replace the
previous run's outputs there and a folder holding anything else is never touched; it is locked for
the whole run, so a second demo on the same folder is refused instead of removing the first's
drive.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros import checkpoint as ckpt
from distdpo_ros.errors import UserError
from distdpo_ros.settings import SamplingSettings
from distdpo_ros.validation import check_seed
from distdpo_training.engine.runlock import LOCK_FILE, RunLock
from distdpo_training.evaluation.baselines import BASELINES, SHORT

MARKER = '.distdpo-demo'
DRIVE_DIR = 'drive'  # the simulated dataset (sequences/00, bags/00); removed unless keep
RECORD_DIR = 'completed'  # the recorded bag of completed clouds
SUMMARY_FILE = 'summary.json'
PICTURE_FILE = 'demo.png'
SEQUENCE = '00'
STAGES = 5
NODE_WAIT = 600.0  # seconds a node in another process may take for one scan
QUALITY_KEYS = ('cd', 'fscore', 'precision', 'recall', 'jsd', 'jsd_3d', 'emd')
INPUT_LABELS = {SHORT[name]: name for name in BASELINES}  # the input baselines, by short name
INPUT_NAMES = tuple(INPUT_LABELS)


@dataclass
class DemoOptions:
    """What `distdpo demo` does; see distdpo_training/commands/demo.py for the meaning of each."""

    out: Path = Path('demo_out')
    frames: int = 12
    model: str = 'default'
    teacher: str = 'auto'
    steps: int = 0
    device: str = 'auto'
    seed: int = 0
    separate_process: bool = False
    keep: bool = False


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def resolve_demo_model(name: str, flag: str = '--model') -> Path:
    """The checkpoint directory of `--model`, with a demo-specific line for a missing default."""
    if name in ckpt.DEFAULT_MODELS:
        shipped = ckpt.DEFAULT_MODELS_DIR / ckpt.DEFAULT_MODELS[name]
        if not (shipped / ckpt.CONFIG_FILE).is_file():
            raise UserError(f'the default model {name!r} is missing ({shipped} is not installed);'
                            f' pass a checkpoint directory with {flag} DIR')
    return ckpt.resolve_model(name).resolve()


def resolve_teacher(teacher: str, model: str) -> Path | None:
    """`--teacher`: none, a checkpoint directory, or auto (the shipped teacher, only when the
    model is the shipped default and the teacher is installed next to it)."""
    if teacher == 'none':
        return None
    if teacher == 'auto':
        shipped = ckpt.DEFAULT_MODELS_DIR / ckpt.DEFAULT_MODELS['default-teacher']
        return shipped if model == 'default' and (shipped / ckpt.CONFIG_FILE).is_file() else None
    return resolve_demo_model(teacher, '--teacher')


# --------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------

def prepare_output(out: Path) -> None:
    """In the locked `out`: check that it is new, empty or an earlier demo's, and remove the
    previous run's folders there."""
    if any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f'--out {out}: exists and was not written by `distdpo demo`; choose a '
                        'new or empty folder')
    (out / MARKER).write_text('written by `distdpo demo`; its outputs here are replaced on '
                              'the next run\n', encoding='utf-8')
    for name in (DRIVE_DIR, RECORD_DIR):
        shutil.rmtree(out / name, ignore_errors=True)


def _stage(number: int, text: str) -> None:
    print(f'[{number}/{STAGES}] {text}', file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------

def simulate_drive(out: Path, frames: int, seed: int) -> tuple[Path, Path]:
    """Simulate the drive and build its map: (sequence folder, bag folder)."""
    from tqdm import tqdm

    from distdpo_training.data.kitti import KittiSequence
    from distdpo_training.data.maps import build_map, save_map
    from distdpo_training.data.simulation import simulate_dataset

    drive = out / DRIVE_DIR
    _stage(1, f'simulating a {frames}-scan drive (seed {seed}) into {drive}')
    (folder,) = simulate_dataset(drive, sequences=1, frames=frames, seed=seed, bag=True)
    sequence = KittiSequence(folder)
    _stage(2, 'building its static ground-truth map')
    with tqdm(total=len(sequence), desc=f'map {sequence.name}', unit='scan') as bar:
        points = build_map(sequence, progress=bar.update)
    save_map(sequence, points, voxel=0.1, min_range=3.5)
    return folder, drive / 'bags' / SEQUENCE


def replay_drive(opts: DemoOptions, model_dir: Path, bag: Path, frames: int) -> Any:
    """Replay the bag through the node, one scan at a time, into the recorded bag: the
    ReplayReport (latency and node statistics)."""
    from tqdm import tqdm

    from distdpo_training.ros.replay import ReplayOptions, replay

    where = 'its own process' if opts.separate_process else 'this process'
    _stage(3, f'replaying it through the completion node over DDS (node in {where}), recording '
              f'into {opts.out / RECORD_DIR}')
    replay_opts = ReplayOptions(
        bag=bag, lockstep=True, record=opts.out / RECORD_DIR, model=str(model_dir),
        device=opts.device, steps=opts.steps, seed=opts.seed,
        separate_process=opts.separate_process, wait=NODE_WAIT)
    with tqdm(total=frames, desc='replay', unit='scan') as bar:
        return replay(replay_opts, progress=bar.update)


def score_recording(record: Path, dataset: Path, config: Any
                    ) -> tuple[list[dict[str, Any]], dict[int, np.ndarray]]:
    """Score every completed cloud of the recorded bag against the ground truth: (metrics rows
    by frame, completed xyz by stamp)."""
    from tqdm import tqdm

    from distdpo_ros.node_support import OUTPUT_TOPIC
    from distdpo_training.data.bags import BagFrames
    from distdpo_training.ros.replay import GroundTruth

    completed = list(BagFrames(record, topic=OUTPUT_TOPIC))  # each has stamp_ns and xyz
    _stage(4, f'scoring the {len(completed)} recorded completions against the ground truth')
    with tqdm(total=len(completed), desc='score', unit='scan') as bar:
        rows = GroundTruth(dataset, config).evaluate(completed, progress=bar.update)
    return sorted(rows, key=lambda r: r['frame']), {f.stamp_ns: f.xyz for f in completed}


def complete_with_teacher(teacher_dir: Path, scan: np.ndarray, device: str,
                          seed: int) -> tuple[np.ndarray, int, float]:
    """The teacher's completion of `scan` at its own steps: (points, steps, seconds)."""
    from distdpo_ros.completion import Completer

    completer = Completer.from_pretrained(teacher_dir, device=device)
    print(f'completing it with the teacher {teacher_dir} ({completer.config.steps} steps)',
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    points = completer.complete(scan, seed=seed, progress=True)
    return points, completer.config.steps, time.perf_counter() - started


def draw_picture(opts: DemoOptions, folder: Path, row: dict[str, Any], completion: np.ndarray,
                 config: Any, steps: int, model_seconds: float,
                 teacher_dir: Path | None) -> dict[str, Any]:
    """Write the Fig.-1-style PNG of one scan (`model_seconds`: the node's time per scan); return
    what it shows."""
    from distdpo_ros import metrics
    from distdpo_training.data.dataset import MapIndex, evaluation_ground_truth
    from distdpo_training.data.kitti import KittiSequence
    from distdpo_training.data.maps import load_map
    from distdpo_training.evaluation.render import Panel, crop_to_radius, render_figure

    sequence = KittiSequence(folder)
    position = int(np.flatnonzero(sequence.frame_ids == row['frame'])[0])
    scan = sequence.scan(position)
    gt = evaluation_ground_truth(sequence, position, MapIndex(load_map(folder)),
                                 max_range=config.max_range)
    shown: dict[str, Any] = {'frame': row['frame'], 'cd': row['cd'], 'seconds': model_seconds}
    panels = [Panel('Input scan', crop_to_radius(scan, config.max_range)),
              Panel('Ground truth', gt)]
    if teacher_dir is not None:
        points, teacher_steps, seconds = complete_with_teacher(teacher_dir, scan, opts.device,
                                                               opts.seed)
        cd = metrics.chamfer_distance(points, gt) if len(points) else float('nan')
        panels.append(Panel(f'Teacher · {teacher_steps} steps', points,
                            f'CD {cd:.3f} m · {seconds:.1f} s'))
        shown['teacher'] = {'path': str(teacher_dir), 'steps': teacher_steps, 'cd': cd,
                            'seconds_first_run': seconds}
    panels.append(Panel(f'{config.role.capitalize()} · {steps} steps (node output)', completion,
                        f'CD {row["cd"]:.3f} m · {model_seconds:.1f} s'))
    title = (f'distdpo demo · simulated drive, scan {row["frame"]} · '
             f'{config.scale} {config.role}')
    render_figure(panels, opts.out / PICTURE_FILE, title=title, seed=opts.seed)
    return shown


# --------------------------------------------------------------------------------------------
# The whole demo
# --------------------------------------------------------------------------------------------

def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return the summary it wrote."""
    from distdpo_ros.completion import resolve_device
    from distdpo_ros.ros_env import use_local_ros_network

    if opts.frames < 1:
        raise UserError(f'--frames must be at least 1, got {opts.frames}')
    check_seed(opts.seed)
    model_dir = resolve_demo_model(opts.model)
    config = ckpt.load_config(model_dir)
    teacher_dir = resolve_teacher(opts.teacher, opts.model)
    device = str(resolve_device(opts.device))
    steps = SamplingSettings.from_parameters(opts.steps).resolved(config).steps
    use_local_ros_network()  # before anything imports rclpy; the node process inherits it
    with RunLock(opts.out, 'distdpo demo'):  # created if needed; a running demo is refused
        prepare_output(opts.out)
        return _run_stages(opts, model_dir, config, teacher_dir, device, steps)


def _run_stages(opts: DemoOptions, model_dir: Path, config: Any, teacher_dir: Path | None,
                device: str, steps: int) -> dict[str, Any]:
    """The five stages and the summary, in the prepared and locked output folder."""
    from distdpo_ros.atomic import atomic_writer

    seconds: dict[str, float] = {}
    try:
        clock = time.perf_counter()
        folder, bag = simulate_drive(opts.out, opts.frames, opts.seed)
        seconds['simulate_and_map'] = time.perf_counter() - clock
        clock = time.perf_counter()
        report = replay_drive(opts, model_dir, bag, opts.frames)
        seconds['replay'] = time.perf_counter() - clock
        replayed = report.summary()
        if not report.completed:
            output = replayed.get('node', {}).get('process_output', '')
            raise UserError('the completion node returned no completed cloud'
                            + (f'; its output:\n{output}' if output else ''))
        clock = time.perf_counter()
        rows, completions = score_recording(opts.out / RECORD_DIR, opts.out / DRIVE_DIR, config)
        if not rows:
            raise UserError(f'{opts.out / RECORD_DIR}: no recorded completion could be scored')
        seconds['score'] = time.perf_counter() - clock
        clock = time.perf_counter()
        _stage(5, f'drawing one scan into {opts.out / PICTURE_FILE}')
        row = rows[len(rows) // 2]  # the middle of the drive
        timing = replayed.get('node', {}).get('model_ms') or replayed['latency_ms']
        shown = draw_picture(opts, folder, row, completions[row['stamp_ns']], config, steps,
                             timing['median'] / 1e3, teacher_dir)
        seconds['picture'] = time.perf_counter() - clock
    finally:
        if not opts.keep:
            shutil.rmtree(opts.out / DRIVE_DIR, ignore_errors=True)
    summary = {
        'model': {'name': opts.model, 'path': str(model_dir), 'scale': config.scale,
                  'role': config.role, 'steps': steps, 'guidance': config.guidance},
        'device': device,
        'node': 'in its own process' if opts.separate_process else 'in this process',
        'seed': opts.seed,
        'frames': {'simulated': opts.frames, 'published': replayed['published'],
                   'completed': replayed['completed'], 'scored': len(rows)},
        'latency_ms': replayed.get('latency_ms', {}),
        'node_stats': replayed.get('node', {}),
        'quality': {k: float(np.mean([r[k] for r in rows])) for k in QUALITY_KEYS},
        'inputs': {name: {m: float(np.mean([r[f'{m}_input_{name}'] for r in rows]))
                          for m in ('cd', 'fscore')} for name in INPUT_NAMES},
        'quality_per_frame': [{k: r[k] for k in ('frame', 'stamp_ns', *QUALITY_KEYS)}
                              for r in rows],
        'picture': shown,
        'seconds': {k: round(v, 2) for k, v in seconds.items()},
        'outputs': {'summary': str(opts.out / SUMMARY_FILE),
                    'recorded_bag': str(opts.out / RECORD_DIR),
                    'picture': str(opts.out / PICTURE_FILE),
                    'drive': str(opts.out / DRIVE_DIR) if opts.keep else None},
    }
    with atomic_writer(opts.out / SUMMARY_FILE) as handle:
        handle.write((json.dumps(summary, indent=2) + '\n').encode())
    return summary


def summary_table(s: dict[str, Any]) -> str:
    """The compact table `distdpo demo` prints: latency, quality and where the outputs are."""
    model, frames = s['model'], s['frames']
    lines = [f'distdpo demo: {model["scale"]} {model["role"]} ({model["name"]}), {model["steps"]} '
             f'steps, {s["device"]}, node {s["node"]}',
             f'  {"scans completed":<28}{frames["completed"]} of {frames["published"]} '
             '(one at a time)']

    def timing(label: str, stats: dict[str, float] | None, digits: int = 0) -> None:
        if stats:
            lines.append(f'  {label:<28}median {stats["median"]:.{digits}f}   '
                         f'p95 {stats["p95"]:.{digits}f}   max {stats["max"]:.{digits}f}')

    timing('latency [ms]', s['latency_ms'])
    timing('  model [ms]', s['node_stats'].get('model_ms'))
    timing('  node overhead [ms]', s['node_stats'].get('overhead_ms'), 1)
    q = s['quality']
    lines.append(f'  {"quality vs GT (mean of " + str(frames["scored"]) + ")":<28}'
                 f'CD {q["cd"]:.3f} m (lower is better)   F-score {q["fscore"]:.1f} %   '
                 f'JSD {q["jsd"]:.3f}')
    for name, label in INPUT_LABELS.items():  # what the user has without the model
        base = s['inputs'][name]
        verdict = ('beats it' if q['cd'] < base['cd'] and q['fscore'] > base['fscore'] else
                   'loses to it' if q['cd'] > base['cd'] and q['fscore'] < base['fscore'] else
                   'mixed')
        lines.append(f'  {"  input: " + label:<28}CD {base["cd"]:.3f} m   F-score '
                     f'{base["fscore"]:.1f} %   (the model {verdict})')
    lines += [
              f'  {"summary":<28}{s["outputs"]["summary"]}',
              f'  {"completed clouds (bag)":<28}{s["outputs"]["recorded_bag"]}',
              f'  {"picture":<28}{s["outputs"]["picture"]} (scan {s["picture"]["frame"]})']
    if s['outputs']['drive']:
        lines.append(f'  {"simulated drive":<28}{s["outputs"]["drive"]}')
    return '\n'.join(lines)
