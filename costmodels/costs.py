"""The device cost protocol: what a simulator asks of a cost model, and the nominal one.

A `CostModel` prices the primitive operations of a training step on one cluster. Two
implementations share the protocol: `NominalCosts` reasons from the catalog's spec-sheet
numbers (`compute.py`, `collectives.py`), `CalibratedCosts` (`calibrated.py`)
interpolates the tables that `meshplan profile` measured. Simulators take either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from meshplan.core.cluster import ClusterSpec

from . import collectives as coll
from .compute import attention_time_s, gemm_time_s, memory_time_s
from .flops import eager_factor

# Bytes one step moves per parameter. Adam: read fp32 master, m, v and the 16-bit
# gradient, write master, m, v and the 16-bit parameter; SGD with momentum: read master,
# momentum, gradient, write master, momentum, parameter.
OPTIMIZER_BYTES_PER_PARAM = {"adam": 28, "sgd": 20}
OVERLAP_SLOWDOWN = 0.189  # see NominalCosts.overlap_slowdown


def exposed_beside(compute_s: float, comm_s: float, slowdown: float) -> float:
    """Seconds that `comm_s` of communication adds to `compute_s` of compute it overlaps,
    when the compute runs `1 + slowdown` times slower while both run (the fluid model of
    `simulator/fluid.py`, solved for one pair): if the communication outlasts the slowed
    compute it is exposed beyond it, else the compute pays `comm·slowdown/(1+slowdown)`."""
    return max(comm_s - compute_s, comm_s * slowdown / (1.0 + slowdown))


@dataclass(frozen=True, kw_only=True)
class TimeSlicing:
    """How an operating system shares cores among more busy processes than it has.
    `slice_s`: how long a process computes before the kernel gives its core to another
    waiting; `comm_core_share`: the cores a process keeps busy while its collectives
    run and it does not compute (gloo's transport threads copying and polling), which
    they take from the processes computing."""
    slice_s: float
    comm_core_share: float


class CostModel(Protocol):
    name: str

    def gemm_s(self, dtype: str, m: int, n: int, k: int, batch: int = 1) -> float:
        """One (m x k) @ (k x n) GEMM, `batch` times, including its launch."""
        ...

    def attention_s(self, dtype: str, flops: float, kv_len: int,
                    backward: bool = False) -> float:
        """Fused attention of `flops` FLOPs over keys of length `kv_len` (forward, or the
        backward pass when `backward`)."""
        ...

    def memory_s(self, traffic_bytes: float, kernels: int = 1) -> float:
        """Bandwidth-bound work moving `traffic_bytes` in `kernels` launches."""
        ...

    def overhead_s(self, unit: str, backward: bool, work_s: float = 0.0) -> float:
        """Host time an eager runtime spends per `unit` and micro-batch beyond its ops and
        messages: Python, module calls, autograd. Units: "layer", "stage" (per model chunk
        call), and "layer:<mechanism>" for what a parallel mechanism adds to each layer
        ("tp", "cp", "fsdp", "zero2", "moe", "ep"): a fixed part and a part that grows with
        `work_s`, the seconds of the layer's ops and plain-layer overhead it wraps."""
        ...

    def split_backward_s(self, backward_s: float) -> float:
        """Seconds a layer's backward of `backward_s` gains when it runs as an input pass
        and a weight pass (ZB-H1, DualPipe), both passes together."""
        ...

    def optimizer_s(self, optimizer: str, params: float, tensors: int) -> float:
        """One optimizer step over `params` parameters held in `tensors` tensors."""
        ...

    def overlap_slowdown(self) -> float:
        """How much slower compute runs while the same device communicates (0.2: 20%)."""
        ...

    def shared_cores(self) -> tuple[int, float] | None:
        """(cores, crowding) where the job's processes outnumber the cores they share (a
        CPU host): every compute time above is priced for all processes computing at
        once, `crowding` = processes / cores times longer than with at most `cores`. An
        engine that knows when processes idle may divide it out and share the cores among
        those computing. None where each process has a device of its own."""
        ...

    def time_slicing(self) -> TimeSlicing | None:
        """Where processes share few cores (`shared_cores`), how their scheduler shares
        them (an engine that time-shares the cores lets independent groups drift out of
        phase); None: not measured, or a device per process."""
        ...

    def reduce_scatter_overlaps(self) -> bool:
        """Whether FSDP's gradient reduce-scatters run beside the backward. PyTorch's
        FSDP2 issues them as blocking calls (`fsdp._fully_shard._fsdp_collectives.
        foreach_reduce`, `async_op=False`); on a GPU that blocks only a side stream, on a
        CPU device, which has no streams, it blocks the backward."""
        ...

    def shared_fabric_bytes_per_s(self) -> float | None:
        """Bytes per second that all intra-node traffic of a node shares, both directions
        together, where its devices talk over one shared medium (a CPU host's loopback:
        every process's messages are copied by the same few cores); None where each
        device has full-duplex links of its own (NVLink/NVSwitch ports, NICs)."""
        ...

    def mem_op_s(self, dtype: str, name: str, nbytes: float, eager: bool) -> float:
        """One named memory-bound op of a layer (`costmodels.flops` names and bytes: a norm,
        RoPE, a residual add, ...; `_bwd` names their backward), fused or `eager`."""
        ...

    def collective_s(self, group: coll.Group, op: coll.Collective, size_bytes: float) -> float:
        """One collective over `group` on a buffer of `size_bytes` (gathered size)."""
        ...

    def p2p_s(self, crosses_node: bool, size_bytes: float) -> float:
        """One point-to-point send."""
        ...

    def ring_hop_s(self, group: coll.Group, size_bytes: float) -> float:
        """One hop of a ring over `group` (ring attention's K/V): every rank sends
        `size_bytes` to the next and receives as much from the previous, all at once."""
        ...

    def stage_send_s(self, crosses_node: bool, size_bytes: float) -> float:
        """One activation or gradient between pipeline stages, from the start of its send
        to the end of its receive, in a running pipeline: the sender goes on computing."""
        ...

    def late_receive_s(self) -> float:
        """Seconds a pipeline receive takes when its message was sent before the receive
        was posted and the sender has gone on computing: what the transport needs of the
        sender to hand the message over once the receiver asks."""
        ...

    def sends_on_receive(self) -> bool:
        """Whether a message moves only once its receive is posted (a rendezvous), so that
        a receive posted after its send waits `late_receive_s` and then the whole
        transfer. gloo's TCP transport queues a send until the receiver's "recv ready"
        notice comes (`gloo/transport/tcp/pair.cc`, `Pair::send` and
        `NOTIFY_RECV_READY`)."""
        ...


class NominalCosts:
    """Spec-sheet reasoning: shape-aware rooflines and α–β collectives."""

    name = "nominal"

    def __init__(self, cluster: ClusterSpec):
        self.cluster, self.device = cluster, cluster.device

    def gemm_s(self, dtype: str, m: int, n: int, k: int, batch: int = 1) -> float:
        return gemm_time_s(self.device, dtype, m, n, k, batch)

    def attention_s(self, dtype: str, flops: float, kv_len: int,
                    backward: bool = False) -> float:
        return attention_time_s(self.device, dtype, flops, kv_len)

    def memory_s(self, traffic_bytes: float, kernels: int = 1) -> float:
        return memory_time_s(self.device, traffic_bytes, kernels)

    def overhead_s(self, unit: str, backward: bool, work_s: float = 0.0) -> float:
        return 0.0  # the nominal model assumes kernels are queued ahead (CUDA streams)

    def split_backward_s(self, backward_s: float) -> float:
        """The split moves the weight-gradient GEMMs to a pass of their own, the same
        kernels (Qi et al. 2023, §2): nothing."""
        return 0.0

    def optimizer_s(self, optimizer: str, params: float, tensors: int) -> float:
        """A fused (multi-tensor) step: memory-bound, four kernels."""
        return memory_time_s(self.device, params * OPTIMIZER_BYTES_PER_PARAM[optimizer],
                             kernels=4)

    def overlap_slowdown(self) -> float:
        """Lee et al. 2025, "Characterizing Compute-Communication Overlap in GPU-Accelerated
        Distributed Deep Learning" (arXiv 2507.03114), abstract: overlapped compute ran
        18.9% slower on average (max 40%) over GPT/Llama training on A100, H100, MI250 and
        MI210 (communication kernels take SMs and memory bandwidth)."""
        return OVERLAP_SLOWDOWN

    def shared_cores(self) -> tuple[int, float] | None:
        return None  # a GPU per process

    def time_slicing(self) -> TimeSlicing | None:
        return None  # a GPU per process

    def reduce_scatter_overlaps(self) -> bool:
        return True  # NCCL on FSDP2's reduce-scatter stream

    def shared_fabric_bytes_per_s(self) -> float | None:
        return None  # the catalog's fabrics are per-device ports

    def mem_op_s(self, dtype: str, name: str, nbytes: float, eager: bool) -> float:
        return memory_time_s(self.device, nbytes * (eager_factor(name) if eager else 1.0))

    def collective_s(self, group: coll.Group, op: coll.Collective, size_bytes: float) -> float:
        return coll.collective_time_s(self.cluster, group, op, size_bytes)

    def p2p_s(self, crosses_node: bool, size_bytes: float) -> float:
        return coll.p2p_time_s(self.cluster, crosses_node, size_bytes)

    def ring_hop_s(self, group: coll.Group, size_bytes: float) -> float:
        """Links carry both directions at full speed (NVLink, InfiniBand): a ring hop, every
        rank sending and receiving at once, takes what one send takes."""
        return self.p2p_s(group.nodes > 1, size_bytes)

    def stage_send_s(self, crosses_node: bool, size_bytes: float) -> float:
        """A copy engine or NIC moves it while the SMs compute: as alone."""
        return self.p2p_s(crosses_node, size_bytes)

    def late_receive_s(self) -> float:
        """NCCL's send kernel is already waiting on the GPU when the receiver comes: none."""
        return 0.0

    def sends_on_receive(self) -> bool:
        """NCCL's sender writes into the receiver's staging buffer (NCCL_BUFFSIZE, 4 MiB by
        default) without waiting for the receive."""
        return False
