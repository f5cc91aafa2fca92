"""`distdpo train diffusion-dpo` (paper Eq. 10): the loss, the pair ranking, one descent step
through the net, and a short run that starts at log 2 (policy = reference), caches CD-ranked
pairs and exports a model the Completer loads."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from distdpo_ros.checkpoint import ModelBundle, save_model
from distdpo_ros.cli import main as distdpo
from distdpo_ros.config import preset
from distdpo_ros.diffusion.schedule import NoiseSchedule
from distdpo_training.engine import read_log
from distdpo_training.loops.diffusion_dpo import dpo_loss, per_sample_error, rank_pair


def test_dpo_loss_prefers_lower_policy_error_on_winners() -> None:
    same = torch.tensor([1.0, 1.0])
    loss, acc = dpo_loss(same, same, same, same, beta=100.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and acc.item() == 0.0
    err_w = torch.tensor([0.9, 0.9], requires_grad=True)
    loss, acc = dpo_loss(err_w, same, same, same, beta=10.0)
    assert loss.item() < math.log(2) and acc.item() == 1.0
    (grad,) = torch.autograd.grad(loss, err_w)
    assert (grad > 0).all()  # lowering the winner's error lowers the loss further


def test_winner_is_the_completion_closer_to_the_ground_truth() -> None:
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(500, 3))
    near, far = gt + 0.01, gt + 0.5
    win, lose, cd_w, cd_l = rank_pair(far, near, gt)
    assert win is near and lose is far and cd_w < cd_l
    win, _, _, _ = rank_pair(far, near, far)  # swap the ground truth: the roles swap
    assert win is far


def test_a_dpo_step_lowers_eq10_on_its_batch() -> None:
    """One Adam step on Eq. 10 through the tiny net, policy BatchNorm frozen as in the loop:
    starts at log 2 (policy = reference) and lowers the loss on the same pair and noise."""
    from distdpo_ros.models import DiffusionNet
    from distdpo_training.loops.teacher import ConditionedDenoiser

    config = preset('tiny', 'teacher')
    torch.manual_seed(0)
    policy = ConditionedDenoiser(DiffusionNet(config)).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    scan = 10 * torch.randn(1, config.scan_points, 3, generator=g)
    gt = scan.repeat(1, config.replication, 1)
    win, lose = gt + 0.05 * torch.randn(gt.shape, generator=g), gt + 0.5
    t, eps = torch.tensor([300]), torch.randn(gt.shape, generator=g)
    x_t = NoiseSchedule.from_config(config).add_noise(torch.cat([win, lose]), t.repeat(2),
                                                      eps.repeat(2, 1, 1))
    inputs, target = (x_t, t.repeat(2), scan.repeat(2, 1, 1)), eps.repeat(2, 1, 1)

    def loss() -> torch.Tensor:
        err, ref = per_sample_error(policy(*inputs), target), \
            per_sample_error(reference(*inputs), target)
        return dpo_loss(err[:1], err[1:], ref[:1], ref[1:], beta=2000.0)[0]

    opt = torch.optim.Adam(policy.parameters(), lr=1e-4)
    before = loss()
    assert math.isclose(before.item(), math.log(2), rel_tol=1e-5)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item() - 1e-3


def test_diffusion_dpo_fine_tunes_toward_the_winners(sim_dataset: Path, tmp_path: Path) -> None:
    from distdpo_ros.completion import Completer
    from distdpo_ros.models import DiffusionNet

    config = preset('tiny', 'teacher')
    torch.manual_seed(0)
    teacher = save_model(tmp_path / 'teacher', ModelBundle(config, DiffusionNet(config)))
    out = tmp_path / 'run'
    assert distdpo(['train', 'diffusion-dpo', '--config', 'diffusion_dpo_tiny', '--data',
                    str(sim_dataset), '--out', str(out), '--teacher', str(teacher),
                    '--max-steps', '6', '--set', 'lr=1e-3', '--set', 'train.val_every=0',
                    '--set', 'train.val_at_start=false']) == 0
    loss = [r['loss'] for r in read_log(out / 'log.jsonl')]
    assert math.isclose(loss[0], math.log(2), abs_tol=1e-3)  # the policy starts as the reference
    pairs = sorted((out / 'pairs').glob('*.npz'))
    assert len(pairs) == 6
    with np.load(pairs[0], allow_pickle=False) as z:
        assert z['cd'][0] <= z['cd'][1] and z['win'].shape == (config.full_points, 3)
    acc = [r['implicit_acc'] for r in read_log(out / 'log.jsonl')]
    assert all(0.0 <= a <= 1.0 for a in acc)
    completer = Completer.from_pretrained(out / 'model' / 'last', device='cpu')
    assert completer.config.notes['trained_by'] == 'distdpo train diffusion-dpo'
