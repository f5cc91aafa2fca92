"""Training the LiDiff teacher: the local-diffusion objective of reference §3.3, on the engine.

One step, per sample b of the global batch (all draws from b's own generator, so 1 and N torchrun
processes compute the same update):

- t_b ~ U{0..t_max} (t_max = T - 1 unless the config restricts it to the range its sampler
  uses), eps_b ~ N(0, I) of the ground truth's shape, x_t = gt + sigma_t * eps (local noising, no
  scaling of x_0);
- the condition is dropped with probability `cond_drop_prob` per sample (LiDiff drops it per
  batch): the scan is replaced by the all-zero scan, i.e. the null condition of guidance;
- loss_b = MSE(eps_hat_b, eps_b) + reg_weight * (mean(eps_hat_b)^2 + (std(eps_hat_b) - 1)^2).
  LiDiff takes mean and std over its whole per-GPU batch; we take them per sample, which makes the
  loss independent of how the batch is split over processes. The loss is the mean over samples.
  The regulariser forces std(eps_hat) = 1, but where the noise along a dense surface cannot be
  predicted the best eps_hat has a smaller spread, so it penalises the optimum itself and
  learning stalls (issue 15: the shipped teacher's loss sat at that value for 750 steps). The
  models we train set `reg_weight: 0`; LiDiff's value 5 stays available.

Adam (LiDiff: lr 1e-4, no weight decay) over encoder and noise predictor, with an optional linear
warm-up (`warmup_steps`) and gradient-norm clipping (`grad_clip`); the learning rate is multiplied
by `lr_decay` every `lr_decay_epochs` epochs (LiDiff: halved every 5), or every `lr_decay_steps`
steps when that is set. With `ema_decay` > 0 an exponential moving average of the weights is kept
and is what validation completes with and what model/{last,best} holds. Validation completes a
few scans with the config's default steps and guidance, scores them against their ground-truth
crop (CD, and F-score/JSD when available) and renders the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distdpo_ros.diffusion.schedule import NoiseSchedule
from distdpo_ros.errors import UserError
from distdpo_ros.models import DiffusionNet
from distdpo_training.engine import Engine, EngineConfig, ModelSpec
from distdpo_training.loops.common import (
    ConditionedDenoiser,
    DataConfig,
    ValidationConfig,
    decay_period,
    drop_conditions,
    export_diffusion,
    load_initial_net,
    lr_schedule,
    validate_completion,
)


@dataclass
class TeacherConfig:
    """`distdpo train teacher` (configs/teacher_*.yaml)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    train: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lr: float = 1e-4
    lr_decay: float = 0.5  # multiplied into the learning rate every decay period
    lr_decay_epochs: float = 5.0  # LiDiff's period
    lr_decay_steps: int = 0  # > 0: the period in steps instead (for short runs)
    warmup_steps: int = 0  # linear learning-rate warm-up
    grad_clip: float = 0.0  # > 0: clip the gradient norm to this
    ema_decay: float = 0.0  # > 0: validate and export an EMA of the weights with this decay
    t_max: int = -1  # training timesteps t ~ U{0..t_max}; -1: all (T - 1)
    cond_drop_prob: float = 0.1
    reg_weight: float = 5.0  # LiDiff's regulariser; 0 for the models we train (see the doc)
    init: str = ''  # optional model checkpoint to start from (our format)

    def validate(self, source: str) -> TeacherConfig:
        self.train.validate(source)
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise UserError(f'{source}: field "cond_drop_prob" must be in [0, 1)')
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise UserError(f'{source}: fields "lr" > 0 and "lr_decay" in (0, 1] are required')
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.reg_weight < 0:
            raise UserError(f'{source}: fields "warmup_steps", "grad_clip" and "reg_weight" '
                            'must be >= 0')
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f'{source}: field "ema_decay" must be in [0, 1) (0: no EMA)')
        model = self.model.build()
        if not (self.t_max == -1 or 0 <= self.t_max < model.num_train_timesteps):
            raise UserError(f'{source}: field "t_max" must be -1 or in [0, '
                            f'{model.num_train_timesteps - 1}]')
        return self


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
    """(t (B,), drop (B,) bool, eps (B, *shape)) with sample b drawn from gens[b] in that order;
    t is uniform over {0, ..., timesteps - 1}."""
    t, drop, eps = [], [], []
    for g in gens:
        t.append(torch.randint(timesteps, (1,), generator=g, device=device))
        drop.append(torch.rand(1, generator=g, device=device) < drop_prob)
        eps.append(torch.randn(shape, generator=g, device=device))
    return torch.cat(t), torch.cat(drop), torch.stack(eps)


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
        if self.cfg.ema_decay > 0:
            engine.add_ema('diffusion', self.cfg.ema_decay)
        opt = torch.optim.Adam(net.parameters(), lr=self.cfg.lr)
        engine.add_optimizer('adam', opt, lr_schedule(
            opt, self.cfg.lr_decay, decay_period(self.cfg, engine.steps_per_epoch),
            self.cfg.warmup_steps))

    def net(self, engine: Engine) -> DiffusionNet:
        """The network that is validated and exported: the EMA weights when the run keeps one."""
        return engine.averaged('diffusion').net

    def train_step(self, engine: Engine, batch: dict[str, Any], gens: list[torch.Generator]
                   ) -> dict[str, torch.Tensor]:
        gt, scan = batch['gt'], batch['scan']
        timesteps = self.model.num_train_timesteps if self.cfg.t_max < 0 else self.cfg.t_max + 1
        t, drop, eps = draw_training_noise(gens, tuple(gt.shape[1:]), timesteps,
                                           self.cfg.cond_drop_prob, engine.device)
        x_t = self.schedule.add_noise(gt, t, eps)
        with engine.autocast():
            eps_hat = self.denoiser(x_t, t, drop_conditions(scan, drop))
        out = lidiff_loss(eps_hat, eps, self.cfg.reg_weight)
        out['grad_norm'] = engine.optimize(out['loss'], 'adam', clip=self.cfg.grad_clip or None)
        out['loss'] = out['loss'].detach()
        return out

    def validate(self, engine: Engine, item: dict[str, Any], index: int) -> dict[str, float]:
        return validate_completion(engine, self.net(engine), self.model, self.cfg.validation,
                                   item, index, self.loop)

    def export(self, engine: Engine, out_dir: Path, info: dict[str, Any]) -> None:
        export_diffusion(out_dir, self.net(engine), self.model, self.loop, info)
