"""Expert parallelism: all-to-all dispatch to the rank that holds each expert, and back.

The placement is the plan's physical-slot -> logical-expert map; with `S` slots and `ep`
ranks, slot j lives on EP rank j // (S/ep) as local expert j % (S/ep). Dispatch sends each
(token, choice) row to its expert's rank (GShard, Lepikhin et al. 2021 §2.2: two
all-to-alls per layer), the experts run there, and combine sends the outputs back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshplan.core.errors import SpecError
from meshplan.core.plan import Plan

from .model import Experts, unsort


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv, group)


def placement_row(plan: Plan, n_experts: int, moe_index: int) -> list[int]:
    """Logical expert of each physical slot for the MoE layer `moe_index` (0-based)."""
    rows = plan.expert_placement
    if rows is None:
        return list(range(n_experts))
    row = list(rows[0] if len(rows) == 1 else rows[moe_index])
    if len(row) != n_experts:
        raise SpecError("plan.expert_placement", f"{len(row)} slots for {n_experts} experts: "
                        "replicated experts are not executed by the runtime yet")
    return row


class ExpertDispatch:
    """`MoE.dispatch` under expert parallelism for one layer."""

    def __init__(self, row: list[int], ep_rank: int, ep: int, group):
        self.ep, self.group = ep, group
        self.per_rank = len(row) // ep
        slot_of = torch.empty(len(row), dtype=torch.long)
        slot_of[torch.tensor(row)] = torch.arange(len(row))
        self.slot_of = slot_of  # logical expert -> physical slot
        self.local = row[ep_rank * self.per_rank:(ep_rank + 1) * self.per_rank]

    def keys(self, expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, int]:
        """Routing keys are physical slots: sorting by them orders rows by destination EP
        rank, then by local expert."""
        return self.slot_of.to(expert_ids.device)[expert_ids], self.ep * self.per_rank

    def __call__(self, rows: torch.Tensor, per_slot: torch.Tensor, experts: Experts
                 ) -> torch.Tensor:
        """Expert outputs of `rows`, sorted by slot with `per_slot[j]` rows each."""
        recv_per_slot = torch.empty_like(per_slot)
        dist.all_to_all_single(recv_per_slot, per_slot, group=self.group)
        send = per_slot.view(self.ep, -1).sum(1).tolist()
        recv_grid = recv_per_slot.view(self.ep, -1)  # [source rank, local expert]
        recv = recv_grid.sum(1).tolist()
        arrived = all_to_all(rows, send, recv, self.group)
        # Regroup the arrivals (source-major) by local expert.
        local_ids = torch.repeat_interleave(
            torch.arange(self.per_rank, device=rows.device).repeat(self.ep), recv_grid.flatten())
        by_expert = torch.argsort(local_ids, stable=True)
        out = experts(arrived[by_expert], recv_grid.sum(0).tolist())
        return all_to_all(unsort(out, by_expert), recv, send, self.group)


def shard_experts(experts: Experts, local: list[int]) -> None:
    """Keep only the rows of the stacked expert weights this rank holds, in slot order."""
    idx = torch.tensor(local)
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        setattr(experts, name, torch.nn.Parameter(full.detach()[idx].clone()))
