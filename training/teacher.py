"""Training the LiDiff teacher: the local-diffusion objective of reference §3.3, on the engine.

One step, per sample b of the global batch (all draws from b's own generator, so 1 and N torchrun
processes compute the same update):

- t_b ~ U{0..T-1}, eps_b ~ N(0, I) of the ground truth's shape, x_t = gt + sigma_t * eps (local
  noising, no scaling of x_0);
- the condition is dropped with probability `cond_drop_prob` per sample (LiDiff drops it per
  batch): the scan is replaced by the all-zero scan, i.e. the null condition of guidance;
- loss_b = MSE(eps_hat_b, eps_b) + reg_weight * (mean(eps_hat_b)^2 + (std(eps_hat_b) - 1)^2).
  LiDiff takes mean and std over its whole per-GPU batch; we take them per sample, which makes the
  loss independent of how the batch is split over processes. The loss is the mean over samples.

Adam (lr 1e-4, no weight decay) over encoder and noise predictor; the learning rate halves every
`lr_decay_epochs` epochs (LiDiff: 5), or every `lr_decay_steps` steps when that is set. Validation
completes a few scans with the config's default steps and guidance, scores them against their
ground-truth crop (CD, and F-score/JSD when available) and renders the first one.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distdpo_ros.checkpoint import ModelBundle, save_model
from distdpo_ros.completion import initial_cloud, postprocess, sample
from distdpo_ros.config import ModelConfig
from distdpo_ros.diffusion.schedule import NoiseSchedule
from distdpo_ros.errors import UserError
from distdpo_ros.models import DiffusionNet
from distdpo_training.engine import Engine, EngineConfig, ModelSpec


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


@dataclass
class TeacherConfig:
    """`distdpo train teacher` (training/configs/teacher_*.yaml)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    train: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lr: float = 1e-4
    lr_decay: float = 0.5  # multiplied into the learning rate every decay period
    lr_decay_epochs: float = 5.0  # LiDiff's period
    lr_decay_steps: int = 0  # > 0: the period in steps instead (for short runs)
    cond_drop_prob: float = 0.1
    reg_weight: float = 5.0
    init: str = ''  # optional model checkpoint to start from (our format)

    def validate(self, source: str) -> TeacherConfig:
        self.train.validate(source)
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise UserError(f'{source}: field "cond_drop_prob" must be in [0, 1)')
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise UserError(f'{source}: fields "lr" > 0 and "lr_decay" in (0, 1] are required')
        self.model.build()
        return self


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


def lidiff_loss(eps_hat: torch.Tensor, eps: torch.Tensor, reg_weight: float
                ) -> dict[str, torch.Tensor]:
    """Per-sample LiDiff loss averaged over the batch: {'loss', 'mse', 'reg'} (see module doc)."""
    flat = eps_hat.float().flatten(1)
    mse = ((flat - eps.float().flatten(1)) ** 2).mean(1)
    reg = flat.mean(1) ** 2 + (flat.std(1) - 1.0) ** 2
    return {'loss': (mse + reg_weight * reg).mean(), 'mse': mse.mean().detach(),
            'reg': reg.mean().detach()}


def draw_training_noise(gens: list[torch.Generator], shape: tuple[int, ...], timesteps: int,
                        drop_prob: float, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t (B,), drop (B,) bool, eps (B, *shape)) with sample b drawn from gens[b] in that order."""
    t, drop, eps = [], [], []
    for g in gens:
        t.append(torch.randint(timesteps, (1,), generator=g, device=device))
        drop.append(torch.rand(1, generator=g, device=device) < drop_prob)
        eps.append(torch.randn(shape, generator=g, device=device))
    return torch.cat(t), torch.cat(drop), torch.stack(eps)


def step_lr(optimizer: torch.optim.Optimizer, gamma: float, every_steps: int
            ) -> torch.optim.lr_scheduler.StepLR:
    """The learning-rate decay, stepped once per optimisation step."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, every_steps), gamma=gamma)


def decay_period(cfg: Any, steps_per_epoch: int) -> int:
    """Steps between learning-rate decays: lr_decay_steps, else lr_decay_epochs epochs."""
    if cfg.lr_decay_steps > 0:
        return int(cfg.lr_decay_steps)
    return max(1, round(cfg.lr_decay_epochs * steps_per_epoch))


def load_initial_net(path: str, model: ModelConfig) -> DiffusionNet:
    """A DiffusionNet with the weights of a model checkpoint whose networks fit `model`."""
    from distdpo_ros.checkpoint import load_model

    bundle = load_model(path)
    mismatch = [k for k in ('channel_ratio', 'resolution', 'scan_points', 'replication')
                if getattr(bundle.config, k) != getattr(model, k)]
    if mismatch:
        raise UserError(f'{path}: its config does not fit this run (fields {mismatch} differ)')
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
                            steps: int, guidance: float, generator: torch.Generator
                            ) -> torch.Tensor:
    """The Completer's diffusion + crop of one scan (M, 3) on the net's device: (P, 3)."""
    raw = sample(net, scan[None], model, steps=steps or None,
                 guidance=None if guidance < 0 else guidance, generators=generator)
    return postprocess(raw[0], initial_cloud(scan[None], model.replication)[0], model.max_range)


def validation_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """CD (m) of a completion against its ground truth, plus F-score (%) and BEV JSD."""
    from distdpo_ros import metrics

    if len(pred) == 0:
        return {'cd': float('inf')}
    out = {'cd': metrics.chamfer_distance(pred, gt)}
    out['fscore'] = float(metrics.precision_recall_fscore(pred, gt).fscore)
    out['jsd_bev'] = float(metrics.jsd_bev(pred, gt))
    return out


def render_validation(out: Path, scan: np.ndarray, pred: np.ndarray, gt: np.ndarray,
                      title: str, cd: float) -> None:
    """scan | completion | ground truth as one PNG (skipped with a note without matplotlib)."""
    try:
        from distdpo_training.render import Panel, render_figure
    except ImportError as exc:
        print(f'distdpo: validation render skipped ({exc})', file=sys.stderr)
        return
    render_figure([Panel('scan', scan), Panel('completion', pred, f'CD {cd:.3f} m'),
                   Panel('ground truth', gt)], out, title=title, width_px=1500)


class TeacherTask:
    """The LiDiff objective as an engine Task (see the module docstring)."""

    best_metric, lower_is_better = 'cd', True
    loop = 'teacher'

    def __init__(self, cfg: TeacherConfig) -> None:
        self.cfg = cfg
        self.model = cfg.model.build()
        self.schedule = NoiseSchedule.from_config(self.model)

    def setup(self, engine: Engine) -> None:
        net = load_initial_net(self.cfg.init, self.model) if self.cfg.init else \
            DiffusionNet(self.model)
        self.denoiser = engine.add_module('diffusion', ConditionedDenoiser(net))
        opt = torch.optim.Adam(net.parameters(), lr=self.cfg.lr)
        engine.add_optimizer('adam', opt, step_lr(opt, self.cfg.lr_decay,
                                                  decay_period(self.cfg, engine.steps_per_epoch)))

    def net(self, engine: Engine) -> DiffusionNet:
        return engine.unwrap('diffusion').net

    def train_step(self, engine: Engine, batch: dict[str, Any], gens: list[torch.Generator]
                   ) -> dict[str, torch.Tensor]:
        gt, scan = batch['gt'], batch['scan']
        t, drop, eps = draw_training_noise(gens, tuple(gt.shape[1:]),
                                           self.model.num_train_timesteps,
                                           self.cfg.cond_drop_prob, engine.device)
        x_t = self.schedule.add_noise(gt, t, eps)
        with engine.autocast():
            eps_hat = self.denoiser(x_t, t, drop_conditions(scan, drop))
        out = lidiff_loss(eps_hat, eps, self.cfg.reg_weight)
        out['grad_norm'] = engine.optimize(out['loss'], 'adam')
        out['loss'] = out['loss'].detach()
        return out

    def validate(self, engine: Engine, item: dict[str, Any], index: int) -> dict[str, float]:
        return validate_completion(engine, self.net(engine), self.model, self.cfg.validation,
                                   item, index, self.loop)

    def export(self, engine: Engine, out_dir: Path, info: dict[str, Any]) -> None:
        export_diffusion(out_dir, self.net(engine), self.model, self.loop, info)


def validate_completion(engine: Engine, net: DiffusionNet, model: ModelConfig,
                        cfg: ValidationConfig, item: dict[str, Any], index: int, loop: str
                        ) -> dict[str, float]:
    """Complete one validation item and score it; the first item is also rendered (rank 0)."""
    scan = torch.as_tensor(item['scan'], device=engine.device)
    with engine.autocast():
        pred = complete_for_validation(net, scan, model, cfg.steps, cfg.guidance,
                                       engine.generator('val', index))
    pred_np = pred.float().cpu().numpy()
    row = validation_metrics(pred_np, np.asarray(item['gt']))
    if cfg.render and index == 0 and engine.is_main:
        out = engine.out / 'val' / f'step_{engine.step:07d}.png'
        out.parent.mkdir(parents=True, exist_ok=True)
        render_validation(out, np.asarray(item['scan']), pred_np, np.asarray(item['gt']),
                          f'{loop} step {engine.step}', row['cd'])
    return row
