"""What an evaluation covers: the models and step counts (runs), the scans of a dataset split
and their ground truth, and the settings that change a cached number."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distdpo_ros import metrics
from distdpo_ros.errors import UserError

CACHE_FORMAT = 1  # bump when the meaning of a cached scan changes


# ---------------------------------------------------------------------------------------------
# what is evaluated


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its display name, checkpoint and sampler step counts."""

    name: str
    path: str
    steps: tuple[int, ...]


@dataclass(frozen=True)
class Run:
    """One row of the tables: a model at a step count, refined or not, or an input baseline
    (`baseline` names it; `path` is then the model whose config sets its range and size)."""

    model: str
    path: str
    digest: str
    steps: int
    refine: bool
    baseline: str = ''

    @property
    def label(self) -> str:
        return self.model + (' (Refined)' if self.refine else '')

    @property
    def key(self) -> str:
        if self.baseline:
            return f'input-{_slug(self.baseline)}-{self.digest[:12]}'
        return f'{_slug(self.model)}-{self.digest[:12]}/steps{self.steps:03d}-' + (
            'refined' if self.refine else 'raw')


@dataclass(frozen=True)
class ScanRef:
    """One scan of the split: sequence name, position in the sequence and frame number."""

    sequence: str
    position: int
    frame: int
    order: int  # position in the evaluated list (seeds and shards depend on it, not on ranks)

    @property
    def key(self) -> str:
        return f'{self.sequence}_{self.frame:06d}'


@dataclass
class Settings:
    """Everything besides the model that changes a cached number (hashed into the cache path)."""

    guidance: float | None = None
    sampler: str | None = None  # None: each model's own
    seed: int = 0
    emd_points: int = metrics.EMD_POINTS
    voxel_sizes: tuple[float, ...] = metrics.IOU_VOXEL_SIZES

    def digest(self) -> str:
        text = json.dumps({**asdict(self), 'format': CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class Evaluation:
    """A whole `distdpo evaluate` call."""

    models: list[ModelSpec]
    scans: list[ScanRef]
    dataset: KittiScans
    out: Path
    settings: Settings = field(default_factory=Settings)
    refine: bool = False
    device: str = 'cpu'
    renders: int = 3
    description: str = ''
    warmup: bool = True  # one untimed completion per (model, steps) and process
    baselines: bool = True  # also score the input baselines on the same scans


def _slug(text: str) -> str:
    keep = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in text.strip())
    return keep.strip('_') or 'model'


def model_digest(path: str | os.PathLike) -> str:
    """SHA-256 recorded in a checkpoint's weights header (falls back to hashing the file)."""
    import safetensors

    from distdpo_ros.checkpoint import WEIGHTS_FILE, resolve_model

    weights = resolve_model(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f'{weights}: missing; not a checkpoint directory')
    with safetensors.safe_open(str(weights), framework='pt') as handle:
        recorded = (handle.metadata() or {}).get('distdpo_sha256')
    if recorded:
        return recorded
    digest = hashlib.sha256()
    with open(weights, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def make_runs(models: Sequence[ModelSpec], refine: bool, baselines: bool = True) -> list[Run]:
    """The input baselines (sized by the first model's config) and then every model's runs."""
    runs = baseline_runs(models[0].path) if baselines and models else []
    for spec in models:
        digest = model_digest(spec.path)
        for steps in spec.steps:
            for refined in ((False, True) if refine else (False,)):
                runs.append(Run(spec.name, spec.path, digest, steps, refined))
    return runs


def baseline_runs(path: str) -> list[Run]:
    """One run per input baseline, with the range and sizes of the model at `path`."""
    from distdpo_ros.checkpoint import load_config
    from distdpo_training.evaluation.baselines import BASELINES

    config = load_config(path)
    fields = ('min_range', 'max_range', 'min_z', 'scan_points', 'replication')
    digest = hashlib.sha256(json.dumps([getattr(config, f) for f in fields]).encode()
                            ).hexdigest()
    return [Run(f'input: {name}', path, digest, 0, False, baseline=name) for name in BASELINES]


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """Indices of ``limit`` scans spread evenly over ``count`` (all of them without a limit)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


# ---------------------------------------------------------------------------------------------
# the dataset


class KittiScans:
    """Scans and evaluation ground truth of a SemanticKITTI-layout dataset (real or simulated).

    The ground truth of a scan is :func:`distdpo_training.data.dataset.evaluation_ground_truth`
    (reference §5) with the given ``max_range``; one sequence map is held in memory at a time.
    """

    def __init__(self, root: str | os.PathLike, split: str = 'val',
                 sequences: Sequence[str] | None = None, max_range: float = 50.0) -> None:
        from distdpo_training.data.dataset import SPLITS
        from distdpo_training.data.kitti import KittiSequence, find_sequences

        if sequences is None and split not in SPLITS:
            raise UserError(f'--split {split!r}: use {" / ".join(SPLITS)}, or --sequences')
        names = list(sequences) if sequences is not None else list(SPLITS[split])
        self.root = Path(root)
        self.max_range = max_range
        self.sequences = {p.name: KittiSequence(p) for p in find_sequences(root, names)}
        for seq in self.sequences.values():
            if not seq.map_path.is_file():
                raise UserError(f'{seq.map_path}: ground-truth map is missing; run '
                                f'`distdpo build-maps {root}` first')
        self._map: tuple[str, Any] | None = None

    def scan_refs(self, limit: int | None = None) -> list[ScanRef]:
        """The evaluated scans in sequence and frame order (``limit`` of them, evenly spread)."""
        every = [(name, i, int(seq.frame_ids[i])) for name, seq in self.sequences.items()
                 for i in range(len(seq))]
        picked = [every[i] for i in evenly_spaced(len(every), limit)]
        return [ScanRef(name, i, frame, order) for order, (name, i, frame) in enumerate(picked)]

    def scan_and_ground_truth(self, ref: ScanRef) -> tuple[np.ndarray, np.ndarray]:
        """The raw scan (N, 4) float32 and its evaluation ground truth (M, 3) float32."""
        from distdpo_training.data.dataset import MapIndex, evaluation_ground_truth
        from distdpo_training.data.maps import load_map

        seq = self.sequences[ref.sequence]
        if self._map is None or self._map[0] != ref.sequence:
            self._map = (ref.sequence, MapIndex(load_map(seq.path)))
        gt = evaluation_ground_truth(seq, ref.position, self._map[1], max_range=self.max_range)
        return seq.scan(ref.position), gt


def render_scans(scans: Sequence[ScanRef], count: int) -> list[ScanRef]:
    """The scans drawn as figures: ``count`` spread evenly over the evaluated scans."""
    if count <= 0 or not scans:
        return []
    return [scans[i] for i in evenly_spaced(len(scans), count)]


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Every world_size-th item starting at rank (balanced over the sequence, deterministic)."""
    return list(items[rank::world_size])
