"""LiDiff's networks: checkpoint layout, reference data flow, guidance batching, refinement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distdpo_ros.config import preset
from distdpo_ros.models import (
    Condition,
    DiffusionNet,
    MinkGlobalEnc,
    MinkUNet,
    MinkUNetDiff,
    RefineNet,
    identical_groups,
    timestep_embedding,
)
from distdpo_ros.sparse import SparseGroupNorm, SparseTensor, cat, minkowski, quantize

PARAMETERS = {'MinkUNetDiff': 24_174_515, 'MinkGlobalEnc': 8_497_952,
              'MinkUNet_refine': 21_722_926}


def build(name: str, channel_ratio: float = 1.0) -> torch.nn.Module:
    if name == 'MinkUNetDiff':
        return MinkUNetDiff(channel_ratio=channel_ratio)
    if name == 'MinkGlobalEnc':
        return MinkGlobalEnc(channel_ratio=channel_ratio)
    return MinkUNet(out_channels=18, channel_ratio=channel_ratio)


def layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    params = {name for name, _ in model.named_parameters()}
    return [(k, tuple(v.shape), 'param' if k in params else 'buffer')
            for k, v in model.state_dict().items()]


def parse_manifest(path: Path) -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
    sections: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if not line or line.startswith('#'):
            continue
        if line.startswith('['):
            current = line[1:line.index(']')]
            sections[current] = []
            continue
        key, shape, kind = line.split('\t')
        sections[current].append((key, tuple(int(s) for s in shape.split(',') if s), kind))
    return sections


@pytest.mark.parametrize('name', list(PARAMETERS))
def test_parameter_counts_match_lidiff(name: str) -> None:
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


@pytest.mark.parametrize('name', list(PARAMETERS))
def test_state_dict_equals_reference_manifest(name: str, shared_data: Path) -> None:
    manifest = shared_data.parent / 'reference' / 'lidiff_state_dict_manifest.txt'
    if not manifest.is_file():
        pytest.skip(f'reference manifest not available: {manifest}')
    expected = parse_manifest(manifest)[name]
    assert layout(build(name)) == expected


def test_channel_ratio_scales_every_width_and_keeps_the_keys() -> None:
    full, half = MinkUNetDiff(), MinkUNetDiff(channel_ratio=0.5)
    assert list(full.state_dict()) == list(half.state_dict())
    shapes = {k: tuple(v.shape) for k, v in half.state_dict().items()}
    assert shapes['stem.0.kernel'] == (27, 3, 16)
    assert shapes['latemp_up3.0.weight'] == (64, 256)  # 512 * cr -> cs[6]
    assert shapes['stage1_temp.0.weight'] == (48, 48)  # time embedding = cs[-1]
    assert shapes['up1.1.0.downsample.0.kernel'] == (192, 128)
    assert shapes['last.0.weight'] == (20, 48)  # the head's 20 is not scaled


def test_timestep_embedding_matches_lidiff_formula() -> None:
    t = torch.tensor([0, 1, 500, 999])
    emb = timestep_embedding(t, 96)
    freq = np.exp(np.arange(48) * -(math.log(10000) / 47)).astype(np.float32)
    args = t.numpy()[:, None].astype(np.float32) * freq[None]
    expected = np.concatenate([np.sin(args), np.cos(args)], 1)
    assert emb.shape == (4, 96)
    assert np.abs(emb.numpy() - expected).max() < 1e-5
    assert timestep_embedding(t, 25).shape == (4, 25)  # odd widths are zero-padded


def scene(points: int, seed: int, spread: float = 6.0) -> torch.Tensor:
    """A small scan-like cloud: a ground plane and a few walls, in metres."""
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(points, 2, generator=g) - 0.5) * 2 * spread
    z = torch.where(torch.rand(points, generator=g) < 0.6, torch.full((points,), -1.7),
                    torch.rand(points, generator=g) * 3 - 1.7)
    return torch.cat([xy, z[:, None]], 1) + 0.02 * torch.randn(points, 3, generator=g)


def reference_denoiser(net: MinkUNetDiff, x: SparseTensor, cond: Condition,
                       t: torch.Tensor) -> torch.Tensor:
    """LiDiff's forward written voxel by voxel as in the reference (match, gather, then MLPs)."""
    temb = timestep_embedding(t, net.embed_dim)

    def modulate(name: str, h: SparseTensor) -> SparseTensor:
        q, ref = h.coords, cond.coords
        d2 = ((q[:, None, 1:] - ref[None, :, 1:]) ** 2).sum(-1).double()
        d2[q[:, :1] != ref[None, :, 0]] = float('inf')
        p = getattr(net, f'latent_{name}')(cond.feats[d2.argmin(1)])
        tau = getattr(net, f'{name}_temp')(temb)[q[:, 0]]
        pair = (tau, p) if name == 'up1' else (p, tau)
        return h * getattr(net, f'latemp_{name}')(torch.cat(pair, 1))

    x0 = net.stem(x)
    x1 = net.stage1(modulate('stage1', x0))
    x2 = net.stage2(modulate('stage2', x1))
    x3 = net.stage3(modulate('stage3', x2))
    x4 = net.stage4(modulate('stage4', x3))
    y1 = net.up1[1](cat(net.up1[0](modulate('up1', x4)), x3))
    y2 = net.up2[1](cat(net.up2[0](modulate('up2', y1)), x2))
    y3 = net.up3[1](cat(net.up3[0](modulate('up3', y2)), x1))
    y4 = net.up4[1](cat(net.up4[0](modulate('up4', y3)), x0))
    return net.last(y4.feats)


@pytest.fixture(scope='module')
def tiny_net() -> DiffusionNet:
    torch.manual_seed(0)
    net = DiffusionNet(preset('tiny'))
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.BatchNorm1d):  # eval-mode BN that is not an identity
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.05, 0.2)
            if isinstance(m, torch.nn.Linear) and 'latemp' in name:  # a strong condition
                m.weight.mul_(4.0)
    return net.eval()


def test_denoiser_equals_reference_data_flow(tiny_net: DiffusionNet) -> None:
    scans = torch.stack([scene(150, 1), scene(150, 2, 4.0)])
    x_t = torch.stack([scene(300, 3, 8.0), scene(300, 4, 7.0)])
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = tiny_net.encode(scans)
        x, _ = quantize(x_t, tiny_net.resolution)
        ours = tiny_net.denoiser(x, cond, t)
        expected = reference_denoiser(tiny_net.denoiser, x, cond, t)
    assert (ours - expected).abs().max().item() < 1e-4


def test_condition_and_null_condition(tiny_net: DiffusionNet) -> None:
    with torch.no_grad():
        cond = tiny_net.encode(torch.stack([scene(200, 5), scene(200, 6)]))
        null = tiny_net.null_condition(2)
    assert cond.batch_size == 2 and cond.stride == 16
    assert cond.feats.shape[1] == tiny_net.encoder.out_channels
    assert bool((cond.coords[:, 1:] % 16 == 0).all())
    assert set(cond.batch.tolist()) == {0, 1}
    # The all-zero cloud is one voxel at the origin per item (reference §2.4).
    assert null.coords.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    both = Condition.cat([cond, null])
    assert both.batch_size == 4 and both.batch.max().item() == 3


def test_guidance_batch_equals_two_separate_passes(tiny_net: DiffusionNet) -> None:
    scan = scene(200, 7)[None]
    x_t = scene(600, 8, 7.0)[None]
    with torch.no_grad():
        cond, null = tiny_net.encode(scan), tiny_net.null_condition(1)
        both = Condition.cat([cond, null])
        pair = x_t.expand(2, -1, -1)
        assert identical_groups(pair) == 2 and identical_groups(torch.cat([x_t, -x_t])) == 1
        shared = tiny_net(pair, torch.tensor([300, 300]), both)
        unshared = tiny_net(pair, torch.tensor([300, 300]), both, share_geometry=False)
        eps_c = tiny_net(x_t, torch.tensor([300]), cond)
        eps_u = tiny_net(x_t, torch.tensor([300]), null)
    assert shared.shape == (2, 600, 3)
    assert (shared[0] - eps_c[0]).abs().max().item() < 1e-5
    assert (shared[1] - eps_u[0]).abs().max().item() < 1e-5
    assert (shared - unshared).abs().max().item() < 1e-5
    assert (eps_c - eps_u).abs().max().item() > 1e-4  # the condition matters


def test_points_in_one_voxel_share_the_prediction(tiny_net: DiffusionNet) -> None:
    x_t = scene(100, 9)[None]
    x_t = torch.cat([x_t, x_t[:, :1] + 0.01], 1)  # a second point in the first point's voxel
    with torch.no_grad():
        eps = tiny_net(x_t, torch.tensor([5]), tiny_net.encode(scene(80, 10)[None]))
    assert torch.equal(eps[0, 0], eps[0, -1])


def test_training_step_reaches_encoder_and_denoiser() -> None:
    torch.manual_seed(1)
    net = DiffusionNet(preset('tiny')).train()
    cond = net.encode(torch.stack([scene(150, 11), scene(150, 12)]))
    eps = net(torch.stack([scene(300, 13), scene(300, 14)]), torch.tensor([3, 900]), cond)
    loss = (eps - torch.randn_like(eps)).pow(2).mean()
    loss.backward()
    for name in ('encoder.stem.0.kernel', 'encoder.stage4.2.net.3.kernel',
                 'denoiser.latemp_up1.0.weight', 'denoiser.up4.0.net.0.kernel'):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_sparse_group_norm_is_torch_group_norm_per_item() -> None:
    """Each item (geometry item x replica) is normalised alone, as F.group_norm on its voxels."""
    torch.manual_seed(4)
    x, _ = quantize(torch.stack([scene(300, 21), scene(300, 22, 1.0)]), 0.2, replicas=2)
    x = x.with_feats(torch.randn(x.feats.shape[0], 24) * 3 + 1)
    norm = SparseGroupNorm(24, groups=8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    out = norm(x).feats
    items = x.item_ids()
    assert len(set(items.tolist())) == 4
    for item in range(4):
        rows = items == item
        expected = torch.nn.functional.group_norm(x.feats[rows].T[None], 8, norm.weight,
                                                  norm.bias, eps=norm.eps)[0].T
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-4)
    assert SparseGroupNorm(20, groups=8).groups == 4  # the largest divisor of the width <= 8


@pytest.mark.parametrize('norm', ['batch', 'group'])
def test_norm_config_selects_the_layers_and_their_names(norm: str) -> None:
    net = DiffusionNet(preset('tiny').replace(norm=norm))
    kinds = {type(m).__name__ for m in net.modules()}
    assert ('SparseGroupNorm' in kinds) == (norm == 'group')
    assert ('SparseBatchNorm' in kinds) == (norm == 'batch')
    keys = list(net.state_dict())
    if norm == 'batch':  # LiDiff's names, running statistics included
        assert 'denoiser.stem.1.bn.running_mean' in keys
    else:  # same module paths, no running statistics
        assert 'denoiser.stem.1.weight' in keys and not any('running' in k for k in keys)
    assert len([k for k in keys if k.endswith('kernel')]) == len(
        [k for k in DiffusionNet(preset('tiny')).state_dict() if k.endswith('kernel')])


def test_group_norm_net_computes_the_same_in_train_and_eval_mode_at_every_t() -> None:
    """Per-item GroupNorm has no running statistics: after training steps the predictions in eval
    mode equal those in train mode at every noise level (a BatchNorm net's differ)."""
    results = {}
    for norm in ('batch', 'group'):
        torch.manual_seed(5)
        net = DiffusionNet(preset('tiny').replace(norm=norm)).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gt = torch.stack([scene(300, 23), scene(300, 24)])
        scans = torch.stack([scene(150, 25), scene(150, 26)])
        sigmas = torch.linspace(0.05, 1.0, 2)
        for _ in range(3):  # training moves BatchNorm's running statistics away from the batch's
            eps = torch.randn_like(gt)
            loss = (net(gt + sigmas[:, None, None] * eps, torch.tensor([40, 900]),
                        net.encode(scans)) - eps).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        gaps = []
        with torch.no_grad():
            for t, sigma in ((5, 0.01), (100, 0.2), (500, 0.77), (999, 0.99)):
                x_t = gt + sigma * torch.randn_like(gt)
                tt = torch.full((2,), t)
                net.train()
                train_mode = net(x_t, tt, net.encode(scans))
                net.eval()
                eval_mode = net(x_t, tt, net.encode(scans))
                gaps.append((train_mode - eval_mode).abs().max().item())
        results[norm] = max(gaps)
    assert results['group'] < 1e-5
    assert results['batch'] > 1e-2


def test_group_norm_items_do_not_see_each_other() -> None:
    """A scene's prediction does not depend on the other scenes of the batch, nor on the other
    branch of guidance (replicas are separate items)."""
    torch.manual_seed(6)
    net = DiffusionNet(preset('tiny').replace(norm='group')).eval()
    scans = torch.stack([scene(150, 27), scene(150, 28, 3.0)])
    x_t = torch.stack([scene(300, 29), scene(300, 30, 9.0)])
    t = torch.tensor([200, 700])
    with torch.no_grad():
        both = net(x_t, t, net.encode(scans))
        alone = net(x_t[1:], t[1:], net.encode(scans[1:]))
        pair = net(x_t[:1].expand(2, -1, -1), t[:1].expand(2),
                   Condition.cat([net.encode(scans[:1]), net.null_condition(1)]))
        cond_only = net(x_t[:1], t[:1], net.encode(scans[:1]))
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pair[:1], cond_only, atol=1e-5, rtol=1e-4)


def test_refine_net_offsets() -> None:
    torch.manual_seed(2)
    net = RefineNet(preset('tiny')).eval()
    assert net.model.last[2].out_features == 3 * net.up_factor
    pts = torch.stack([scene(200, 15), scene(200, 16)])
    with torch.no_grad():
        off = net(pts)
    assert off.shape == (2, 200, net.up_factor, 3)
    assert off.abs().max().item() <= 1.0


def test_bench_backbone_prints_measurements(capsys: pytest.CaptureFixture[str]) -> None:
    from distdpo_ros.cli import main

    code = main(['bench', 'backbone', '--scales', 'tiny', '--runs', '1', '--timesteps', '999,5',
                 '--train', '--threads', '1', '--json'])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    (tiny,) = report['results']
    assert tiny['scale'] == 'tiny' and tiny['points'] == preset('tiny').full_points
    assert [e['t'] for e in tiny['timesteps']] == [999, 5]
    assert all(e['voxels'] > 0 and e['wall_s'] > 0 for e in tiny['timesteps'])
    assert tiny['train_step']['batch'] == 2 and tiny['train_step']['wall_s'] > 0
    assert main(['bench', 'backbone', '--scales', 'huge']) == 2


@pytest.mark.skipif(not minkowski.available(),
                    reason='MinkowskiEngine is not installed (optional accelerator)')
def test_networks_match_minkowski_engine(tiny_net: DiffusionNet) -> None:
    torch.manual_seed(3)
    refine = RefineNet(preset('tiny')).eval()
    pts = torch.stack([scene(400, 17), scene(400, 18, 5.0)])
    with torch.no_grad():
        expected = minkowski.minkowski_forward(minkowski.to_minkowski(refine.model).eval(), pts,
                                               resolution=refine.resolution)
        got = refine(pts).reshape(800, -1)
        assert (got - expected).abs().max().item() < 1e-4
        cond = tiny_net.encode(torch.stack([scene(150, 19), scene(150, 20, 4.0)]))
        t = torch.tensor([50, 800])
        expected = minkowski.minkowski_forward(
            minkowski.to_minkowski(tiny_net.denoiser).eval(), pts, cond, t, tiny_net.resolution)
        got = tiny_net(pts, t, cond).reshape(800, 3)
        assert (got - expected).abs().max().item() < 1e-4
