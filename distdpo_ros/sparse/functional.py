"""Sparse convolution as gather -> matrix product -> scatter over a :class:`KernelMap`.

For each kernel weight ``k`` with pairs (in rows, out rows): ``out[out_rows] += x[in_rows] @
W[k]``; the identity weight (centre of a submanifold conv) is one dense ``x @ W[k]``. This does
exactly the multiply-adds of the pairs that exist, in one of two ways chosen per call by the size
of the gathered pairs:

- *loop* (dense maps: many pairs or wide features): per kernel weight, one gather, one GEMM and
  one ``index_add_``. The GEMMs dominate (at the small scale's stride-8 level 16 of 27 neighbours
  exist and the per-offset GEMMs run at 60-80 GFLOP/s on one core of this project's CPU); each
  step's temporaries stay cache-sized.
- *fused* (sparse maps whose gathered pairs fit in ``_FUSED_BYTES``): one gather of every pair,
  the per-weight GEMMs written into one buffer, and one ``embedding_bag`` that sums each output
  row's contributions (a CSR of the pairs by output row, built once per kernel map). At 0.1 m
  voxels 1-3 % of the 26 neighbours of a stride-1 voxel exist, so a loop step there moves a few
  dozen rows and costs its fixed overhead; the fused form pays that overhead once.

Measured per layer on this project's 2-core CPU (one thread, the small scale's voxels at t = 500):
an im2col gather into an (N, 27 * C_in) matrix with a zero row for missing neighbours was 3-10x
slower than the loop on sparse levels (it multiplies every missing neighbour) and 1.2-2x slower
even at the 62 %-dense stride-8 level; the fused form is 1.2-1.4x faster than the loop on the
stride-1/2 levels and 1.5-2.6x slower on the dense ones (its buffers leave the cache);
output-blocked fused variants, L2-sized chunks of the loop and padded batched GEMMs were no
faster than the loop on the dense levels. On a whole small-scale training step the GEMMs
themselves (3.2e10 FLOP at 60-80 GFLOP/s on one core) are about half the time, which bounds
what any rearrangement of the index work can gain at one thread.

Features may hold R replicas of the geometry, voxel-major: row ``v * R + r`` is voxel ``v`` of
replica ``r``. Viewing them as (N, R * C) lets one index operation serve all replicas with one
kernel map.

The autograd function saves only its inputs (not the gathered rows) and re-gathers in backward,
which keeps training memory at the size of the feature maps. The backward is the transposed
operation with the same two forms: grad_x gathers the output gradient per pair, multiplies by
W[k]^T and sums per input row; grad_W[k] = x[in]^T @ grad[out] is written straight into its slice
of the weight gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from distdpo_ros.sparse.coords import KernelMap

_FUSED_BYTES = 1 << 21  # gathered pairs (rows x widest feature row) up to 2 MB take the fused form


@dataclass(frozen=True)
class _PairPlan:
    """Every (non-identity) pair of a kernel map in one list, and CSRs of it by row.

    ``segments`` lists (kernel index, first, end) of each weight's pairs in ``rows_in`` /
    ``rows_out``; ``by_out`` / ``by_in`` (pair order, first pair of each row) let
    ``embedding_bag`` sum the pairs of every output / input row.
    """

    rows_in: Tensor
    rows_out: Tensor
    segments: tuple[tuple[int, int, int], ...]
    by_out: tuple[Tensor, Tensor]
    by_in: tuple[Tensor, Tensor]


def _csr(rows: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Pair order grouped by row (stable) and the first pair of every row, without host syncs."""
    order = torch.argsort(rows, stable=True)
    counts = torch.zeros(n, dtype=torch.int64, device=rows.device)
    counts.index_add_(0, rows, torch.ones_like(rows))
    return order, torch.cumsum(counts, 0) - counts


def _pair_plan(kmap: KernelMap) -> _PairPlan:
    plan = kmap.cache.get('pairs')
    if plan is None:
        rows_in = torch.cat([i for _, i, _ in kmap.pairs])
        rows_out = torch.cat([o for _, _, o in kmap.pairs])
        segments, first = [], 0
        for k, i, _ in kmap.pairs:
            segments.append((k, first, first + len(i)))
            first += len(i)
        plan = _PairPlan(rows_in, rows_out, tuple(segments), _csr(rows_out, kmap.n_out),
                         _csr(rows_in, kmap.n_in))
        kmap.cache['pairs'] = plan
    return plan


def _use_fused(kmap: KernelMap, width: int, element_size: int) -> bool:
    """Fused form when the map has pairs and all of them, gathered, fit in ``_FUSED_BYTES``."""
    pairs = kmap.num_pairs - (kmap.n_in if kmap.identity is not None else 0)
    return 0 < pairs * width * element_size <= _FUSED_BYTES


def _apply_map(x: Tensor, weight: Tensor, kmap: KernelMap, replicas: int) -> Tensor:
    """out (n_out * R, C_out) = sum over pairs of x[in] @ weight[k], scattered to out rows."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    x_rows = x.view(kmap.n_in, replicas * c_in)
    if _use_fused(kmap, replicas * max(c_in, c_out), x.element_size()):
        plan = _pair_plan(kmap)
        gathered = x_rows.index_select(0, plan.rows_in)
        products = x.new_empty(len(plan.rows_in), replicas * c_out)
        for k, first, end in plan.segments:
            torch.mm(gathered[first:end].view(-1, c_in), weight[k],
                     out=products[first:end].view(-1, c_out))
        out = F.embedding_bag(plan.by_out[0], products, plan.by_out[1], mode='sum')
        out = out.view(kmap.n_out * replicas, c_out)
        if kmap.identity is not None:
            out.addmm_(x, weight[kmap.identity])
        return out
    if kmap.identity is not None:
        out = x @ weight[kmap.identity]
    else:
        out = x.new_zeros(kmap.n_out * replicas, c_out)
    out_rows = out.view(kmap.n_out, replicas * c_out)
    for k, rows_in, rows_out in kmap.pairs:
        gathered = x_rows.index_select(0, rows_in).view(-1, c_in)
        out_rows.index_add_(0, rows_out, (gathered @ weight[k]).view(-1, replicas * c_out))
    return out


def _backward(x: Tensor, grad: Tensor, weight: Tensor, kmap: KernelMap, replicas: int,
              need_x: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """dL/dx[in] += grad[out] @ W[k]^T and dL/dW[k] = x[in]^T @ grad[out] (grad gathered once)."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    grad_x = grad_w = None
    if need_w:
        grad_w = torch.zeros_like(weight)
        if kmap.identity is not None:
            torch.mm(x.t(), grad, out=grad_w[kmap.identity])
    x_rows = x.view(kmap.n_in, replicas * c_in)
    g_rows = grad.view(kmap.n_out, replicas * c_out)
    if _use_fused(kmap, replicas * max(c_in, c_out), x.element_size()):
        plan = _pair_plan(kmap)
        gs = g_rows.index_select(0, plan.rows_out)
        xs = x_rows.index_select(0, plan.rows_in) if need_w else None
        products = x.new_empty(len(plan.rows_in), replicas * c_in) if need_x else None
        for k, first, end in plan.segments:
            g_k = gs[first:end].view(-1, c_out)
            if need_x:
                torch.mm(g_k, weight[k].t(), out=products[first:end].view(-1, c_in))
            if need_w:
                torch.mm(xs[first:end].view(-1, c_in).t(), g_k, out=grad_w[k])
        if need_x:
            grad_x = F.embedding_bag(plan.by_in[0], products, plan.by_in[1], mode='sum')
            grad_x = grad_x.view(kmap.n_in * replicas, c_in)
            if kmap.identity is not None:
                grad_x.addmm_(grad, weight[kmap.identity].t())
        return grad_x, grad_w
    if need_x:
        grad_x = (grad @ weight[kmap.identity].t() if kmap.identity is not None
                  else grad.new_zeros(kmap.n_in * replicas, c_in))
        gx_rows = grad_x.view(kmap.n_in, replicas * c_in)
    for k, rows_in, rows_out in kmap.pairs:
        gs = g_rows.index_select(0, rows_out).view(-1, c_out)
        if need_x:
            gx_rows.index_add_(0, rows_in, (gs @ weight[k].t()).view(-1, replicas * c_in))
        if need_w:
            torch.mm(x_rows.index_select(0, rows_in).view(-1, c_in).t(), gs, out=grad_w[k])
    return grad_x, grad_w


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, kmap: KernelMap, replicas: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kmap, ctx.replicas = kmap, replicas
        return _apply_map(x, weight, kmap, replicas)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        kmap, replicas = ctx.kmap, ctx.replicas
        grad_x, grad_w = _backward(x, grad.to(x.dtype).contiguous(), weight, kmap, replicas,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_x, grad_w, None, None


def sparse_conv(x: Tensor, weight: Tensor, kmap: KernelMap, replicas: int = 1) -> Tensor:
    """Convolve features ``x`` (n_in * R, C_in) with ``weight`` (K, C_in, C_out) over ``kmap``.

    Returns (n_out * R, C_out). Differentiable in ``x`` and ``weight``.
    """
    if x.shape[0] != kmap.n_in * replicas:
        raise ValueError(f'features have {x.shape[0]} rows, the kernel map expects '
                         f'{kmap.n_in} voxels x {replicas} replicas')
    # under autocast features may be bf16/fp16 while the weight is fp32: compute in the features'
    # dtype (the cast is differentiable, so the fp32 weight still receives its gradient)
    return _SparseConv.apply(x.contiguous(), weight.to(x.dtype), kmap, replicas)
