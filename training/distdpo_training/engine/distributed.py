"""Process-group set-up for `torchrun`, and BatchNorm statistics shared across ranks.

`torchrun --nproc_per_node N distdpo train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; :func:`setup` then
joins the process group (nccl on GPUs, gloo on CPU) and picks this rank's device. Without those
variables everything runs in one process and the helpers below are no-ops.

PyTorch's SyncBatchNorm only runs on GPUs; :class:`CrossRankBatchNorm` does the same on any device
(differentiable all-reduce of the per-channel sums), so a 2-process CPU run computes the same
statistics, and therefore the same weights, as one process with the whole batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distdpo_ros.errors import UserError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is available, else CPU; 'cuda' -> cuda:LOCAL_RANK."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda':
        name = f'cuda:{local_rank}'
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {name}: CUDA is not available on this machine')
    return device


def setup(device: str = 'auto', timeout_minutes: float = 60.0) -> Dist:
    """Join the torchrun process group when launched by torchrun, else return a single process."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown() -> None:
    """Leave the process group together (a rank tearing gloo down while another still talks
    to it can abort the process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (no gradient); returns it unchanged in one process."""
    if d.enabled:
        values = values.clone()
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, d: Dist) -> bool:
    """True when flag is set on any rank (used to stop all ranks at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_tensor(t: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """The same-shaped tensor from every rank, as CPU tensors in rank order."""
    if not d.enabled:
        return [t.cpu()]
    t = t.to(d.device)
    out = [torch.empty_like(t) for _ in range(d.world_size)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the gradient of a sum over ranks is summed over ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossRankBatchNorm(nn.BatchNorm1d):
    """BatchNorm over (N, C[, L]) features whose batch statistics span all ranks.

    In training with an initialised process group the per-channel count, sum and centred sum of
    squares are all-reduced with autograd, so gradients flow through the global statistics exactly
    as in a single process holding the union of the ranks' samples. Otherwise it is BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        channels_last = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 2 else x.t()
        local_n = torch.tensor([float(channels_last.shape[1])], device=x.device)
        dist.all_reduce(local_n)
        n = local_n.item()
        if n <= 1:
            raise ValueError('CrossRankBatchNorm needs more than one value per channel')
        xf = channels_last.float()
        mean = _SumOverRanks.apply(xf.sum(1)) / n
        var = _SumOverRanks.apply(((xf - mean[:, None]) ** 2).sum(1)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                self.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)) * momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:  # accept any (N, C, ...) input
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm of module share statistics across ranks (SyncBatchNorm on GPUs)."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_cross_rank(module)


def _to_cross_rank(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(module, CrossRankBatchNorm):
        new = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new.to(next(module.buffers(), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, _to_cross_rank(child))
    return module
