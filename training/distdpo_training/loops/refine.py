"""Training LiDiff's refinement / up-sampling net (reference §1.5, §2.6) on the engine.

Data (:class:`RefineDataset`): for scan i, the scans of a window of `window` consecutive frames
around it (LiDiff: 40, centre 20), moving classes removed when labelled (labels >= 252; unlabelled
points are kept, as in the reference), points within `min_range` dropped, all moved into the frame
of scan i and cropped to `max_range`; training items get the joint augmentation of the diffusion
data. The input is that aggregate jittered with N(0, 0.2^2) clipped to +-0.3 m; the target is the
clean aggregate voxel-downsampled at 0.1 m. Input and target are brought to N and 2N points
(N = the model's `full_points`, LiDiff: 180,000 and 360,000) by a random permutation tiled to
length.

Objective: the net predicts `refine_up_factor` (6) offsets in [-1, 1] m per input point; the loss
is the squared Chamfer distance (mean of both directional mean squared nearest-neighbour distances,
pytorch3d's default as used by LiDiff) between the x6 points and the target, computed without
pytorch3d: nearest neighbours are found without gradient (chunked cdist, or a KD-tree on CPU) and
the distances of the matched pairs are then evaluated with gradient, which is the exact gradient
of the min.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch.utils.data import Dataset

from distdpo_ros.checkpoint import (
    REFINE_PREFIX,
    ModelBundle,
    load_model,
    save_checkpoint,
    save_model,
)
from distdpo_ros.config import ModelConfig, require_same_networks
from distdpo_ros.errors import UserError
from distdpo_ros.models import RefineNet
from distdpo_training.data.dataset import (
    fixed_size,
    random_linear_map,
    split_sequences,
    to_scan_frame,
)
from distdpo_training.data.frames import FIRST_MOVING_CLASS, semantic
from distdpo_training.data.kitti import KittiSequence
from distdpo_training.data.maps import voxel_keys
from distdpo_training.engine import Engine, EngineConfig, ModelSpec
from distdpo_training.loops.common import DataConfig, decay_period, lr_schedule


@dataclass
class AggregationConfig:
    """How the refinement data aggregates and corrupts scans (reference §1.5)."""

    window: int = 40  # consecutive scans aggregated per item
    jitter_sigma: float = 0.2  # metres, Gaussian jitter of the input
    jitter_clip: float = 0.3  # metres
    target_voxel: float = 0.1  # metres, voxel downsampling of the clean target


@dataclass
class RefineConfig:
    """`distdpo train refine` (configs/refine_*.yaml)."""

    model: ModelSpec = field(default_factory=lambda: ModelSpec(role='refine'))
    train: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    lr: float = 1e-4
    lr_decay: float = 0.5
    lr_decay_epochs: float = 5.0
    lr_decay_steps: int = 0
    teacher: str = ''  # a diffusion checkpoint: the exported model then holds both networks

    def validate(self, source: str) -> RefineConfig:
        self.train.validate(source)
        a = self.aggregation
        if a.window < 1 or a.jitter_sigma < 0 or a.jitter_clip < 0 or a.target_voxel <= 0:
            raise UserError(f'{source}: fields "aggregation.*" must be positive')
        self.model.build()
        return self


def _sequences(root: str | os.PathLike, split: str | Sequence[str]) -> list[KittiSequence]:
    return [KittiSequence(p) for p in split_sequences(root, split)]


class RefineDataset(Dataset):
    """(noisy aggregate, clean aggregate) pairs around every stride-th scan; see module doc."""

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str], config: ModelConfig,
                 aggregation: AggregationConfig, *, augment: bool = False, seed: int = 0,
                 stride: int = 1) -> None:
        self.config, self.agg, self.augment = config, aggregation, augment
        self.seed, self.epoch = seed, 0
        self.sequences = _sequences(root, split)
        self.items = [(s, i) for s, seq in enumerate(self.sequences)
                      for i in range(0, len(seq), max(1, stride))]

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def window(self, seq: KittiSequence, i: int) -> range:
        """The frames aggregated for scan i: `window` frames centred on i, inside the sequence."""
        n, w = len(seq), min(self.agg.window, len(seq))
        start = min(max(0, i - w // 2), n - w)
        return range(start, start + w)

    def aggregate(self, seq: KittiSequence, i: int) -> np.ndarray:
        """Static points of the window in the frame of scan i, within the model's range."""
        parts = []
        for j in self.window(seq, i):
            points = seq.scan(j)[:, :3]
            labels = seq.labels(j, len(points))
            if labels is not None:
                points = points[semantic(labels) < FIRST_MOVING_CLASS]
            points = points[np.linalg.norm(points, axis=1) > self.config.min_range]
            pose = seq.poses[j]
            parts.append(points.astype(np.float64) @ pose[:3, :3].T + pose[:3, 3])
        local = to_scan_frame(np.concatenate(parts), seq.poses[i])
        return local[np.linalg.norm(local, axis=1) < self.config.max_range]

    def __getitem__(self, item: int) -> dict[str, Any]:
        s, i = self.items[item]
        seq = self.sequences[s]
        rng = np.random.default_rng((self.seed, self.epoch, item))
        clean = self.aggregate(seq, i)
        if len(clean) == 0:
            raise UserError(f'{seq.scan_paths[i]}: no points within {self.config.max_range} m')
        if self.augment:
            clean = clean @ random_linear_map(rng).astype(np.float32)
        jitter = np.clip(self.agg.jitter_sigma * rng.standard_normal(clean.shape),
                         -self.agg.jitter_clip, self.agg.jitter_clip)
        noisy = (clean + jitter).astype(np.float32)
        _, first = np.unique(voxel_keys(clean, self.agg.target_voxel), return_index=True)
        n = self.config.full_points
        return {'noisy': fixed_size(noisy, n, rng), 'clean': fixed_size(clean[first], 2 * n, rng),
                'sequence': seq.name, 'frame': int(seq.frame_ids[i])}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {'noisy': torch.from_numpy(np.stack([it['noisy'] for it in items])),
            'clean': torch.from_numpy(np.stack([it['clean'] for it in items])),
            'sequence': [it['sequence'] for it in items],
            'frame': torch.tensor([it['frame'] for it in items], dtype=torch.int64)}


def nearest_index(query: torch.Tensor, ref: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index into ref (Q, 3) of the nearest neighbour of every query point (P, 3); no gradient."""
    with torch.no_grad():
        if query.device.type == 'cpu':
            _, idx = cKDTree(ref.double().numpy()).query(query.double().numpy(), k=1, workers=-1)
            return torch.from_numpy(idx.astype(np.int64))
        return torch.cat([torch.cdist(query[i:i + chunk].float(), ref.float()).argmin(1)
                          for i in range(0, len(query), chunk)])


def chamfer_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared Chamfer distance of (B, P, 3) and (B, Q, 3), mean over the batch, differentiable
    in both clouds: mean_p min_q |p - q|^2 + mean_q min_p |q - p|^2."""
    losses = []
    for p, q in zip(pred, target, strict=True):
        to_q = ((p - q[nearest_index(p, q).to(p.device)]) ** 2).sum(1).mean()
        to_p = ((q - p[nearest_index(q, p).to(p.device)]) ** 2).sum(1).mean()
        losses.append(to_q + to_p)
    return torch.stack(losses).mean()


def refined(points: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Points (B, N, 3) plus their offsets (B, N, up, 3) as (B, N * up, 3)."""
    return (points[:, :, None, :] + offsets).reshape(points.shape[0], -1, 3)


class RefineTask:
    """The refinement objective as an engine Task (see the module docstring)."""

    best_metric, lower_is_better = 'cd', True
    loop = 'refine'

    def __init__(self, cfg: RefineConfig) -> None:
        self.cfg = cfg
        self.model = cfg.model.build()

    def setup(self, engine: Engine) -> None:
        net = RefineNet(self.model)
        self.net = engine.add_module('refine', net)
        opt = torch.optim.Adam(net.parameters(), lr=self.cfg.lr)
        engine.add_optimizer('adam', opt, lr_schedule(
            opt, self.cfg.lr_decay, decay_period(self.cfg, engine.steps_per_epoch)))

    def train_step(self, engine: Engine, batch: dict[str, Any], gens: list[torch.Generator]
                   ) -> dict[str, torch.Tensor]:
        noisy = batch['noisy']
        with engine.autocast():
            offsets = self.net(noisy)
        loss = chamfer_loss(refined(noisy, offsets.float()), batch['clean'])
        grad_norm = engine.optimize(loss, 'adam')
        return {'loss': loss.detach(), 'grad_norm': grad_norm}

    def validate(self, engine: Engine, item: dict[str, Any], index: int) -> dict[str, float]:
        from distdpo_ros.metrics import chamfer_distance

        noisy = torch.as_tensor(item['noisy'], device=engine.device)[None]
        with engine.autocast():
            out = refined(noisy, engine.unwrap('refine')(noisy).float())[0]
        return {'cd': chamfer_distance(out.cpu().numpy(), item['clean']),
                'cd_input': chamfer_distance(item['noisy'], item['clean'])}

    def export(self, engine: Engine, out_dir: Path, info: dict[str, Any]) -> None:
        net: RefineNet = engine.unwrap('refine')
        notes = {**self.model.notes, 'trained_by': 'distdpo train refine',
                 **{k: v for k, v in info.items() if v is not None}}
        if self.cfg.teacher:
            bundle = load_model(self.cfg.teacher)
            require_same_networks(bundle.config, self.model, self.cfg.teacher,
                                  fields=('channel_ratio', 'resolution', 'norm'))
            config = bundle.config.replace(
                has_refine=True, refine_up_factor=self.model.refine_up_factor,
                notes={**bundle.config.notes, 'refine': notes})
            save_model(out_dir, ModelBundle(config, bundle.diffusion, net), overwrite=True)
            return
        tensors = {REFINE_PREFIX + k.removeprefix('model.'): v
                   for k, v in net.state_dict().items()}
        config = dataclasses.replace(self.model, role='refine', notes=notes)
        save_checkpoint(out_dir, config, tensors, overwrite=True)


def refine_datasets(root: Path, cfg: RefineConfig, model: ModelConfig, seed: int
                    ) -> tuple[RefineDataset, RefineDataset]:
    train = RefineDataset(root, cfg.data.train, model, cfg.aggregation, augment=True, seed=seed,
                          stride=cfg.data.stride)
    val = RefineDataset(root, cfg.data.val, model, cfg.aggregation, augment=False, seed=seed,
                        stride=cfg.data.val_stride)
    return train, val
