"""Sparse convolution as gather -> matrix product -> scatter over a :class:`KernelMap`.

For each kernel weight ``k`` with pairs (in rows, out rows): ``out[out_rows] += x[in_rows] @
W[k]``; the identity weight (centre of a submanifold conv) is one dense ``x @ W[k]``. This does
exactly the multiply-adds of the pairs that exist. Measured per layer on this project's 2-core CPU
(one thread, real KITTI voxels of the small and full scales, 1-19 of 27 neighbours present): an
im2col gather into an (N, 27 * C_in) matrix with a zero row for missing neighbours was 3-10x
slower (it multiplies every missing neighbour); one gather of all pairs with one scatter, and
padded batched GEMMs, were 0.7-1.5x the time of this loop: faster on the sparse fine levels,
slower on the dense coarse levels that dominate the network. At the full scale the loop's GEMMs
run at 45-68 GFLOP/s on one core, 87 % of a forward.

Features may hold R replicas of the geometry, voxel-major: row ``v * R + r`` is voxel ``v`` of
replica ``r``. Viewing them as (N, R * C) lets one index operation serve all replicas with one
kernel map.

The autograd function saves only its inputs (not the gathered rows) and re-gathers in backward,
which keeps training memory at the size of the feature maps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distdpo_ros.sparse.coords import KernelMap


def _apply_map(x: Tensor, weight: Tensor, kmap: KernelMap, replicas: int) -> Tensor:
    """out (n_out * R, C_out) = sum over pairs of x[in] @ weight[k], scattered to out rows."""
    c_in, c_out = weight.shape[1], weight.shape[2]
    if kmap.identity is not None:
        out = x @ weight[kmap.identity]
    else:
        out = x.new_zeros(kmap.n_out * replicas, c_out)
    x_rows = x.view(kmap.n_in, replicas * c_in)
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
    if need_x:
        grad_x = (grad @ weight[kmap.identity].t() if kmap.identity is not None
                  else grad.new_zeros(kmap.n_in * replicas, c_in))
        gx_rows = grad_x.view(kmap.n_in, replicas * c_in)
    if need_w:
        grad_w = torch.zeros_like(weight)
        if kmap.identity is not None:
            grad_w[kmap.identity] = x.t() @ grad
    x_rows = x.view(kmap.n_in, replicas * c_in)
    g_rows = grad.view(kmap.n_out, replicas * c_out)
    for k, rows_in, rows_out in kmap.pairs:
        gs = g_rows.index_select(0, rows_out).view(-1, c_out)
        if need_x:
            gx_rows.index_add_(0, rows_in, (gs @ weight[k].t()).view(-1, replicas * c_in))
        if need_w:
            grad_w[k] += x_rows.index_select(0, rows_in).view(-1, c_in).t() @ gs
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
