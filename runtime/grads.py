"""Gradient reduction outside FSDP: ZeRO-0 (DDP semantics) and expert-parallel experts.

Losses are per-rank token means, so the data-parallel gradient is the mean over the dp·cp
ranks (Li et al. 2020, PyTorch DDP §3). Dense parameters without FSDP are all-reduced over
dp·cp; experts held by EP ranks are all-reduced over the expert-data-parallel group (the
ranks holding the same experts) and divided by dp·cp as well, since each expert saw the
tokens of all dp·cp ranks. Buckets flatten many small gradients into one collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def reduce_mean(params: list[nn.Parameter], group, divisor: int) -> None:
    """All-reduce (sum) the gradients of `params` over `group`, then divide by `divisor`."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat /= divisor
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    size = BUCKET_BYTES
    for g in grads:
        if size + g.numel() * g.element_size() > BUCKET_BYTES or g.dtype != out[-1][0].dtype:
            out.append([])
            size = 0
        out[-1].append(g)
        size += g.numel() * g.element_size()
    return out
