"""The plain-PyTorch sparse backend against dense PyTorch convolutions and brute force."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from distdpo_ros.sparse import (
    CoordinateManager,
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseTensor,
    cat,
    nearest_reference,
    neighbours,
    quantize,
)

TOL = 1e-4


def random_coords(batch: int = 3, low: int = -7, high: int = 7, fill: float = 0.35,
                  seed: int = 0) -> torch.Tensor:
    """Unique (batch, x, y, z) rows on a small grid with negative coordinates."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(low, high)
    grid = torch.cartesian_prod(torch.arange(batch), r, r, r)
    keep = torch.rand(len(grid), generator=g) < fill
    return grid[keep]


def to_dense(x: SparseTensor, origin: torch.Tensor, size: int) -> torch.Tensor:
    """Scatter features (R = 1) into a [B, C, X, Y, Z] grid in units of the tensor stride."""
    c = x.coords
    idx = torch.div(c[:, 1:] - origin, x.stride, rounding_mode='floor')
    dense = torch.zeros(x.manager.batch_size, x.feats.shape[1], size, size, size,
                        dtype=x.feats.dtype)
    dense[c[:, 0], :, idx[:, 0], idx[:, 1], idx[:, 2]] = x.feats
    return dense


def read_dense(dense: torch.Tensor, coords: torch.Tensor, origin: torch.Tensor,
               stride: int) -> torch.Tensor:
    idx = torch.div(coords[:, 1:] - origin, stride, rounding_mode='floor')
    return dense[coords[:, 0], :, idx[:, 0], idx[:, 1], idx[:, 2]]


def me_to_conv3d(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """(size^3, C_in, C_out), x fastest -> Conv3d weight (C_out, C_in, x, y, z) (ref. §2.2)."""
    c_in, c_out = kernel.shape[1:]
    return kernel.reshape(size, size, size, c_in, c_out).permute(4, 3, 2, 1, 0)


def sparse_input(stride: int, channels: int, seed: int = 0) -> SparseTensor:
    manager = CoordinateManager.from_coordinates(random_coords(seed=seed))
    n = manager.num_voxels(stride)
    feats = torch.randn(n, channels, generator=torch.Generator().manual_seed(seed + 1))
    return SparseTensor(feats, stride, manager)


ORIGIN = torch.tensor([-16, -16, -16])  # a multiple of 2 * stride for every stride used here


@pytest.mark.parametrize('stride', [1, 2, 4])
def test_submanifold_conv_equals_dense_conv3d(stride: int) -> None:
    torch.manual_seed(0)
    x = sparse_input(stride, 5)
    conv = SparseConv3d(5, 4, kernel_size=3, stride=1)
    y = conv(x)
    assert y.stride == stride and y.num_voxels == x.num_voxels
    size = 32 // stride
    dense = nn.functional.conv3d(to_dense(x, ORIGIN, size), me_to_conv3d(conv.kernel, 3),
                                 padding=1)
    expected = read_dense(dense, y.coords, ORIGIN, stride)
    assert (y.feats - expected).abs().max().item() < TOL


@pytest.mark.parametrize('stride', [1, 2])
def test_strided_conv_equals_dense_strided_conv3d(stride: int) -> None:
    torch.manual_seed(1)
    x = sparse_input(stride, 3)
    conv = SparseConv3d(3, 6, kernel_size=2, stride=2)
    y = conv(x)
    assert y.stride == 2 * stride
    # Output set = unique(floor(c / 2s) * 2s), floor also for negative coordinates.
    c = x.coords
    parents = torch.cat([c[:, :1], torch.div(c[:, 1:], 2 * stride, rounding_mode='floor')
                         * 2 * stride], 1)
    assert torch.equal(torch.unique(parents, dim=0), torch.unique(y.coords, dim=0))
    size = 32 // stride
    dense = nn.functional.conv3d(to_dense(x, ORIGIN, size), me_to_conv3d(conv.kernel, 2),
                                 stride=2)
    expected = read_dense(dense, y.coords, ORIGIN, 2 * stride)
    assert (y.feats - expected).abs().max().item() < TOL


@pytest.mark.parametrize('stride', [2, 4])
def test_transposed_conv_equals_dense_conv_transpose3d(stride: int) -> None:
    torch.manual_seed(2)
    x = sparse_input(stride, 4)
    conv = SparseConvTranspose3d(4, 3)
    y = conv(x)
    # The output is the existing finer coordinate set, not a new one.
    assert y.stride == stride // 2
    assert torch.equal(y.coords, x.manager.coords(stride // 2))
    size = 32 // stride
    weight = conv.kernel.reshape(2, 2, 2, 4, 3).permute(3, 4, 2, 1, 0)  # (C_in, C_out, x, y, z)
    dense = nn.functional.conv_transpose3d(to_dense(x, ORIGIN, size), weight, stride=2)
    expected = read_dense(dense, y.coords, ORIGIN, stride // 2)
    assert (y.feats - expected).abs().max().item() < TOL


def test_pointwise_conv_is_a_matrix_product_stored_cin_cout() -> None:
    x = sparse_input(1, 5)
    conv = SparseConv3d(5, 7, kernel_size=1)
    assert conv.kernel.shape == (5, 7)
    assert torch.allclose(conv(x).feats, x.feats @ conv.kernel)


def test_parameter_layout_matches_minkowski_engine() -> None:
    assert SparseConv3d(3, 32, 3).kernel.shape == (27, 3, 32)
    assert SparseConv3d(32, 64, 2, 2).kernel.shape == (8, 32, 64)
    assert SparseConvTranspose3d(256, 128).kernel.shape == (8, 256, 128)
    bn = SparseBatchNorm(16)
    assert set(bn.state_dict()) == {'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var',
                                    'bn.num_batches_tracked'}
    assert all('bias' not in name for name, _ in SparseConv3d(4, 4).named_parameters())
    with pytest.raises(ValueError, match='unsupported'):
        SparseConv3d(4, 4, kernel_size=3, stride=2)


def test_kernel_maps_are_built_once_per_stride() -> None:
    x = sparse_input(1, 4)
    kmap = x.manager.submanifold_map(1)
    SparseConv3d(4, 4)(x)
    SparseConv3d(4, 4)(x)
    assert x.manager.submanifold_map(1) is kmap
    down = x.manager.downsample_map(1)
    SparseConv3d(4, 4, 2, 2)(x)
    assert x.manager.downsample_map(1) is down


def test_replicas_share_geometry_and_match_separate_tensors() -> None:
    """R replicas in one tensor give the same result as R tensors of the same geometry."""
    torch.manual_seed(3)
    manager = CoordinateManager.from_coordinates(random_coords())
    n = manager.num_voxels(1)
    feats = [torch.randn(n, 4) for _ in range(2)]
    together = SparseTensor(torch.stack(feats, 1).reshape(2 * n, 4), 1, manager, replicas=2)
    layers = nn.Sequential(SparseConv3d(4, 6), SparseConv3d(6, 5, 2, 2),
                           SparseConvTranspose3d(5, 3))
    out = layers(together).feats.view(n, 2, 3)
    for r in range(2):
        alone = layers(SparseTensor(feats[r], 1, manager)).feats
        assert (out[:, r] - alone).abs().max().item() < 1e-5
    assert together.item_ids().view(n, 2)[:, 1].equal(manager.batch_ids(1) * 2 + 1)


@pytest.mark.parametrize('make, stride', [
    (lambda: SparseConv3d(2, 3, 3, 1), 1),
    (lambda: SparseConv3d(2, 3, 2, 2), 1),
    (lambda: SparseConvTranspose3d(2, 3), 2),
])
@pytest.mark.parametrize('replicas', [1, 2])
def test_gradients_match_finite_differences(make, stride: int, replicas: int) -> None:
    torch.manual_seed(4)
    manager = CoordinateManager.from_coordinates(random_coords(batch=2, low=-2, high=2, fill=0.4))
    n = manager.num_voxels(stride)
    layer = make().double()
    feats = torch.randn(n * replicas, 2, dtype=torch.float64, requires_grad=True)
    kernel = layer.kernel.detach().clone().requires_grad_(True)

    def run(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = SparseTensor(f, stride, manager, replicas)
        return torch.func.functional_call(layer, {'kernel': w}, (x,)).feats

    assert torch.autograd.gradcheck(run, (feats, kernel), eps=1e-6, atol=1e-6)


def test_batchnorm_and_activations_act_on_all_rows() -> None:
    x = sparse_input(1, 6)
    bn = SparseBatchNorm(6).train()
    ref = nn.BatchNorm1d(6).train()
    assert torch.allclose(bn(x).feats, ref(x.feats), atol=1e-6)
    y = cat(x, x * torch.full((x.num_voxels, 6), 2.0))
    assert y.feats.shape == (x.num_voxels, 12)
    assert torch.equal(y.feats[:, 6:], 2 * x.feats)


def test_quantize_rounds_half_to_even_averages_and_slices() -> None:
    # At resolution 1: 0.5 -> 0 and 1.5 -> 2 (torch.round), -0.5 -> -0 and -2.5 -> -2.
    pts = torch.tensor([[[0.5, 0.0, 0.0], [0.2, 0.1, -0.1], [1.5, 0.0, 0.0], [-2.5, -0.5, 0.0]],
                        [[0.5, 0.0, 0.0], [9.0, 9.0, 9.0], [9.2, 9.0, 9.0], [9.0, 8.6, 9.0]]])
    x, voxel_map = quantize(pts, 1.0)
    assert x.coords.tolist() == [[0, -2, 0, 0], [0, 0, 0, 0], [0, 2, 0, 0],
                                 [1, 0, 0, 0], [1, 9, 9, 9]]
    # Unweighted average of the points in each voxel.
    assert torch.allclose(x.feats[1], pts[0, :2].mean(0))
    assert torch.allclose(x.feats[4], pts[1, 1:].mean(0))
    per_point = voxel_map.slice(x.feats)
    assert per_point.shape == (2, 4, 3)
    assert torch.equal(per_point[0, 1], x.feats[1]) and torch.equal(per_point[1, 3], x.feats[4])
    with pytest.raises(ValueError, match='NaN'):
        quantize(torch.full((1, 2, 3), float('nan')), 0.1)


def _brute_nearest(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    out = []
    for q in query:
        same = (ref[:, 0] == q[0]).nonzero().squeeze(1)
        d2 = ((ref[same, 1:] - q[1:]) ** 2).sum(1)
        best = same[d2 == d2.min()]
        # ties: smallest (x, y, z) lexicographically
        keys = ref[best, 1] * 10**8 + ref[best, 2] * 10**4 + ref[best, 3]
        out.append(best[keys.argmin()])
    return torch.stack(out)


@pytest.mark.parametrize('pairs_per_chunk', [None, 97])
def test_nearest_reference_is_exact_per_batch_item(pairs_per_chunk: int | None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if pairs_per_chunk:
        monkeypatch.setattr(neighbours, '_PAIRS', pairs_per_chunk)
    g = torch.Generator().manual_seed(5)
    ref = torch.cat([torch.randint(0, 2, (60, 1), generator=g),
                     torch.randint(-6, 6, (60, 3), generator=g) * 16], 1)
    ref = torch.unique(ref, dim=0)[torch.randperm(len(torch.unique(ref, dim=0)), generator=g)]
    ref = torch.cat([ref, torch.tensor([[2, 0, 0, 0]])])  # item 2: one voxel (null condition)
    query = torch.cat([torch.randint(0, 3, (3000, 1), generator=g),
                       torch.randint(-200, 200, (3000, 3), generator=g)], 1)
    # exact ties between lattice nodes and queries far away from every reference
    query = torch.cat([query, torch.tensor([[0, 8, 8, 8], [1, -8, 0, 8], [0, 900, 0, 0]])])
    assert torch.equal(nearest_reference(query, ref, 16), _brute_nearest(query, ref))


@pytest.mark.skipif(importlib.util.find_spec('MinkowskiEngine') is None,
                    reason='MinkowskiEngine is not installed (optional accelerator)')
def test_layers_match_minkowski_engine() -> None:
    import MinkowskiEngine as ME

    torch.manual_seed(6)
    x = sparse_input(1, 4)
    ours = nn.ModuleList([SparseConv3d(4, 5, 3), SparseConv3d(5, 6, 2, 2),
                          SparseConvTranspose3d(6, 3), SparseConv3d(3, 2, 1)])
    theirs = nn.ModuleList([
        ME.MinkowskiConvolution(4, 5, kernel_size=3, stride=1, dimension=3),
        ME.MinkowskiConvolution(5, 6, kernel_size=2, stride=2, dimension=3),
        ME.MinkowskiConvolutionTranspose(6, 3, kernel_size=2, stride=2, dimension=3),
        ME.MinkowskiConvolution(3, 2, kernel_size=1, stride=1, dimension=3)])
    theirs.load_state_dict(ours.state_dict())
    me_x = ME.SparseTensor(x.feats, coordinates=x.coords.int())
    y_me = theirs[3](theirs[2](theirs[1](theirs[0](me_x))))
    y = ours[3](ours[2](ours[1](ours[0](x))))
    assert len(y_me.C) == y.num_voxels
    ours_rows = {tuple(c): f for c, f in zip(y.coords.tolist(), y.feats, strict=True)}
    for c, f in zip(y_me.C.tolist(), y_me.F, strict=True):
        assert (ours_rows[tuple(c)] - f).abs().max().item() < TOL


def test_bf16_autocast_forward_and_backward_reach_the_fp32_weights():
    """Mixed precision (the engine's GPU default, bf16 autocast) must train: the custom sparse
    convolution casts weights and gradients to the features' dtype and back."""
    from distdpo_ros.config import preset
    from distdpo_ros.models import DiffusionNet

    torch.manual_seed(0)
    net = DiffusionNet(preset('tiny'))
    scan = torch.randn(1, 100, 3) * 8
    x_t = scan.repeat(1, 4, 1) + 0.3 * torch.randn(1, 400, 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eps = net(x_t, torch.tensor([500]), net.encode(scan))
    (eps.float() ** 2).mean().backward()
    grad = net.denoiser.stem[0].kernel.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
