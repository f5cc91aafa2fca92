"""Fine-tuning a teacher with Diffusion-DPO (paper Eq. 10; Wallace et al.), on the engine.

Preference pairs (off-policy, fixed before training as in Diffusion-DPO): for every training scan
the frozen reference model (the teacher) completes the scan twice with different seeds; the
completion with the lower Chamfer distance to the ground truth is the winner x^w, the other the
loser x^l (raw samples against the training ground-truth crop, as Distillation-DPO ranks its
pairs). Pairs are generated once at the start of the run into OUT/pairs/ (one .npz per scan,
written atomically, shared out over the torchrun ranks, skipped when already there, so a resumed
run reuses them).

Loss per pair, with one t ~ U{0..T-1} and one eps shared by winner and loser (as in the
Diffusion-DPO implementation), x_t = x + sigma_t * eps (local noising), e(m, x) = mean
||eps - eps_m(x_t, t)||^2:

    L = -log sigmoid(-beta * ([e(policy, x^w) - e(ref, x^w)] - [e(policy, x^l) - e(ref, x^l)]))

Eq. 10's T * omega(lambda_t) is taken constant and folded into beta (configurable). The policy
starts as a copy of the reference and, by default, keeps its BatchNorm in eval mode (running
statistics, as the frozen reference uses them), so the two agree exactly at the start;
minimising L lowers its denoising error on winners relative to the reference and raises it on
losers. Logged: the loss, the implicit accuracy (share of pairs
whose policy margin already favours the winner) and the reference MSE on both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from distdpo_ros.atomic import write_bytes_atomic
from distdpo_ros.completion import sample
from distdpo_ros.diffusion.schedule import NoiseSchedule
from distdpo_ros.errors import UserError
from distdpo_ros.metrics import chamfer_distance
from distdpo_ros.settings import SamplingSettings
from distdpo_training.engine import Engine, EngineConfig, ModelSpec
from distdpo_training.engine import distributed as D
from distdpo_training.engine.data import derive_seed
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
class PairConfig:
    """How the reference model generates the preference pairs."""

    steps: int = 0  # sampler steps; 0: the model's default (teacher 50)
    guidance: float = -1.0  # < 0: the model's default (teacher 6)


@dataclass
class DiffusionDPOConfig:
    """`distdpo train diffusion-dpo` (configs/diffusion_dpo_*.yaml)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    train: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    teacher: str = ''  # the model to fine-tune (also the frozen reference); --teacher
    beta: float = 2000.0
    cond_drop_prob: float = 0.0
    lr: float = 1e-5
    lr_decay: float = 1.0
    lr_decay_epochs: float = 5.0
    lr_decay_steps: int = 0
    grad_clip: float = 1.0  # 0: no clipping
    freeze_batchnorm: bool = True  # policy BatchNorm uses the running statistics, as the reference

    def validate(self, source: str) -> DiffusionDPOConfig:
        self.train.validate(source)
        if not self.teacher:
            raise UserError(f'{source}: no teacher to fine-tune; pass --teacher MODEL_DIR')
        if self.beta <= 0 or self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise UserError(f'{source}: fields "beta" and "lr" must be > 0, "lr_decay" in (0, 1]')
        if not 0.0 <= self.cond_drop_prob < 1.0 or self.grad_clip < 0:
            raise UserError(f'{source}: "cond_drop_prob" must be in [0, 1), "grad_clip" >= 0')
        self.model.build()
        return self


class PreferencePairs(Dataset):
    """Items of a completion dataset with the winner and loser stored in OUT/pairs."""

    def __init__(self, base: Dataset, folder: Path) -> None:
        self.base, self.folder = base, Path(folder)

    def __len__(self) -> int:
        return len(self.base)

    def path(self, index: int) -> Path:
        return self.folder / f'{index:07d}.npz'

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.path(index)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in ('scan', 'gt', 'win', 'lose')}
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f'{path}: unreadable preference pair ({exc}); delete it to have it '
                            'generated again') from exc


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}


def rank_pair(a: np.ndarray, b: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                     float, float]:
    """(winner, loser, CD winner, CD loser): lower Chamfer distance to gt wins."""
    cd_a, cd_b = chamfer_distance(a, gt), chamfer_distance(b, gt)
    return (a, b, cd_a, cd_b) if cd_a <= cd_b else (b, a, cd_b, cd_a)


def generate_pairs(engine: Engine, net: torch.nn.Module, pairs: PreferencePairs,
                   cfg: DiffusionDPOConfig) -> None:
    """Write the missing pair files (this rank's share), then wait for all ranks."""
    model = pairs.base.config
    settings = SamplingSettings.from_parameters(cfg.pairs.steps, cfg.pairs.guidance)
    mine = [i for i in range(engine.dist.rank, len(pairs), engine.dist.world_size)
            if not pairs.path(i).is_file()]
    bar = tqdm(mine, desc='preference pairs', unit='scan', disable=not engine.is_main)
    for i in bar:
        item = pairs.base[i]
        scan = torch.as_tensor(item['scan'], device=engine.device)[None]
        clouds = []
        for k in range(2):
            g = torch.Generator(device=engine.device)
            g.manual_seed(derive_seed(engine.cfg.seed, 'pair', i, k))
            with torch.no_grad(), engine.autocast():
                raw = sample(net, scan, model, steps=settings.steps, generators=g,
                             guidance=settings.guidance)
            clouds.append(raw[0].float().cpu().numpy())
        win, lose, cd_win, cd_lose = rank_pair(clouds[0], clouds[1], item['gt'])
        buffer = _npz_bytes(scan=item['scan'], gt=item['gt'], win=win, lose=lose,
                            cd=np.array([cd_win, cd_lose]))
        write_bytes_atomic(pairs.path(i), buffer)
    D.barrier(engine.dist)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def per_sample_error(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mean ||eps - eps_hat||^2 over the points of each sample: (B,)."""
    return ((eps_hat.float() - eps.float()) ** 2).flatten(1).mean(1)


def dpo_loss(err_policy_w: torch.Tensor, err_policy_l: torch.Tensor, err_ref_w: torch.Tensor,
             err_ref_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 per pair (mean over pairs) and the implicit accuracy (see module docstring)."""
    margin = (err_policy_w - err_ref_w) - (err_policy_l - err_ref_l)
    loss = -F.logsigmoid(-beta * margin).mean()
    return loss, (margin < 0).float().mean()


class DiffusionDPOTask:
    """Diffusion-DPO fine-tuning as an engine Task (see the module docstring)."""

    best_metric, lower_is_better = 'cd', True
    loop = 'diffusion-dpo'

    def __init__(self, cfg: DiffusionDPOConfig, pairs: PreferencePairs) -> None:
        self.cfg, self.pairs = cfg, pairs
        self.model = cfg.model.build()
        self.schedule = NoiseSchedule.from_config(self.model)

    def setup(self, engine: Engine) -> None:
        net = load_initial_net(self.cfg.teacher, self.model)
        reference = copy.deepcopy(net)
        self.reference = engine.add_module('reference', ConditionedDenoiser(reference),
                                           trainable=False)
        generate_pairs(engine, self.reference.net, self.pairs, self.cfg)  # only missing ones
        self.policy = engine.add_module('policy', ConditionedDenoiser(net))
        opt = torch.optim.Adam(net.parameters(), lr=self.cfg.lr)
        engine.add_optimizer('adam', opt, lr_schedule(
            opt, self.cfg.lr_decay, decay_period(self.cfg, engine.steps_per_epoch)))

    def train_step(self, engine: Engine, batch: dict[str, Any], gens: list[torch.Generator]
                   ) -> dict[str, torch.Tensor]:
        win, lose, scan = batch['win'], batch['lose'], batch['scan']
        n = len(gens)
        t = torch.cat([torch.randint(self.model.num_train_timesteps, (1,), generator=g,
                                     device=engine.device) for g in gens])
        drop = torch.cat([torch.rand(1, generator=g, device=engine.device)
                          < self.cfg.cond_drop_prob for g in gens])
        eps = torch.stack([torch.randn(win.shape[1:], generator=g, device=engine.device)
                           for g in gens])
        x_t = self.schedule.add_noise(torch.cat([win, lose]), t.repeat(2), eps.repeat(2, 1, 1))
        inputs = (x_t, t.repeat(2), drop_conditions(scan, drop).repeat(2, 1, 1))
        target = eps.repeat(2, 1, 1)
        with torch.no_grad(), engine.autocast():
            err_ref = per_sample_error(self.reference(*inputs), target)
        if self.cfg.freeze_batchnorm:
            self.policy.eval()  # same normalisation as the reference: the margin starts at 0
        with engine.autocast():
            err = per_sample_error(self.policy(*inputs), target)
        loss, accuracy = dpo_loss(err[:n], err[n:], err_ref[:n], err_ref[n:], self.cfg.beta)
        grad_norm = engine.optimize(loss, 'adam', clip=self.cfg.grad_clip or None)
        return {'loss': loss.detach(), 'implicit_acc': accuracy, 'grad_norm': grad_norm,
                'mse_win': err[:n].mean().detach(), 'mse_lose': err[n:].mean().detach(),
                'ref_mse_win': err_ref[:n].mean(), 'ref_mse_lose': err_ref[n:].mean()}

    def validate(self, engine: Engine, item: dict[str, Any], index: int) -> dict[str, float]:
        return validate_completion(engine, engine.unwrap('policy').net, self.model,
                                   self.cfg.validation, item, index, self.loop)

    def export(self, engine: Engine, out_dir: Path, info: dict[str, Any]) -> None:
        info = {**info, 'reference': str(self.cfg.teacher), 'beta': self.cfg.beta}
        export_diffusion(out_dir, engine.unwrap('policy').net, self.model, self.loop, info)
