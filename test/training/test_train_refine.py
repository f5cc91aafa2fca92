"""`distdpo train refine`: the pytorch3d-free Chamfer loss, the aggregated data, and a short run
whose exported model (teacher + refinement) refines completions through the Completer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from distdpo_ros.checkpoint import ModelBundle, save_model
from distdpo_ros.cli import main as distdpo
from distdpo_ros.config import preset
from distdpo_training.engine import read_log
from distdpo_training.loops.refine import (
    AggregationConfig,
    RefineDataset,
    chamfer_loss,
    nearest_index,
)


def brute_chamfer(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(p, q) ** 2
    return d.min(2).values.mean(1).add(d.min(1).values.mean(1)).mean()


def test_chamfer_loss_and_gradient_match_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 300, 3, generator=g, requires_grad=True)
    q = torch.randn(2, 500, 3, generator=g, requires_grad=True)
    ours = chamfer_loss(p, q)
    (gp, gq) = torch.autograd.grad(ours, (p, q))
    ref = brute_chamfer(p, q)
    (rp, rq) = torch.autograd.grad(ref, (p, q))
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(gp, rp, atol=1e-6) and torch.allclose(gq, rq, atol=1e-6)
    assert torch.equal(nearest_index(p[0].detach(), p[0].detach()), torch.arange(300))


def test_refine_items_are_jittered_aggregates(sim_dataset: Path) -> None:
    config = preset('tiny', 'refine')
    agg = AggregationConfig(window=3)
    data = RefineDataset(sim_dataset, ['00'], config, agg, augment=False, seed=0)
    assert list(data.window(data.sequences[0], 0)) == [0, 1, 2]
    assert list(data.window(data.sequences[0], 5)) == [3, 4, 5]
    item = data[2]
    assert item['noisy'].shape == (config.full_points, 3)
    assert item['clean'].shape == (2 * config.full_points, 3)
    clean = data.aggregate(data.sequences[0], 2)
    assert np.linalg.norm(clean, axis=1).max() < config.max_range
    # every noisy point is a clean point moved by the clipped jitter (at most 0.3 m per axis)
    offsets, _ = cKDTree(clean).query(item['noisy'], p=np.inf)
    assert offsets.max() <= 0.3 + 1e-4 and offsets.mean() > 0.05
    again = data[2]
    assert np.array_equal(item['noisy'], again['noisy'])  # seeded per (seed, epoch, index)


def test_refine_learns_and_the_completer_refines(sim_dataset: Path, tmp_path: Path) -> None:
    from distdpo_ros.completion import Completer
    from distdpo_training.data.kitti import KittiSequence

    config = preset('tiny', 'teacher')
    torch.manual_seed(0)
    from distdpo_ros.models import DiffusionNet

    teacher = save_model(tmp_path / 'teacher', ModelBundle(config, DiffusionNet(config)))
    out = tmp_path / 'run'
    assert distdpo(['train', 'refine', '--config', 'refine_tiny', '--data', str(sim_dataset),
                    '--out', str(out), '--max-steps', '20', '--teacher', str(teacher),
                    '--set', 'train.val_every=20']) == 0
    loss = [r['loss'] for r in read_log(out / 'log.jsonl')]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5])
    val = read_log(out / 'log.jsonl', kind='val')
    assert val[-1]['cd'] < val[0]['cd']
    completer = Completer.from_pretrained(out / 'model' / 'last', device='cpu')
    assert completer.has_refine
    assert completer.config.notes['refine']['trained_by'] == 'distdpo train refine'
    scan = KittiSequence(sim_dataset / 'sequences' / '01').scan(0)
    plain = completer.complete(scan, steps=1, seed=0)
    refined = completer.complete(scan, steps=1, seed=0, refine=True)
    assert len(refined) == 6 * len(plain)
