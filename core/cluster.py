"""Where training runs: one device kind, its node, and the network between nodes.

Bandwidths are per GPU and per direction in bytes/s unless the name says otherwise. The
`*_efficiency` fields are achievable fractions from microbenchmarks (cited in the catalog
files), not fitted to training results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import networkx as nx

from .errors import require

Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8"]
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    name: str
    peak_flops_per_s: dict[str, float]  # dense (no sparsity) tensor-core peak per dtype
    kind: Literal["gpu", "cpu"] = "gpu"  # what `meshplan run` needs to execute a plan
    hbm_bytes: float
    hbm_bw_bytes_per_s: float
    compute_units: int  # SMs (NVIDIA) or CUs (AMD): sets GEMM wave quantisation
    gemm_tile: tuple[int, ...] = (128, 256)  # output tile of the vendor BLAS's big kernels
    gemm_peak_fraction: dict[str, float] = field(default_factory=dict)  # MAMF / peak per dtype
    attention_peak_fraction: float = 0.5  # fused attention FLOP/s / peak at long sequences
    mem_bw_fraction: float = 0.85  # achievable / nominal HBM bandwidth (stream copy)
    kernel_overhead_s: float = 4e-6  # launch + tail per kernel
    runtime_reserved_bytes: float = 1.0e9  # CUDA context, cuBLAS/NCCL workspaces
    tdp_w: float = 0.0
    power_limit_w: float = 0.0  # 0: runs at TDP
    price_per_gpu_hour: float | None = None
    source: str = ""

    def peak(self, dtype: str) -> float:
        """Peak dense FLOP/s, derated when power-limited below TDP.

        Under a power cap, dynamic power P ∝ C·V²·f with V ∝ f over the DVFS range, so
        sustained clocks scale as (cap/TDP)^(1/3) (Weste & Harris, CMOS VLSI Design §5.1).
        """
        require(dtype in self.peak_flops_per_s, "workload.dtype",
                f"{self.name} has no {dtype} tensor-core peak "
                f"(supported: {sorted(self.peak_flops_per_s)})")
        derate = 1.0
        if self.power_limit_w and self.tdp_w and self.power_limit_w < self.tdp_w:
            derate = (self.power_limit_w / self.tdp_w) ** (1 / 3)
        return self.peak_flops_per_s[dtype] * derate

    def gemm_fraction(self, dtype: str) -> float:
        """Best achievable GEMM fraction of peak for `dtype` (falls back to bf16/fp16)."""
        f = self.gemm_peak_fraction
        return f.get(dtype) or f.get("bf16") or f.get("fp16") or 0.8


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    gpus_per_node: int
    fabric: Literal["nvswitch", "nvlink-mesh", "xgmi", "pcie", "shared-memory"]
    intra_bw_bytes_per_s: float  # per GPU per direction into the fabric
    intra_efficiency: float  # NCCL bus bandwidth / line rate on the fabric
    intra_latency_s: float  # α per ring step inside a node
    intra_allreduce_busbw_bytes_per_s: float = 0.0  # in-switch reduction (NVLS); 0: ring
    nics_per_node: int
    nic_bw_bytes_per_s: float  # per NIC per direction
    nic_efficiency: float
    inter_latency_s: float  # α per ring step between nodes
    pcie_bw_bytes_per_s: float  # host link per GPU per direction
    host_memory_bytes: float
    nvme_bw_bytes_per_s: float = 0.0
    nvme_bytes: float = 0.0  # local NVMe for offloading (the node's data cache); 0: none
    host_mem_bw_bytes_per_s: float = 200e9  # DRAM bandwidth of the node's CPUs


@dataclass(frozen=True, kw_only=True)
class NetworkSpec:
    """Rail-optimised fat tree: nodes under one leaf group, spines above, oversubscribed."""

    nodes_per_leaf: int = 16
    oversubscription: float = 1.0  # leaf uplink : downlink bandwidth ratio (>= 1)


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    name: str
    device: DeviceSpec
    node: NodeSpec
    network: NetworkSpec = field(default_factory=NetworkSpec)
    n_gpus: int = 0  # 0: one node
    source: str = ""

    def __post_init__(self) -> None:
        if self.n_gpus == 0:
            object.__setattr__(self, "n_gpus", self.node.gpus_per_node)

    def check(self) -> None:
        require(self.n_gpus > 0, "cluster.gpus", f"must be positive, got {self.n_gpus}")
        g = self.node.gpus_per_node
        require(
            self.n_gpus <= g or self.n_gpus % g == 0,
            "cluster.gpus",
            f"{self.n_gpus} GPUs is not a whole number of {g}-GPU nodes",
        )
        d = self.device
        require(d.kind in ("gpu", "cpu"), "cluster.device.kind",
                f"must be 'gpu' or 'cpu', got {d.kind!r}")
        fractions = {f"gemm_peak_fraction.{k}": v for k, v in d.gemm_peak_fraction.items()}
        fractions |= {"attention_peak_fraction": d.attention_peak_fraction,
                      "mem_bw_fraction": d.mem_bw_fraction}
        for name, v in fractions.items():
            require(0 < v <= 1, f"cluster.device.{name}", f"must be in (0, 1], got {v}")
        require(self.network.oversubscription >= 1, "cluster.network.oversubscription",
                f"must be >= 1, got {self.network.oversubscription}")

    def with_gpus(self, n_gpus: int) -> ClusterSpec:
        c = replace(self, n_gpus=n_gpus)
        c.check()
        return c

    @property
    def n_nodes(self) -> int:
        return math.ceil(self.n_gpus / self.node.gpus_per_node)

    @property
    def nic_bw_per_gpu_bytes_per_s(self) -> float:
        """Inter-node bandwidth a GPU can drive when every GPU of its node sends at once."""
        n = self.node
        return n.nics_per_node * n.nic_bw_bytes_per_s / n.gpus_per_node

    @cached_property
    def topology(self) -> nx.Graph:
        """GPU → node switch → leaf → spine graph; edge `bw` is bytes/s per direction.

        Built on first use; cost models use the tier arithmetic in `span_tier` instead,
        so a 16,384-GPU search never builds it.
        """
        return build_topology(self)

    def span_tier(self, gpus_per_node_in_group: int, group_size: int) -> str:
        """The highest network tier a group of ranks crosses: gpu, node, leaf or spine."""
        if group_size <= 1:
            return "gpu"
        nodes = math.ceil(group_size / gpus_per_node_in_group)
        if nodes <= 1:
            return "node"
        return "leaf" if nodes <= self.network.nodes_per_leaf else "spine"


def build_topology(c: ClusterSpec) -> nx.Graph:
    g = nx.Graph()
    n = c.node
    leaves = math.ceil(c.n_nodes / c.network.nodes_per_leaf)
    g.add_node("spine", tier="spine")
    uplink = n.nic_bw_bytes_per_s * n.nics_per_node * c.network.nodes_per_leaf
    for leaf in range(leaves):
        g.add_edge(f"leaf{leaf}", "spine", bw=uplink / c.network.oversubscription, tier="spine")
    for node in range(c.n_nodes):
        sw = f"node{node}"
        g.add_edge(sw, f"leaf{node // c.network.nodes_per_leaf}",
                   bw=n.nic_bw_bytes_per_s * n.nics_per_node, tier="leaf")
        for local in range(min(n.gpus_per_node, c.n_gpus - node * n.gpus_per_node)):
            gpu = node * n.gpus_per_node + local
            g.add_edge(f"gpu{gpu}", sw, bw=n.intra_bw_bytes_per_s, tier="node")
    return g
