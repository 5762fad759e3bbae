"""Gradient reduction outside FSDP: ZeRO-0 (DDP semantics) and expert-parallel experts.

Losses are per-rank token means, so the data-parallel gradient is the mean over the dp·cp
ranks (Li et al. 2020, "PyTorch Distributed", §3). Dense parameters without FSDP are
all-reduced over dp·cp; experts held by EP ranks are all-reduced over the expert-data-
parallel group (the ranks holding the same experts) and divided by dp·cp as well, since
each expert saw the tokens of all dp·cp ranks.

Gradients go in buckets (`plan.bucket_mb`, DDP's 25 MiB by default), in reverse parameter
order, the order backward produces them. With `dp_overlap` a bucket's all-reduce starts
asynchronously as soon as its last gradient is final (the last micro-batch's backward of
its chunk), overlapping the rest of backward, as DDP does (Li et al. 2020 §3.2.3).
Buckets are launched strictly in index order, so every rank issues the same collectives
in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass
class Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup
    waiting: set[int] = field(default_factory=set)  # ids of params not final yet
    flat: torch.Tensor | None = None
    work: object = None


class GradReducer:
    def __init__(self, chunks: dict[int, nn.Module],
                 jobs: list[tuple[list[nn.Parameter], dist.ProcessGroup]],
                 divisor: int, overlap: bool, bucket_bytes: int, keep_gathered: bool = False):
        self.divisor, self.overlap = divisor, overlap
        self.keep_gathered = keep_gathered  # ZeRO-1/2: FSDP parameters stay whole all step
        self.buckets = [b for params, group in jobs
                        for b in _bucketize(params, group, bucket_bytes)]
        self.chunk_of = {id(p): s for s, c in chunks.items() for p in c.parameters()}
        self.armed: set[int] = set()  # stages in their last micro-batch's backward
        self.next = 0
        self._reset()
        if overlap:
            for i, b in enumerate(self.buckets):
                for p in b.params:
                    p.register_post_accumulate_grad_hook(self._hook(i))

    def arm(self, stage: int, chunk: nn.Module, last: bool) -> None:
        """Called before each backward: `last` when it is this chunk's final micro-batch."""
        if isinstance(chunk, FSDPModule):
            chunk.set_requires_gradient_sync(last)
            if self.keep_gathered:  # gathered once per step, resharded after the last
                chunk.set_reshard_after_backward(last)
        (self.armed.add if last else self.armed.discard)(stage)

    def chunk_final(self, stage: int) -> None:
        """A chunk's gradients were written outside autograd's accumulation (a split
        backward's W pass) and are final: their buckets may go."""
        if not self.overlap:
            return
        for b in self.buckets:
            b.waiting -= {id(p) for p in b.params if self.chunk_of[id(p)] == stage}
        self._launch_ready()

    def finish(self) -> None:
        """At the schedule's RG: launch what is left, wait, write back the means."""
        self._launch_ready(force=True)
        for b in self.buckets:
            b.work.wait()
            b.flat /= self.divisor
            offset = 0
            for p in b.params:
                g = local(p.grad)
                g.copy_(b.flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self._reset()

    def _hook(self, index: int):
        def hook(p: torch.Tensor) -> None:
            if self.chunk_of[id(p)] in self.armed:
                self.buckets[index].waiting.discard(id(p))
                self._launch_ready()
        return hook

    def _launch_ready(self, force: bool = False) -> None:
        while self.next < len(self.buckets):
            b = self.buckets[self.next]
            if b.waiting and not force:
                return
            for p in b.params:
                if p.grad is None:  # unused this step: contributes zero
                    p.grad = torch.zeros_like(p)
            b.flat = torch.cat([local(p.grad).reshape(-1) for p in b.params])
            b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)
            self.next += 1

    def _reset(self) -> None:
        self.next = 0
        self.armed.clear()
        for b in self.buckets:
            b.waiting = {id(p) for p in b.params}
            b.flat, b.work = None, None


def _bucketize(params: list[nn.Parameter], group, bucket_bytes: int) -> list[Bucket]:
    out: list[Bucket] = []
    size = bucket_bytes
    for p in reversed(params):
        nbytes = local(p).numel() * p.element_size()
        if size + nbytes > bucket_bytes or p.dtype != out[-1].params[0].dtype:
            out.append(Bucket(params=[], group=group))
            size = 0
        out[-1].params.append(p)
        size += nbytes
    return out


def reduce_partial_grads(params: list[nn.Parameter]) -> int:
    """Reduce gradients still holding partial sums (DTensor `Partial`), one collective per
    layout, before the optimizer reads them; returns how many collectives ran.

    Under sequence parallelism a replicated norm weight sees a sequence shard on each TP
    rank, so its gradient is a partial sum. Left to the optimizer, DTensor reduces it at
    every use (Adam reads a gradient three times: three all-reduces per weight and step,
    27 for tiny-dense's 9 norms in a traced step). Megatron-LM reduces these gradients
    once per step in one coalesced all-reduce (`_allreduce_layernorm_grads`); so does this,
    one all-reduce of the flattened gradients per (mesh, placements)."""
    from torch.distributed.tensor import Partial, Replicate

    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(x, Partial) for x in g.placements):
            groups.setdefault((id(g.device_mesh), g.placements), []).append(p)
    for members in groups.values():
        first = members[0].grad
        flat = torch.cat([p.grad.to_local().reshape(-1) for p in members])
        whole = [Replicate() if isinstance(x, Partial) else x for x in first.placements]
        flat = DTensor.from_local(flat, first.device_mesh, first.placements,
                                  run_check=False).redistribute(placements=whole).to_local()
        offset = 0
        for p in members:
            g = p.grad.to_local()
            p.grad = DTensor.from_local(flat[offset:offset + g.numel()].view_as(g),
                                        first.device_mesh, whole, run_check=False)
            offset += g.numel()
    return len(groups)
