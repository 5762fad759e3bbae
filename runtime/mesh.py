"""The device mesh of a plan: named axes and the process groups each parallelism uses.

Axes, outermost first: pp, dp, cp, tp (tp innermost, so a TP group is consecutive ranks
and stays inside a node, as in Megatron-LM). Data-parallel gradient reduction runs over
the flattened dp·cp group. Expert parallelism cuts the dp·cp group into EP groups of `ep`
consecutive members; the members with the same EP rank form the expert-data-parallel
(edp) group that reduces expert gradients. Under DualPipe pipeline ranks r and pp − 1 − r
hold copies of the same two blocks; their gradients are reduced over the dp·cp (or edp)
group of both together (`twin_group`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshplan.core.plan import Plan


@dataclass(frozen=True, kw_only=True)
class Mesh:
    plan: Plan
    device_type: str
    world: DeviceMesh  # ("pp", "dp", "cp", "tp")
    experts: DeviceMesh  # ("pp", "edp", "ep", "tp")
    dp_cp: DeviceMesh  # dp and cp flattened
    twins: dict[str, dist.ProcessGroup] = field(default_factory=dict)  # DualPipe only

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def coord(self, axis: str) -> int:
        mesh = self.experts if axis in ("edp", "ep") else self.world
        return mesh.get_local_rank(axis)

    def group(self, axis: str) -> dist.ProcessGroup:
        if axis == "dp_cp":
            return self.dp_cp.get_group()
        mesh = self.experts if axis in ("edp", "ep") else self.world
        return mesh.get_group(axis)

    def size(self, axis: str) -> int:
        if axis == "dp_cp":
            return self.dp_cp.size()
        mesh = self.experts if axis in ("edp", "ep") else self.world
        return mesh.size(mesh.mesh_dim_names.index(axis))

    def twin_group(self, axis: str) -> dist.ProcessGroup:
        """`axis` ("dp_cp" or "edp") widened to the twin pipeline rank under DualPipe."""
        return self.twins[axis] if self.twins else self.group(axis)

    def pp_peer(self, pp_rank: int) -> int:
        """Global rank of pipeline rank `pp_rank` with this rank's dp, cp and tp coordinates."""
        return dist.get_global_rank(self.group("pp"), pp_rank)


def build_mesh(plan: Plan, device_type: str) -> Mesh:
    """Every rank calls this with the same resolved plan (collective)."""
    shape = (plan.pp, plan.dp, plan.cp, plan.tp)
    world = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "dp", "cp", "tp"))
    dp_cp = world["dp", "cp"]._flatten("dp_cp")
    ranks = torch.arange(plan.world_size).view(plan.pp, plan.dp * plan.cp // plan.ep,
                                               plan.ep, plan.tp)
    experts = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "edp", "ep", "tp"))
    twins = _twin_groups(plan) if plan.schedule == "dualpipe" else {}
    return Mesh(plan=plan, device_type=device_type, world=world, experts=experts, dp_cp=dp_cp,
                twins=twins)


def _twin_groups(plan: Plan) -> dict[str, dist.ProcessGroup]:
    """Per pair of twin pipeline ranks (r, pp − 1 − r): the dp·cp ranks of both with one tp
    rank, and the edp ranks of both with one (ep, tp) rank. Collective: every rank creates
    every group, in the same order."""
    pairs = [[i, plan.pp - 1 - i] for i in range(plan.pp // 2)]
    world = torch.arange(plan.world_size).view(plan.pp, plan.dp * plan.cp, plan.tp)
    dense = [world[pair, :, t].flatten().tolist() for pair in pairs for t in range(plan.tp)]
    experts = world.view(plan.pp, plan.dp * plan.cp // plan.ep, plan.ep, plan.tp)
    edp = [experts[pair, :, e, t].flatten().tolist() for pair in pairs
           for e in range(plan.ep) for t in range(plan.tp)]
    return {"dp_cp": dist.new_subgroups_by_enumeration(dense)[0],
            "edp": dist.new_subgroups_by_enumeration(edp)[0]}
