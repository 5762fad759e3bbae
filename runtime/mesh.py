"""The device mesh of a plan: named axes and the process groups each parallelism uses.

Axes, outermost first: pp, dp, cp, tp (tp innermost, so a TP group is consecutive ranks
and stays inside a node, as in Megatron-LM). Data-parallel gradient reduction runs over
the flattened dp·cp group. Expert parallelism cuts the dp·cp group into EP groups of `ep`
consecutive members; the members with the same EP rank form the expert-data-parallel
(edp) group that reduces expert gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    return Mesh(plan=plan, device_type=device_type, world=world, experts=experts, dp_cp=dp_cp)
