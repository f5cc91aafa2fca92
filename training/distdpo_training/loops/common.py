"""What every training loop shares: data and validation settings, learning-rate decay,
loading and exporting diffusion networks, and the validation completion of a scan.

The loops (:mod:`.teacher`, :mod:`.refine`, :mod:`.diffusion_dpo`, :mod:`.distill`) import from
here, never from each other.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distdpo_ros.checkpoint import ModelBundle, save_model
from distdpo_ros.completion import initial_cloud, postprocess, sample
from distdpo_ros.config import ModelConfig, require_same_networks
from distdpo_ros.models import DiffusionNet
from distdpo_ros.settings import SamplingSettings
from distdpo_training.engine import Engine


@dataclass
class DataConfig:
    """Which sequences of --data train and validate the model."""

    train: str | list[str] = 'train'  # 'train' / 'val' (SemanticKITTI splits) or sequence names
    val: str | list[str] = 'val'
    stride: int = 1  # use every stride-th scan of the training sequences
    val_stride: int = 25  # validation scans are every val_stride-th scan of the val sequences


@dataclass
class ValidationConfig:
    """How validation completes its scans."""

    steps: int = 0  # sampler steps; 0: the model's default (teacher 50)
    guidance: float = -1.0  # CFG weight; < 0: the model's default (teacher 6)
    render: bool = True  # draw scan / prediction / ground truth of the first scan as a PNG


class ConditionedDenoiser(nn.Module):
    """Encoder + noise predictor in one forward call (what DDP wraps): eps_hat(x_t, t, scan)."""

    def __init__(self, net: DiffusionNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, scan: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, t, self.net.encode(scan))


def drop_conditions(scan: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Scans with the dropped ones (drop (B,) bool) replaced by the all-zero (null) scan."""
    return torch.where(drop[:, None, None], torch.zeros_like(scan), scan)


def lr_schedule(optimizer: torch.optim.Optimizer, gamma: float, every_steps: int,
                warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then the rate times gamma every `every_steps` steps;
    stepped once per optimisation step."""
    every, warmup = max(1, int(every_steps)), max(0, int(warmup_steps))

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * gamma ** (step // every)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay_period(cfg: Any, steps_per_epoch: int) -> int:
    """Steps between learning-rate decays: lr_decay_steps, else lr_decay_epochs epochs."""
    if cfg.lr_decay_steps > 0:
        return int(cfg.lr_decay_steps)
    return max(1, round(cfg.lr_decay_epochs * steps_per_epoch))


def load_initial_net(path: str, model: ModelConfig) -> DiffusionNet:
    """A DiffusionNet with the weights of a model checkpoint whose networks fit `model`."""
    from distdpo_ros.checkpoint import load_model

    bundle = load_model(path)
    require_same_networks(bundle.config, model, path)
    net = DiffusionNet(model)
    net.load_state_dict(bundle.diffusion.state_dict())
    return net


def export_diffusion(out_dir: Path, net: DiffusionNet, model: ModelConfig, loop: str,
                     info: dict[str, Any]) -> None:
    """Write net in our model format with the run's provenance in config.notes."""
    notes = dict(model.notes)
    notes.update({'trained_by': f'distdpo train {loop}', **{k: v for k, v in info.items()
                                                           if v is not None}})
    config = dataclasses.replace(model, notes=notes)
    save_model(out_dir, ModelBundle(config=config, diffusion=net), overwrite=True)


def complete_for_validation(net: DiffusionNet, scan: torch.Tensor, model: ModelConfig,
                            steps: int, guidance: float, generator: torch.Generator,
                            should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """The Completer's diffusion + crop of one scan (M, 3) on the net's device: (P, 3).

    `should_stop` is asked before every sampler step (True raises Cancelled)."""
    settings = SamplingSettings.from_parameters(steps, guidance)
    raw = sample(net, scan[None], model, steps=settings.steps, guidance=settings.guidance,
                 generators=generator, should_stop=should_stop)
    return postprocess(raw[0], initial_cloud(scan[None], model.replication)[0], model.max_range)


def validation_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """CD (m) of a completion against its ground truth, plus F-score (%) and BEV JSD."""
    from distdpo_ros import metrics

    if len(pred) == 0:
        return {'cd': float('inf')}
    cd, fscore = metrics.chamfer_and_fscore(pred, gt)
    return {'cd': cd, 'fscore': fscore, 'jsd_bev': float(metrics.jsd_bev(pred, gt))}


def render_validation(out: Path, scan: np.ndarray, pred: np.ndarray, gt: np.ndarray,
                      title: str, cd: float) -> None:
    """scan | completion | ground truth as one PNG (skipped with a note without matplotlib)."""
    try:
        from distdpo_training.evaluation.render import Panel, render_figure
    except ImportError as exc:
        print(f'distdpo: validation render skipped ({exc})', file=sys.stderr)
        return
    render_figure([Panel('scan', scan), Panel('completion', pred, f'CD {cd:.3f} m'),
                   Panel('ground truth', gt)], out, title=title, width_px=1500)


def validate_completion(engine: Engine, net: DiffusionNet, model: ModelConfig,
                        cfg: ValidationConfig, item: dict[str, Any], index: int, loop: str
                        ) -> dict[str, float]:
    """Complete one validation item and score it, beside the input baselines of the same scan
    (`cd_input_raw`, `fscore_input_cond`, ...: see evaluation.baselines) when the item carries
    its raw points; the first item is also rendered (rank 0)."""
    from distdpo_ros import metrics
    from distdpo_training.evaluation.baselines import SHORT, input_clouds

    scan = torch.as_tensor(item['scan'], device=engine.device)
    with engine.autocast():
        pred = complete_for_validation(net, scan, model, cfg.steps, cfg.guidance,
                                       engine.generator('val', index), engine.stop_requested)
    pred_np = pred.float().cpu().numpy()
    gt = np.asarray(item['gt'])
    row = validation_metrics(pred_np, gt)
    if 'raw' in item:
        clouds = input_clouds(np.asarray(item['raw']), np.asarray(item['scan']), model, index)
        for name, cloud in clouds.items():
            cd, fscore = metrics.chamfer_and_fscore(cloud, gt)
            row[f'cd_input_{SHORT[name]}'] = cd
            row[f'fscore_input_{SHORT[name]}'] = fscore
    if cfg.render and index == 0 and engine.is_main:
        out = engine.out / 'val' / f'step_{engine.step:07d}.png'
        out.parent.mkdir(parents=True, exist_ok=True)
        render_validation(out, np.asarray(item['scan']), pred_np, gt,
                          f'{loop} step {engine.step}', row['cd'])
    return row
