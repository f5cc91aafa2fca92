"""Both forms of the sparse convolution (per-offset loop, fused) against a plain reference.

The reference is the definition written out: for every pair (kernel weight k, input row i, output
row o) of a kernel map, out[o] += x[i] @ W[k], in float64 (per weight: gather its input rows,
multiply, add into its output rows); its gradients come from autograd. Maps are built on random
sparse tensors with negative coordinates, several batch items, replicas, and kernel weights that
have no pairs at all.
"""

from __future__ import annotations

import pytest
import torch

from distdpo_ros.models.conditioning import Condition
from distdpo_ros.sparse import CoordinateManager, functional, nearest_reference
from distdpo_ros.sparse.coords import KernelMap
from distdpo_ros.sparse.functional import sparse_conv
from distdpo_ros.sparse.neighbours import ReferenceIndex

FORMS = {'loop': 0, 'fused': 1 << 40}  # _FUSED_BYTES that forces each form


def reference_conv(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap,
                   replicas: int) -> torch.Tensor:
    """out[o] += x[i] @ W[k] for every pair (and replica), in the dtype of ``x``."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    xs = x.view(kmap.n_in, replicas, c_in)
    out = x.new_zeros(kmap.n_out, replicas, c_out)
    pairs = list(kmap.pairs)
    if kmap.identity is not None:
        every = torch.arange(kmap.n_in)
        pairs.append((kmap.identity, every, every))
    for k, rows_in, rows_out in pairs:
        out = out.index_add(0, rows_out, xs[rows_in] @ weight[k])
    return out.reshape(kmap.n_out * replicas, c_out)


def random_manager(seed: int, batch: int = 3, size: int = 6, fill: float = 0.3,
                   flat: bool = False) -> CoordinateManager:
    """Unique voxels around the origin; ``flat`` keeps them in the plane z = 0, so every kernel
    weight that moves along z has no pairs."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(-size, size)
    z = torch.zeros(1, dtype=torch.int64) if flat else r
    grid = torch.cartesian_prod(torch.arange(batch), r, r, z)
    return CoordinateManager.from_coordinates(grid[torch.rand(len(grid), generator=g) < fill])


def kernel_map(manager: CoordinateManager, kind: str, stride: int) -> KernelMap:
    if kind == 'submanifold':
        return manager.submanifold_map(stride)
    if kind == 'down':
        return manager.downsample_map(stride)
    manager.keys(stride)
    return manager.upsample_map(stride)


CASES = [('submanifold', 1, False), ('submanifold', 2, False), ('submanifold', 1, True),
         ('down', 1, False), ('down', 2, True), ('up', 2, False), ('up', 4, False)]


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('kind, stride, flat', CASES)
@pytest.mark.parametrize('replicas', [1, 2])
def test_forward_and_gradients_match_the_pairwise_reference(
        form: str, kind: str, stride: int, flat: bool, replicas: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(functional, '_FUSED_BYTES', FORMS[form])
    manager = random_manager(seed=stride + 10 * replicas, flat=flat)
    kmap = kernel_map(manager, kind, stride)
    if flat and kind == 'submanifold':
        assert len(kmap.pairs) == 8  # only the in-plane neighbours have pairs
    volume = 27 if kind == 'submanifold' else 8
    g = torch.Generator().manual_seed(7)
    x = torch.randn(kmap.n_in * replicas, 5, generator=g, requires_grad=True)
    weight = torch.randn(volume, 5, 4, generator=g, requires_grad=True)
    upstream = torch.randn(kmap.n_out * replicas, 4, generator=g)

    out = sparse_conv(x, weight, kmap, replicas)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), upstream)

    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    expected = reference_conv(x64, w64, kmap, replicas)
    ref_x, ref_w = torch.autograd.grad(expected, (x64, w64), upstream.double())
    for ours, ref in ((out, expected), (grad_x, ref_x), (grad_w, ref_w)):
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert (ours.double() - ref).abs().max().item() < 1e-5 * (1 + ref.abs().max().item())
    unused = [k for k in range(volume) if k not in {p[0] for p in kmap.pairs}
              and k != kmap.identity]
    assert all(grad_w[k].abs().max().item() == 0 for k in unused)


@pytest.mark.parametrize('form', FORMS)
def test_only_the_gradients_asked_for_are_computed(form: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(functional, '_FUSED_BYTES', FORMS[form])
    kmap = random_manager(seed=3).submanifold_map(1)
    x = torch.randn(kmap.n_in, 3)
    weight = torch.randn(27, 3, 2, requires_grad=True)
    upstream = torch.randn(kmap.n_out, 2)
    (grad_w,) = torch.autograd.grad(sparse_conv(x, weight, kmap), (weight,), upstream)
    expected = torch.autograd.grad(reference_conv(x.double(), weight.double(), kmap, 1),
                                   (weight,), upstream.double())[0]
    assert (grad_w - expected).abs().max().item() < 1e-5 * (1 + expected.abs().max().item())
    x.requires_grad_(True)
    w = weight.detach()
    (grad_x,) = torch.autograd.grad(sparse_conv(x, w, kmap), (x,), upstream)
    expected = torch.autograd.grad(reference_conv(x.double(), w.double(), kmap, 1),
                                   (x,), upstream.double())[0]
    assert (grad_x - expected).abs().max().item() < 1e-5 * (1 + expected.abs().max().item())


def test_isolated_voxels_have_only_the_centre_weight() -> None:
    """Voxels 2 apart: no neighbour anywhere, both forms reduce to x @ W[centre]."""
    r = torch.arange(0, 10, 2)
    manager = CoordinateManager.from_coordinates(torch.cartesian_prod(torch.arange(2), r, r, r))
    kmap = manager.submanifold_map(1)
    assert kmap.pairs == () and kmap.identity == 13
    x = torch.randn(kmap.n_in, 4, requires_grad=True)
    weight = torch.randn(27, 4, 3, requires_grad=True)
    out = sparse_conv(x, weight, kmap)
    assert torch.equal(out, x @ weight[13])
    out.sum().backward()
    assert torch.count_nonzero(weight.grad[torch.arange(27) != 13]) == 0


def test_the_default_choice_takes_the_fused_form_for_sparse_maps_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dense = random_manager(seed=5).submanifold_map(1)
    sparse = random_manager(seed=5, flat=True).submanifold_map(1)
    pairs = dense.num_pairs - dense.n_in
    assert sparse.num_pairs - sparse.n_in < pairs
    monkeypatch.setattr(functional, '_FUSED_BYTES', pairs * 4 * 4)
    assert functional._use_fused(dense, 4, 4) and not functional._use_fused(dense, 5, 4)
    assert functional._use_fused(sparse, 4, 4)
    isolated = KernelMap(3, 3, (), identity=13)
    assert not functional._use_fused(isolated, 4, 4)  # nothing to gather: the loop form
    plan = functional._pair_plan(sparse)
    assert functional._pair_plan(sparse) is plan  # built once per kernel map
    assert len(plan.rows_in) == sparse.num_pairs - sparse.n_in


def test_upsample_maps_are_built_once() -> None:
    manager = random_manager(seed=6)
    manager.keys(4)
    assert manager.upsample_map(4) is manager.upsample_map(4)


@pytest.mark.parametrize('form', FORMS)
def test_bf16_features_run_in_both_forms(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(functional, '_FUSED_BYTES', FORMS[form])
    kmap = random_manager(seed=8).submanifold_map(1)
    x = torch.randn(kmap.n_in, 8)
    weight = torch.randn(27, 8, 8) / 8
    out = sparse_conv(x.bfloat16(), weight.bfloat16(), kmap)
    assert out.dtype == torch.bfloat16
    expected = sparse_conv(x, weight, kmap)
    assert (out.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_reference_index_answers_many_query_sets_like_the_function() -> None:
    g = torch.Generator().manual_seed(9)
    ref = torch.cat([torch.randint(0, 2, (80, 1), generator=g),
                     torch.randint(-5, 5, (80, 3), generator=g) * 16], 1)
    ref = torch.unique(ref, dim=0)
    index = ReferenceIndex(ref, 16)
    for seed in range(3):
        gq = torch.Generator().manual_seed(seed)
        query = torch.cat([torch.randint(0, 2, (500, 1), generator=gq),
                           torch.randint(-120, 120, (500, 3), generator=gq)], 1)
        assert torch.equal(index.nearest(query), nearest_reference(query, ref, 16))


@pytest.mark.parametrize('replicas', [1, 2, 3])
def test_condition_nearest_matches_one_search_per_replica(replicas: int) -> None:
    """The vectorised replica lookup gives the rows of separate per-replica searches, and its
    cached index serves every call."""
    g = torch.Generator().manual_seed(replicas)
    items = 2 * replicas
    ref = torch.cat([torch.randint(0, items, (120, 1), generator=g),
                     torch.randint(-4, 4, (120, 3), generator=g) * 16], 1)
    ref = torch.unique(torch.cat([ref, torch.arange(items)[:, None] * torch.tensor([[1, 0, 0, 0]])
                                  ]), dim=0)
    cond = Condition(ref, torch.randn(len(ref), 2), items)
    coords = torch.cat([torch.randint(0, 2, (300, 1), generator=g),
                        torch.randint(-90, 90, (300, 3), generator=g)], 1)
    rows = cond.nearest(coords, replicas)
    expected = []
    for r in range(replicas):
        query = coords.clone()
        query[:, 0] = coords[:, 0] * replicas + r
        expected.append(nearest_reference(query, ref, 16))
    assert torch.equal(rows, torch.stack(expected, 1).reshape(-1))
    index = cond._index
    assert cond.nearest(coords, replicas) is not None and cond._index is index
    assert cond.detach()._index is index
