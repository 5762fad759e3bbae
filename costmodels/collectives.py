"""Collectives as α–β models in NCCL's bus-bandwidth convention.

NCCL's `nccl-tests/doc/PERFORMANCE.md`: for a buffer of S bytes over n ranks, a ring
all-reduce moves 2(n−1)/n·S through every rank's link, all-gather and reduce-scatter
(n−1)/n·S (S the gathered size), all-to-all (n−1)/n·S; so time = α·steps + factor·S/busbw.

A group is described by its size and how many of its ranks share a node. Inside one node
the bus bandwidth is the fabric's (NVLink/xGMI) at its measured efficiency; an all-reduce
on NVSwitch-3 uses in-switch reduction (NVLS) when the catalog gives its bus bandwidth.
A group spanning nodes runs hierarchically (intra-node reduce-scatter, inter-node ring or
tree over one rank per node and rail, intra-node all-gather), so it is bound by the slower
of the fabric and the NICs its ranks drive: g ranks per node use g GPUs' share of the
node's NICs (rail-optimised; all groups of a plan communicate at once). Groups that leave
a leaf switch divide the NIC bandwidth by the spine oversubscription.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from meshplan.core.cluster import ClusterSpec

Collective = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"]

BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "p2p": lambda n: 1.0,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Group:
    size: int
    per_node: int  # ranks of this group on one node (1 when the stride spans a node)

    @property
    def nodes(self) -> int:
        return math.ceil(self.size / self.per_node)


def group_of(cluster: ClusterSpec, size: int, stride: int) -> Group:
    """The group of `size` ranks spaced `stride` apart in the global rank order."""
    gpn = cluster.node.gpus_per_node
    per_node = max(1, min(size, gpn // stride)) if stride < gpn else 1
    return Group(size=size, per_node=per_node)


def _intra_bw(cluster: ClusterSpec) -> float:
    """Achievable fabric bandwidth per GPU per direction (ring bus bandwidth)."""
    return cluster.node.intra_bw_bytes_per_s * cluster.node.intra_efficiency


def _nic_bw(cluster: ClusterSpec, group: Group) -> float:
    """Achievable NIC bandwidth per GPU of the group, less spine oversubscription."""
    bw = cluster.nic_bw_per_gpu_bytes_per_s * cluster.node.nic_efficiency
    if cluster.span_tier(group.per_node, group.size) == "spine":
        bw /= cluster.network.oversubscription
    return bw


def bus_bandwidth(cluster: ClusterSpec, group: Group, op: Collective) -> float:
    node = cluster.node
    intra = _intra_bw(cluster)
    if op == "all_reduce" and node.intra_allreduce_busbw_bytes_per_s and group.per_node > 2:
        intra = node.intra_allreduce_busbw_bytes_per_s
    if group.nodes <= 1:
        return intra
    inter = group.per_node * _nic_bw(cluster, group)
    return min(intra, inter) if group.per_node > 1 else inter


def latency_s(cluster: ClusterSpec, group: Group, op: Collective) -> float:
    """Ring steps inside a node plus a tree over nodes (NCCL picks tree for latency)."""
    node = cluster.node
    if op in ("p2p", "all_to_all"):  # all peers at once: one latency of the tier crossed
        return node.inter_latency_s if group.nodes > 1 else node.intra_latency_s
    rounds = 2 if op == "all_reduce" else 1
    intra = rounds * (group.per_node - 1) * node.intra_latency_s
    inter = rounds * math.ceil(math.log2(group.nodes)) * node.inter_latency_s \
        if group.nodes > 1 else 0.0
    return intra + inter


def collective_time_s(cluster: ClusterSpec, group: Group, op: Collective,
                      size_bytes: float) -> float:
    """Seconds for one collective on a buffer of `size_bytes` (gathered size for AG/RS)."""
    if group.size <= 1 or size_bytes <= 0:
        return 0.0
    if op == "all_to_all" and group.nodes > 1:
        return _all_to_all_spanning(cluster, group, size_bytes)
    volume = BUS_FACTOR[op](group.size) * size_bytes
    return latency_s(cluster, group, op) + volume / bus_bandwidth(cluster, group, op)


def _all_to_all_spanning(cluster: ClusterSpec, group: Group, size_bytes: float) -> float:
    """Intra-node and inter-node shares of an all-to-all move in parallel; the slower wins."""
    n = group.size
    intra_share = (group.per_node - 1) / n * size_bytes
    inter_share = (n - group.per_node) / n * size_bytes
    return latency_s(cluster, group, "all_to_all") + max(
        intra_share / _intra_bw(cluster), inter_share / _nic_bw(cluster, group))


def p2p_time_s(cluster: ClusterSpec, crosses_node: bool, size_bytes: float) -> float:
    """One send between two ranks (pipeline activations and gradients)."""
    node = cluster.node
    if crosses_node:
        bw = cluster.nic_bw_per_gpu_bytes_per_s * node.nic_efficiency
        return node.inter_latency_s + size_bytes / bw
    return node.intra_latency_s + size_bytes / _intra_bw(cluster)
