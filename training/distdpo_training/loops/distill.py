"""Distillation-DPO (paper Eq. 18) and plain score distillation, as engine Tasks.

One iteration on a batch of scans (all randomness from each sample's own generator):

1. Generate. The student makes K-step samples (default 1 step, no guidance, as the reference) of
   every scan with the model's own sampler, from x_init + s * eps and, for Distillation-DPO, from
   x_init + lambda * s * eps (lambda = `pair_noise_scale`, 1.1) with the same eps and solver noise;
   s is the sampler's starting scale (1 for LiDiff's DPM-Solver++, sigma_{t_start} for the
   variance-exploding samplers of the models we train, so generation, the teacher's training
   noise levels and the assistants all live on the same range of t). Both members of a pair go
   through the student in ONE batched forward; the graph is kept for the student update.
2. Rank. The sample with the lower preference metric to the ground truth (CD by default, BEV JSD
   as the paper's ablation) is the winner x^w, the other the loser x^l.
3. Assistants. Two teaching-assistant noise predictors (initialised from the teacher) take one
   diffusion-loss step, eps_phi^w on noised (detached) winners and eps_phi^l on noised losers,
   each with its own t and eps.
4. Student. With one shared t and eps, x_t = x + sigma_t * eps for winners and losers, the score
   differences d = eps_teacher(x_t) - eps_phi(x_t) are computed without gradient and the student
   minimises the surrogate whose gradient is paper Eq. 18:
       paper     (1/omega) * [mean(d_l . x^l) - mean(d_w . x^w)]
       reversed  the opposite sign (what the released code's sign amounts to)
       released  (1/omega) * [mean(d_w . ((x^w + s) - x^w)) - mean(d_l . ((x^l + s) - x^l))]
                 exactly as released: (x + s) - x has zero derivative, so the student receives
                 NO gradient (reference §4.2); kept only to document that bug.
   Score distillation (paper Table 6) uses one sample, one assistant and the DMD surrogate
   (1/omega) * mean(d . x), which moves samples toward the teacher's denoised estimate.

Differences from the reference, on purpose: the pair is generated once per iteration and reused
for the assistant step (the reference generates twice with different noise); frozen networks and
the shared condition encoder (the teacher's) stay in eval mode; the student and the assistants also
keep BatchNorm in eval mode (running statistics of the teacher, fitted over all t) so that the
student's statistics are not re-estimated on t = T inputs only, which is what the released code
effectively did to its student.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distdpo_ros.checkpoint import ModelBundle, load_model, save_model
from distdpo_ros.completion import (
    StageClock,
    clamp_to_scene_box,
    initial_cloud,
    make_solver_for,
)
from distdpo_ros.config import SCALE_FIELDS, VE_SAMPLERS, ModelConfig, require_same_networks
from distdpo_ros.diffusion import NoiseSchedule
from distdpo_ros.errors import UserError
from distdpo_ros.models import Condition, DiffusionNet
from distdpo_training.engine import Engine, EngineConfig, ModelSpec
from distdpo_training.loops.common import DataConfig, ValidationConfig, validate_completion

SIGNS = ('paper', 'reversed', 'released')
METHODS = ('dpo', 'score')
PREFERENCE_METRICS = ('cd', 'jsd')
T_WEIGHTINGS = ('none', 'inverse_sigma')


@dataclass
class DistillConfig:
    """`distdpo train distill` / `score-distill` (configs/distill_*.yaml)."""

    model: ModelSpec = field(default_factory=lambda: ModelSpec(role='student'))
    train: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=lambda: ValidationConfig(
        steps=8, guidance=3.5))
    teacher: str = ''  # teacher checkpoint (our format); --teacher overrides it
    method: str = 'dpo'  # dpo: Distillation-DPO | score: score distillation (no pairs)
    sign: str = 'paper'  # paper | reversed | released (zero student gradient, for comparison)
    preference_metric: str = 'cd'  # cd | jsd: which sample of a pair wins
    pair_noise_scale: float = 1.1  # lambda of the second sample of a pair
    generation_steps: int = 1  # student sampler steps while training (the reference: 1)
    omega: float = 1.0  # the 1/omega factor of Eq. 18
    t_weighting: str = 'none'  # none | inverse_sigma: weight the surrogate by 1/sigma_t
    t_min: int = 0  # noise levels of the assistants and the score differences: U{t_min..t_max}
    t_max: int = -1  # -1: the teacher's range (t_start for a VE sampler, else T - 1)
    optimizer: str = 'sgd'  # sgd | adam, for student and assistants
    student_lr: float = 1e-5
    assistant_lr: float = 1e-5
    lr_decay: float = 0.999  # StepLR factor ...
    lr_decay_steps: int = 1000  # ... every this many steps (the reference: 0.999 per epoch)
    clip: float = 0.05  # gradient-norm clipping of both updates (0 disables)
    student_steps: int = 8  # the exported student's default sampler steps
    student_guidance: float = 3.5  # and its default guidance weight

    def validate(self, source: str) -> DistillConfig:
        self.train.validate(source)
        choices = (('method', METHODS), ('sign', SIGNS), ('preference_metric',
                   PREFERENCE_METRICS), ('t_weighting', T_WEIGHTINGS), ('optimizer',
                   ('sgd', 'adam')))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise UserError(f'{source}: field "{name}" must be one of {allowed}, '
                                f'got {getattr(self, name)!r}')
        if self.pair_noise_scale <= 0 or self.omega <= 0 or self.generation_steps < 1:
            raise UserError(f'{source}: fields "pair_noise_scale", "omega" and '
                            '"generation_steps" must be positive')
        if self.student_lr <= 0 or self.assistant_lr <= 0 or not 0 < self.lr_decay <= 1:
            raise UserError(f'{source}: learning rates must be > 0 and "lr_decay" in (0, 1]')
        return self


def student_config(teacher: ModelConfig, spec: ModelSpec, cfg: DistillConfig,
                   source: str) -> ModelConfig:
    """The student's config: the teacher's networks, the student's role and sampler defaults."""
    # The networks (and their normalisation) are the teacher's; the config states only the scale.
    require_same_networks(teacher, spec.build(), f'{source}: the teacher checkpoint',
                          fields=SCALE_FIELDS)
    return teacher.replace(role='student', steps=cfg.student_steps,
                           guidance=cfg.student_guidance, notes={})


def per_sample_metric(samples: torch.Tensor, gt: torch.Tensor, metric: str) -> np.ndarray:
    """The preference metric (lower is better) of every sample (B, N, 3) against gt (B, G, 3)."""
    from distdpo_ros import metrics

    fn = metrics.chamfer_distance if metric == 'cd' else metrics.jsd_bev
    pred = samples.detach().float().cpu().numpy()
    ref = gt.detach().float().cpu().numpy()
    return np.array([fn(p, g) for p, g in zip(pred, ref, strict=True)], dtype=np.float64)


def rank_pairs(first: torch.Tensor, second: torch.Tensor, gt: torch.Tensor, metric: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winners, losers, first_won (B,) bool): per scan, the sample with the lower metric wins."""
    first_won = torch.as_tensor(
        per_sample_metric(first, gt, metric) <= per_sample_metric(second, gt, metric),
        device=first.device)
    mask = first_won[:, None, None]
    return torch.where(mask, first, second), torch.where(mask, second, first), first_won


def surrogate_loss(x_w: torch.Tensor, x_l: torch.Tensor | None, d_w: torch.Tensor,
                   d_l: torch.Tensor | None, noise_w: torch.Tensor | None,
                   noise_l: torch.Tensor | None, sign: str, omega: float,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """The student's loss whose gradient is Eq. 18 (see the module docstring).

    x_*: student samples (with gradient); d_*: score differences eps_teacher - eps_assistant at the
    noised samples (no gradient); noise_*: sigma_t * eps (only for `released`); weight: optional
    (B,) per-sample factor. With x_l = None (score distillation) the loss is mean(d_w . x_w).
    """
    def term(x: torch.Tensor, d: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        d = d.detach()
        if sign == 'released':
            x = (x + noise) - x  # as in the released code: identically zero derivative
        per_sample = (d * x).flatten(1).mean(1)
        return (per_sample * weight).mean() if weight is not None else per_sample.mean()

    if x_l is None:
        return term(x_w, d_w, noise_w) / omega
    diff = term(x_l, d_l, noise_l) - term(x_w, d_w, noise_w)
    return (diff if sign in ('paper', 'released') else -diff) / omega


def diffusion_mse(net: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                  cond: Condition, schedule: NoiseSchedule) -> torch.Tensor:
    """The plain diffusion loss MSE(eps, eps_phi(x0 + sigma_t eps)) of the assistants (Eq. 20)."""
    return ((net(schedule.add_noise(x0, t, eps), t, cond) - eps) ** 2).mean()


class NoisePredictor(nn.Module):
    """A DiffusionNet used with a precomputed condition: eps(x_t, t, cond); encoder frozen."""

    def __init__(self, net: DiffusionNet) -> None:
        super().__init__()
        self.net = net
        net.encoder.requires_grad_(False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.net(x_t, t, cond)


def _draw(gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device
          ) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


def _draw_t(gens: list[torch.Generator], low: int, high: int, device: torch.device
            ) -> torch.Tensor:
    return torch.cat([torch.randint(low, high + 1, (1,), generator=g, device=device)
                      for g in gens])


class DistillTask:
    """Distillation-DPO (method dpo) or score distillation (method score) as an engine Task."""

    lower_is_better = True
    best_metric = 'cd'

    def __init__(self, cfg: DistillConfig, teacher: ModelBundle, source: str = 'config') -> None:
        self.cfg = cfg
        self.teacher_bundle = teacher
        self.model = student_config(teacher.config, cfg.model, cfg, source)
        self.schedule = NoiseSchedule.from_config(self.model)
        self.loop = 'distill' if cfg.method == 'dpo' else 'score-distill'
        last = (self.model.start_timestep if self.model.sampler in VE_SAMPLERS
                else self.model.num_train_timesteps - 1)
        self.t_range = (max(0, cfg.t_min), last if cfg.t_max < 0 else min(cfg.t_max, last))
        if self.t_range[0] > self.t_range[1]:
            raise UserError(f'{source}: fields "t_min" <= "t_max" required')

    # ---- set-up -------------------------------------------------------------------------------
    def _copy(self) -> DiffusionNet:
        net = DiffusionNet(self.model)
        net.load_state_dict(self.teacher_bundle.diffusion.state_dict())
        return net

    def _optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.cfg.optimizer == 'adam':
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr)

    def setup(self, engine: Engine) -> None:
        cfg = self.cfg
        self.teacher = engine.add_module('teacher', self._copy(), trainable=False)
        self.student = engine.add_module('student', NoisePredictor(self._copy()))
        names = ('assistant_w', 'assistant_l') if cfg.method == 'dpo' else ('assistant',)
        self.assistants = [engine.add_module(n, NoisePredictor(self._copy())) for n in names]
        for name in ('student', *names):  # BatchNorm keeps the teacher's statistics (docstring)
            engine.unwrap(name).eval()
        period = max(1, cfg.lr_decay_steps)
        student_opt = self._optimizer(
            [p for p in engine.unwrap('student').parameters() if p.requires_grad], cfg.student_lr)
        engine.add_optimizer('student', student_opt, torch.optim.lr_scheduler.StepLR(
            student_opt, period, cfg.lr_decay))
        params = [p for n in names for p in engine.unwrap(n).parameters() if p.requires_grad]
        assistant_opt = self._optimizer(params, cfg.assistant_lr)
        engine.add_optimizer('assistants', assistant_opt, torch.optim.lr_scheduler.StepLR(
            assistant_opt, period, cfg.lr_decay))

    def student_net(self, engine: Engine) -> DiffusionNet:
        return engine.unwrap('student').net

    # ---- one iteration ------------------------------------------------------------------------
    def generate(self, engine: Engine, scan: torch.Tensor, cond: Condition,
                 gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Student samples with gradient: (B*P, N, 3) for P = 2 (pair) or 1, and x_init."""
        x_init = initial_cloud(scan, self.model.replication)
        eps = _draw(gens, tuple(x_init.shape[1:]), engine.device)
        solver = make_solver_for(self.model, self.cfg.generation_steps)  # the model's sampler
        start = self.model.init_noise_scale * solver.start_scale
        scales = [1.0, self.cfg.pair_noise_scale] if self.cfg.method == 'dpo' else [1.0]
        pairs = len(scales)
        residual = torch.cat([eps * (s * start) for s in scales])
        x_init_p = x_init.repeat(pairs, 1, 1)
        cond_p = Condition.cat([cond] * pairs)
        for t in solver.timesteps:
            noise = (_draw(gens, tuple(x_init.shape[1:]), engine.device).repeat(pairs, 1, 1)
                     if solver.stochastic else None)
            t_batch = torch.full((residual.shape[0],), t, dtype=torch.long, device=engine.device)
            with engine.autocast():
                eps_hat = self.student(x_init_p + residual, t_batch, cond_p).float()
            residual = solver.step(eps_hat, residual, noise)
        # An immature student's one-step sample can land kilometres away (no gradient there).
        return clamp_to_scene_box(x_init_p + residual, self.model.max_range), x_init

    def train_step(self, engine: Engine, batch: dict[str, Any], gens: list[torch.Generator]
                   ) -> dict[str, torch.Tensor]:
        cfg, scan, gt = self.cfg, batch['scan'], batch['gt']
        batch_size = scan.shape[0]
        for module in (self.student, *self.assistants):  # the engine set train(): see docstring
            module.eval()
        seconds: dict[str, float] = {}
        clock = StageClock(engine.device, seconds)
        with torch.no_grad(), engine.autocast():
            cond = self.teacher.encode(scan)
        samples, _ = self.generate(engine, scan, cond, gens)
        clock.lap('generate')
        out: dict[str, torch.Tensor] = {}
        if cfg.method == 'dpo':
            first, second = samples.split(batch_size)
            x_w, x_l, first_won = rank_pairs(first, second, gt, cfg.preference_metric)
            out['first_won'] = first_won.float().mean()
            xs = [x_w, x_l]
        else:
            xs = [samples]
        clock.lap('metric')

        # assistants: one diffusion-loss step each on their (detached) samples
        shape = tuple(samples.shape[1:])
        losses = []
        for net, x in zip(self.assistants, xs, strict=True):
            t = _draw_t(gens, *self.t_range, engine.device)
            eps = _draw(gens, shape, engine.device)
            with engine.autocast():
                losses.append(diffusion_mse(net, x.detach(), t, eps, cond, self.schedule))
        loss_a = sum(losses)
        out['assistant_loss'] = loss_a.detach()
        out['assistant_grad'] = engine.optimize(loss_a, 'assistants', cfg.clip or None)
        clock.lap('assistants')

        # student: score differences at the noised samples with one shared t and eps
        t = _draw_t(gens, *self.t_range, engine.device)
        eps = _draw(gens, shape, engine.device)
        sigma = self.schedule.sigmas_on(engine.device)[t][:, None, None]
        noised = [x.detach() + sigma * eps for x in xs]
        with torch.no_grad(), engine.autocast():
            t_all = t.repeat(len(xs))
            eps_teacher = self.teacher(torch.cat(noised), t_all,
                                       Condition.cat([cond] * len(xs))).float()
            diffs = [e_t - net(x_t, t, cond).float() for e_t, net, x_t in
                     zip(eps_teacher.split(batch_size), self.assistants, noised, strict=True)]
        weight = 1.0 / sigma.flatten() if cfg.t_weighting == 'inverse_sigma' else None
        if cfg.method == 'dpo':
            loss_s = surrogate_loss(x_w, x_l, diffs[0], diffs[1], sigma * eps, sigma * eps,
                                    cfg.sign, cfg.omega, weight)
        else:
            loss_s = surrogate_loss(xs[0], None, diffs[0], None, sigma * eps, None, 'paper',
                                    cfg.omega, weight)
        out['student_loss'] = loss_s.detach()
        out['student_grad'] = engine.optimize(loss_s, 'student', cfg.clip or None)
        out['score_diff'] = torch.stack([d.abs().mean() for d in diffs]).mean()
        clock.lap('student')
        out.update({f'seconds_{k}': torch.tensor(v) for k, v in seconds.items()})
        return out

    # ---- validation and export ----------------------------------------------------------------
    def validate(self, engine: Engine, item: dict[str, Any], index: int) -> dict[str, float]:
        return validate_completion(engine, self.student_net(engine), self.model,
                                   self.cfg.validation, item, index, self.loop)

    def export(self, engine: Engine, out_dir: Path, info: dict[str, Any]) -> None:
        notes = {'trained_by': f'distdpo train {self.loop}', 'method': self.cfg.method,
                 'sign': self.cfg.sign, 'preference_metric': self.cfg.preference_metric,
                 'pair_noise_scale': self.cfg.pair_noise_scale,
                 'teacher': self.teacher_bundle.config.notes.get('source', self.cfg.teacher),
                 **{k: v for k, v in info.items() if v is not None}}
        config = dataclasses.replace(self.model, notes=notes,
                                     has_refine=self.teacher_bundle.refine is not None)
        net = copy.deepcopy(self.student_net(engine)).cpu()
        refine = self.teacher_bundle.refine
        save_model(out_dir, ModelBundle(config=config, diffusion=net, refine=refine),
                   overwrite=True)


def load_teacher(path: str) -> ModelBundle:
    """The teacher model bundle (our format, or a name such as `default-teacher`)."""
    if not path:
        raise UserError('no teacher given: pass --teacher DIR (a model checkpoint directory)')
    return load_model(path)


def run_distillation(args: argparse.Namespace, method: str) -> int:
    """`distdpo train distill` / `score-distill` (`method` 'dpo' / 'score') from parsed options
    (those of :func:`distdpo_training.engine.runner.add_train_arguments` plus `teacher`)."""
    from distdpo_training.engine.runner import completion_datasets, config_from_args, run_task

    overrides = [*args.set, *([f'teacher={args.teacher}'] if args.teacher else [])]
    args = argparse.Namespace(**{**vars(args), 'set': [*overrides, f'method={method}']})
    cfg = config_from_args(DistillConfig, args)
    task = DistillTask(cfg, load_teacher(cfg.teacher), str(args.config))
    train_set, val_set = completion_datasets(args.data, cfg.data, task.model, cfg.train.seed)
    return run_task(task, cfg, args, train_set, val_set)
