"""Discrete-event engine (SimPy): one training step as it unfolds in time.

Where the analytical engine adds up closed forms, this engine executes the plan: every
simulated rank runs its pipeline schedule's action list (`core.schedule`, the same IR the
runtime executes) on a compute stream, and each communication has a stream of its own:
- TP collectives after the layer's compute (or under its GEMMs with `tp_overlap`), CP ring
  K/V passes under blockwise attention, EP dispatch and combine all-to-alls;
- pipeline sends on a send stream, received when they arrive;
- DP gradient buckets (DDP, 25 MiB) or FSDP units reduced as the last micro-batch's
  backward frees them (on the compute stream where FSDP's reduce-scatter has no side
  stream, `CostModel.reduce_scatter_overlaps`); FSDP all-gathers prefetched one unit
  ahead (ZeRO-3 every pass, ZeRO-1/2 and ZeRO-3 under PP on the first forward);
- the optimizer step once a rank's gradients are reduced, host offload copies after it.
Every flow loads its rank's links (NVLink/NVSwitch port, NIC, PCIe; directional) and,
where the node's processes share one medium (`CostModel.shared_fabric_bytes_per_s`: a CPU
host), that node's fabric by the processes it stands for; flows share every link max-min
fairly (`fluid.py`). Compute that overlaps a flow of its rank runs slower by the cost
model's `overlap_slowdown`. Where the transport moves a message only once its receive is
posted (`CostModel.sends_on_receive`: gloo), a pipeline send posted before its receive
starts moving then.

Scale by symmetry: data-parallel replicas and TP/CP ranks run the same program on the same
kinds of links, so one replica's `pp` ranks stand for all of them (a collective's time
already holds its group's size and tiers). A straggler breaks the symmetry: its replica
becomes a class of its own, simulated beside the representative one, and every DP
collective waits for both. Within a replica the slowest TP/CP rank sets the pace, since
they synchronise every layer. Mixed GPU types work the same way: a replica on other
hardware (`replica_clusters`) is a class whose compute, links and flows are priced on its
own device and node, and each DP collective spans every class, from the last to arrive to
the last to finish.

Where processes outnumber the cores they share and the cost model knows how the kernel
shares them (`CostModel.time_slicing`: a CPU host), symmetry no longer holds in time:
the scheduler hands the cores out in slices, so replicas that would run in lockstep
drift apart and one communicates while another computes. Every DP replica is then a
class of its own, the fluid time-shares the cores in a seeded run-queue order
(`fluid.Fluid`), and the step is the median of `SLICED_RUNS` runs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import simpy

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import require
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.results import SimResult, TimeBreakdown
from meshplan.core.schedule import Action, PipelineSchedule, build_schedule, splits_backward
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels import collectives as coll
from meshplan.costmodels.costs import NominalCosts, TimeSlicing

from .analytical import CostCache, LayerParts, PlanCosts, prepare, summarise
from .fluid import Fluid, Job, Link

CATEGORIES = ("compute", "recompute", "exposed_comm", "bubble", "offload", "optimizer")
# Runs of a time-shared step, each with its own run-queue order (`fluid.Fluid`); the step is
# their median. In 9 runs of a 4-process step on 2 cores the steps spread by about 5%.
SLICED_RUNS = 9


@dataclass(frozen=True, kw_only=True)
class DesOptions:
    """What-ifs and switches of the event engine.

    stragglers: (global rank, fraction slower), e.g. ((17, 0.2),): rank 17 computes 20%
    slower. Global ranks count TP fastest, then CP, DP and PP (Megatron's order).
    link_scale: (tier, factor) with tier "nvlink", "nic" or "pcie": that link of every
    rank at factor × its bandwidth (0.5: a degraded link).
    interference: compute slowdown while the rank communicates; None: the cost model's.
    replica_clusters: (DP replica index, cluster) for replicas on other hardware, e.g.
    ((1, a100_cluster),): replica 1's ranks compute on that cluster's device and talk over
    its node's links (nominal costs); every other replica runs on the plan's cluster.
    """

    stragglers: tuple[tuple[int, float], ...] = ()
    link_scale: tuple[tuple[str, float], ...] = ()
    interference: float | None = None
    replica_clusters: tuple[tuple[int, ClusterSpec], ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Span:
    rank: int  # simulated rank (class · pp + pipeline rank)
    stream: str  # compute, tp, cp, ep, dp, pp, offload
    name: str
    start_s: float
    end_s: float


@dataclass(frozen=True, kw_only=True)
class DesRun:
    result: SimResult
    spans: tuple[Span, ...]
    ranks: tuple[str, ...]  # label of each simulated rank
    per_rank_s: tuple[dict[str, float], ...]  # CATEGORIES per simulated rank
    link_utilisation: dict[str, float]  # mean busy fraction of each link over the step
    events: int  # SimPy events processed


@dataclass(frozen=True, kw_only=True, slots=True)
class _Flow:
    name: str
    stream: str
    alone_s: float
    demands: tuple[tuple[str, str, float], ...]  # (tier, direction, bytes/s at full speed)
    intra_rate: float = 0.0  # bytes/s the rank sends within its node at full speed


@dataclass(frozen=True, kw_only=True, slots=True)
class _Block:
    """Compute and flows that start together; the block ends when all have ended."""

    compute_s: float = 0.0
    kind: str = "compute"  # or "recompute"
    flows: tuple[_Flow, ...] = ()
    gather: bool = False  # wait for this layer's FSDP all-gather first
    grads_ready: bool = False  # a layer's gradients are complete after this block


# ---- links --------------------------------------------------------------------------

def _tier_of(group: coll.Group) -> str:
    return "nic" if group.nodes > 1 else "nvlink"


def _capacity(cluster: ClusterSpec) -> dict[str, float]:
    node = cluster.node
    nvlink = max(node.intra_bw_bytes_per_s * node.intra_efficiency,
                 node.intra_allreduce_busbw_bytes_per_s)
    return {"nvlink": nvlink,
            "nic": cluster.nic_bw_per_gpu_bytes_per_s * node.nic_efficiency,
            "pcie": node.pcie_bw_bytes_per_s}


class _Pricer:
    """Flows of one plan: time alone from the cost model, link loads from NCCL's bus
    bytes (`collectives.BUS_FACTOR`), never more than a link carries."""

    def __init__(self, cm: PlanCosts):
        self.cm, self.cap = cm, _capacity(cm.cluster)

    def collective(self, stream: str, group: coll.Group, op: coll.Collective,
                   size: float, alone_s: float | None = None, label: str = ""
                   ) -> tuple[_Flow, ...]:
        if group.size <= 1 or size <= 0:
            return ()
        t = self.cm.costs.collective_s(group, op, size) if alone_s is None else alone_s
        if t <= 0:
            return ()
        n, g = group.size, group.per_node
        if op == "all_to_all":
            intra, inter = (g - 1) / n * size, (n - g) / n * size
        else:
            vol = coll.BUS_FACTOR[op](n) * size
            intra = vol if group.nodes == 1 or g > 1 else 0.0
            inter = vol / g if group.nodes > 1 else 0.0
            if group.nodes > 1 and self.cm.cluster.span_tier(g, n) == "spine":
                inter *= self.cm.cluster.network.oversubscription
        loads = []
        for tier, vol in (("nvlink", intra), ("nic", inter)):
            if vol > 0:
                rate = min(self.cap[tier], vol / t)
                loads += [(tier, "out", rate), (tier, "in", rate)]
        return (_Flow(name=f"{label or op} {stream}({n})", stream=stream, alone_s=t,
                      demands=tuple(loads), intra_rate=intra / t),)

    def send(self, nbytes: float, crosses: bool, late: bool = False) -> _Flow:
        """A pipeline message from its send to its receive's end; `late`: its transfer
        alone, once a receive posted after the send asks for it (the rest of such a
        receive's wait is `late_receive_s`)."""
        tier = "nic" if crosses else "nvlink"
        costs = self.cm.costs
        t = costs.p2p_s(crosses, nbytes) if late else costs.stage_send_s(crosses, nbytes)
        rate = min(self.cap[tier], nbytes / t) if t > 0 else 0.0
        return _Flow(name="send", stream="pp", alone_s=t,
                     demands=((tier, "out", rate), (tier, "in", rate)),
                     intra_rate=0.0 if crosses or t <= 0 else nbytes / t)


# ---- the program of one stage --------------------------------------------------------

def _layer_blocks(parts: LayerParts, pr: _Pricer, cm: PlanCosts, moe: bool, split_w: bool
                  ) -> tuple[list[_Block], list[_Block], list[_Block]]:
    """(forward, backward, weight-gradient) blocks of one layer for one micro-batch."""
    # two TP all-reduces each way (as SP's all-gathers plus reduce-scatters: the same bus
    # bytes), the ring's passes (`PlanCosts._cp_ring`) and its last hop home, one
    # all-to-all at a time
    tp_op = "all_gather+reduce_scatter" if cm.plan.sp else "all_reduce"

    def tp(t: float) -> tuple[_Flow, ...]:
        return pr.collective("tp", cm.tp_group, "all_reduce", 2 * cm.tp_bytes, t, tp_op)

    def ring(backward: bool) -> tuple[_Flow, ...]:
        size = sum(cm.cp_ring_messages(backward))
        t = parts.cp_ring_b if backward else parts.cp_ring
        return pr.collective("cp", cm.cp_group, "p2p", size, t, "ring")

    ep = pr.collective("ep", cm.ep_group, "all_to_all", cm.ep_bytes, parts.ep) if moe else ()
    counts = pr.collective("ep", cm.ep_group, "all_to_all", cm.ep_counts_bytes,
                           parts.ep_counts, "counts") if moe else ()
    fwd: list[_Block] = [_Block(gather=True)]
    rest = parts.fwd
    if parts.cp_ring:
        fwd.append(_Block(compute_s=parts.attn_f, flows=ring(False)))
        rest -= parts.attn_f
    if parts.tp_f and parts.tp_overlap:
        fwd.append(_Block(compute_s=parts.gemm_f, flows=tp(parts.tp_f)))
        rest -= parts.gemm_f
    fwd.append(_Block(compute_s=rest))
    if parts.tp_f and not parts.tp_overlap:
        fwd.append(_Block(flows=tp(parts.tp_f)))
    fwd += [_Block(flows=counts), _Block(flows=ep), _Block(flows=ep)] if ep else []

    weight = parts.wgrad_s if split_w else 0.0  # the forward's GEMMs, and the split's cost
    bwd: list[_Block] = [_Block(gather=True)]
    if parts.recompute:
        bwd.append(_Block(compute_s=parts.recompute, kind="recompute"))
    rest = parts.bwd - weight
    bwd += [_Block(flows=ep), _Block(flows=ep)] if ep else []
    if parts.cp_ring:
        bwd.append(_Block(compute_s=parts.attn_b, flows=ring(True)))
        bwd.append(_Block(flows=pr.collective("cp", cm.cp_group, "p2p", cm.cp_home_bytes,
                                              parts.cp_home, "ring home")))
        rest -= parts.attn_b
    if parts.tp_b and parts.tp_overlap:
        tp_gemm = min(2 * parts.gemm_f, rest)
        bwd.append(_Block(compute_s=tp_gemm, flows=tp(parts.tp_b)))
        rest -= tp_gemm
    bwd.append(_Block(compute_s=rest, grads_ready=not split_w))
    if parts.tp_b and not parts.tp_overlap:
        bwd.append(_Block(flows=tp(parts.tp_b)))
    wgt = [_Block(compute_s=weight, grads_ready=True)] if split_w else []
    return fwd, bwd, wgt


@dataclass(kw_only=True)
class _StageProgram:
    fwd: list[_Block]
    bwd: list[_Block]
    wgt: list[_Block]
    layers: int


def _stage_program(cm: PlanCosts, pr: _Pricer, stage: int, split_w: bool) -> _StageProgram:
    dense, moe = cm.kinds[stage]
    last = len(cm.stage_layers) - 1
    first_s, last_s = stage == 0, stage == last
    ef, eb = cm.ends_phase(first_s, last_s) if (first_s or last_s) else (None, None)
    over_f = cm.costs.overhead_s("stage", backward=False)
    over_b = cm.costs.overhead_s("stage", backward=True)
    fwd, bwd, wgt = [_Block(compute_s=over_f + (ef.compute if ef else 0.0))], [], []
    ends_f, ends_b = ([_Block(flows=pr.collective("tp", cm.tp_group, op, size,
                                                  label=f"ends {op}"))
                       for op, size in way] for way in cm.ends_tp(first_s, last_s))
    fwd += ends_f
    kinds = [False] * dense + [True] * moe
    per_layer = {k: _layer_blocks(cm.layer_parts(k), pr, cm, k, split_w) for k in set(kinds)}
    for k in kinds:
        fwd += per_layer[k][0]
    for k in reversed(kinds):
        bwd += per_layer[k][1]
        wgt += per_layer[k][2]
    bwd.insert(0, _Block(compute_s=over_b))
    if eb is not None:  # the embedding's gradient, the first stage's last, completes here
        bwd.append(_Block(compute_s=eb.compute, grads_ready=first_s and not split_w))
    if first_s and split_w:
        wgt.append(_Block(grads_ready=True))
    bwd += ends_b
    return _StageProgram(fwd=_merge(fwd), bwd=_merge(bwd), wgt=_merge(wgt), layers=len(kinds))


def _merge(blocks: list[_Block]) -> list[_Block]:
    """Fold runs of plain compute blocks into one (fewer events, same times)."""
    out: list[_Block] = []
    for b in blocks:
        if b == _Block():
            continue
        prev = out[-1] if out else None
        plain = not (b.flows or b.gather or b.grads_ready)
        if (prev is not None and plain and not prev.flows and not prev.grads_ready
                and prev.kind == b.kind):
            out[-1] = replace(prev, compute_s=prev.compute_s + b.compute_s)
        else:
            out.append(b)
    return out


# ---- the engine ---------------------------------------------------------------------

@dataclass(kw_only=True)
class _Rank:
    index: int
    cls: int
    pp: int
    slow: float  # compute time factor
    spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    layers_ready: int = 0  # layers whose gradients are complete this step
    grads_blocked: int = 0  # gradient units `_blocking_grads` has passed
    gathers_done: int = 0
    gathers_used: int = 0
    ep_calls: int = 0  # EP all-to-alls issued this step
    end_s: float | None = None
    # each fires when the counter beside it grows, then is replaced
    ready: simpy.Event | None = None
    gathered: simpy.Event | None = None
    used: simpy.Event | None = None
    dp_done: simpy.Event | None = None
    lock: simpy.Resource | None = None  # the compute stream, for paired passes


def _bump(env: simpy.Environment, rank: _Rank, attr: str) -> None:
    old = getattr(rank, attr)
    setattr(rank, attr, env.event())
    old.succeed()


@dataclass(kw_only=True)
class _Hardware:
    """What a class of ranks runs on: its plan costs, flow pricing, stage programs and DP
    units (one per distinct cluster)."""

    cm: PlanCosts
    pr: _Pricer
    programs: list[_StageProgram]
    gather_units: dict[int, list[tuple[_Flow, ...]]]
    # per pipeline rank: (layers it waits for, flows, whether it blocks the compute)
    grad_units: dict[int, list[tuple[int, tuple[_Flow, ...], bool]]]


def _hardware(cm: PlanCosts, split_w: bool) -> _Hardware:
    pr = _Pricer(cm)
    gathers, grads = _dp_units(cm, pr)
    return _Hardware(cm=cm, pr=pr, gather_units=gathers, grad_units=grads,
                     programs=[_stage_program(cm, pr, s, split_w)
                               for s in range(len(cm.stage_layers))])


def _dp_units(cm: PlanCosts, pr: _Pricer) -> tuple[dict[int, list[tuple[_Flow, ...]]],
                                                   dict[int, list[tuple[int, tuple[_Flow, ...],
                                                                        bool]]]]:
    """Per pipeline rank: the all-gathers of one pass over its layers, in order (the
    first also gathers the root unit: embedding, final norm, head), and the gradient
    reductions with how many of the rank's layers each waits for and whether it blocks
    the compute stream (FSDP's reduce-scatter without a side stream,
    `CostModel.reduce_scatter_overlaps`). Units as the analytical engine prices them
    (`PlanCosts.dp_exposed_s`)."""
    gathers: dict[int, list[tuple[_Flow, ...]]] = {}
    grads: dict[int, list[tuple[int, tuple[_Flow, ...], bool]]] = {}
    blocks = not cm.costs.reduce_scatter_overlaps()
    for r in range(cm.plan.pp):
        per_group_g, per_group_r = [], []
        for u in cm.dp_units(r):
            red = pr.collective("dp", u.group, u.grad_op, u.unit_bytes)
            # gradients complete layer by layer, on the first stage the embedding's last
            ready = u.layers + (0 in cm.rank_stages[r])
            if not u.zero:  # DDP bucket k waits for its share
                per_group_r.append([(min(ready, math.ceil((k + 1) * ready / u.units)),
                                     red, False) for k in range(u.units)])
                continue
            per_group_r.append([(min(k + 1, ready), red, blocks) for k in range(u.units)])
            t = cm.costs.collective_s(u.group, "all_gather", u.unit_bytes)
            per_group_g.append([pr.collective("dp", u.group, "all_gather", u.unit_bytes,
                                              t * (2 if k == 0 else 1))
                                for k in range(u.layers)])
        # dense and expert units in the order their layers complete (stable sort)
        grads[r] = sorted((u for units in per_group_r for u in units), key=lambda u: u[0])
        gathers[r] = [tuple(f for g in unit for f in g)
                      for unit in zip(*per_group_g, strict=True)]
    return gathers, grads


class _Engine:
    def __init__(self, cm: PlanCosts, schedule: PipelineSchedule, opts: DesOptions,
                 slicing: TimeSlicing | None = None, seed: int = 0):
        self.cm, self.sched, self.opts = cm, schedule, opts
        self.env = simpy.Environment()
        self.slicing = slicing
        plan = cm.plan
        self.split_w = splits_backward(schedule)
        self.elsewhere = self._replica_clusters()
        base = _hardware(cm, self.split_w)
        self.classes = self._classes()
        self.ep_span = self._ep_classes()
        by_name = {cm.cluster.name: base}
        for c, _ in self.classes:
            if c is not None and c.name not in by_name:
                other = prepare(cm.model, c, cm.work, plan, CostCache(costs=NominalCosts(c)))
                by_name[c.name] = _hardware(other, self.split_w)
        self.hw = [by_name[c.name if c else cm.cluster.name] for c, _ in self.classes]
        self.ranks = [_Rank(index=c * plan.pp + r, cls=c, pp=r, slow=self.classes[c][1][r])
                      for c in range(len(self.classes)) for r in range(plan.pp)]
        scale = dict(opts.link_scale)
        for tier, k in opts.link_scale:
            require(tier in base.pr.cap and k > 0, "options.link_scale",
                    f"{tier}={k}: tiers are {sorted(base.pr.cap)} and factors > 0")
        capacity: dict[Link, float] = {
            (t, r.index, d): bw * scale.get(t, 1.0) for r in self.ranks
            for t, bw in self.hw[r.cls].pr.cap.items() for d in ("out", "in")}
        fabric = cm.costs.shared_fabric_bytes_per_s()
        self.fabric = fabric * scale.get("nvlink", 1.0) if fabric else 0.0
        self.on_fabric = self._fabric_shares() if fabric else {}
        capacity |= {("fabric", node, "both"): self.fabric
                     for node, _ in self.on_fabric.values()}
        slowdown = opts.interference
        if slowdown is None:
            slowdown = cm.costs.overlap_slowdown()
        shared = cm.costs.shared_cores()
        self.crowding = shared[1] if shared else 1.0  # priced in; the fluid shares instead
        self.fluid = Fluid(self.env, capacity, slowdown,
                           shared_cores=shared[0] if shared else None,
                           weight=self._processes() if shared else None,
                           slice_s=self.slicing.slice_s if self.slicing else None,
                           comm_share=self.slicing.comm_core_share if self.slicing else 0.0,
                           seed=seed)
        self.fluid.on_end = self._record
        self.spans: list[Span] = []
        # pipeline messages by (class, "F" | "B", receiving stage, micro-batch)
        self.arrivals: dict[tuple, simpy.Event] = {}
        self.posted: dict[tuple, tuple[_Rank, _Rank]] = {}  # sends posted: (sender, receiver)
        self.asked: set[tuple] = set()  # receives posted before their send
        self.barriers: dict[tuple, list[simpy.Event]] = {}

    def _classes(self) -> list[tuple[ClusterSpec | None, list[float]]]:
        """Per class of DP replicas: the cluster it runs on (None: the plan's) and its
        compute factor per pipeline rank; class 0 is every healthy replica on the plan's
        cluster, when there is one."""
        plan, n = self.cm.plan, self.cm.cluster.n_gpus
        per_replica: dict[int, dict[int, float]] = defaultdict(dict)
        for rank, frac in self.opts.stragglers:
            require(0 <= rank < n and frac >= 0, "options.stragglers",
                    f"rank {rank} slower by {frac}: ranks are 0..{n - 1}, fractions >= 0")
            inner = plan.tp * plan.cp
            pp_idx, rest = divmod(rank, plan.dp * inner)
            row = per_replica[rest // inner]
            row[pp_idx] = max(row.get(pp_idx, 1.0), 1.0 + frac)
        for dp_idx in self.elsewhere:
            per_replica.setdefault(dp_idx, {})
        if self.slicing is not None:  # time-shared cores: replicas drift apart
            for dp_idx in range(plan.dp):
                per_replica.setdefault(dp_idx, {})
        out: list[tuple[ClusterSpec | None, list[float]]] = []
        if len(per_replica) < plan.dp:
            out.append((None, [1.0] * plan.pp))
        for dp_idx in sorted(per_replica):
            out.append((self.elsewhere.get(dp_idx),
                        [per_replica[dp_idx].get(r, 1.0) for r in range(plan.pp)]))
        return out

    def _processes(self) -> dict[int, float]:
        """Simulated rank -> the job's processes it stands for: its TP and CP group in
        every DP replica of its class (class 0 holds the replicas no option singles out)."""
        plan = self.cm.plan
        counts = [plan.dp - (len(self.classes) - 1)] + [1] * (len(self.classes) - 1)
        return {r.index: counts[r.cls] * plan.tp * plan.cp for r in self.ranks}

    def _fabric_shares(self) -> dict[int, tuple[int, float]]:
        """Simulated rank on the plan's cluster -> (the node its stage starts on, the
        processes it stands for on that node), for a shared fabric per node. Ranks are
        laid out pp-major (`runtime.mesh`), so a stage of S processes starts on node
        stage·S // per_node and, if S is larger than a node, spreads evenly over S / per_node
        nodes, each with a fabric of its own."""
        plan, per_node = self.cm.plan, self.cm.cluster.node.gpus_per_node
        stage_size = plan.dp * plan.tp * plan.cp
        procs = self._processes()
        return {r.index: (r.pp * stage_size // per_node,
                          procs[r.index] * min(1.0, per_node / stage_size))
                for r in self.ranks if self.hw[r.cls].cm is self.cm}

    def _compute(self, rank: _Rank, seconds: float) -> simpy.Event:
        """Run `seconds` of priced compute on a rank (its straggler factor applied; under
        shared cores the crowding priced into it divided out, the fluid shares instead)."""
        return self.fluid.run(Job(work_s=seconds * rank.slow / self.crowding, rank=rank.index))

    def _replica_clusters(self) -> dict[int, ClusterSpec]:
        """DP replica -> the other cluster it runs on (checked; same-cluster entries left
        out)."""
        cm = self.cm
        for idx, c in self.opts.replica_clusters:
            require(0 <= idx < cm.plan.dp, "options.replica_clusters",
                    f"replica {idx}: the plan has dp={cm.plan.dp} replicas (0..{cm.plan.dp - 1})")
            require(c.n_gpus == cm.cluster.n_gpus and
                    c.node.gpus_per_node == cm.cluster.node.gpus_per_node,
                    "options.replica_clusters",
                    f"replica {idx} on {c.name}: {c.n_gpus} GPUs in nodes of "
                    f"{c.node.gpus_per_node}, the plan's cluster has {cm.cluster.n_gpus} in "
                    f"nodes of {cm.cluster.node.gpus_per_node}; the layouts must match")
        return {i: c for i, c in self.opts.replica_clusters if c.name != cm.cluster.name}

    # ---- data parallelism -----------------------------------------------------------
    def _run_flows(self, rank: _Rank, flows: tuple[_Flow, ...], peer: _Rank | None = None
                   ) -> simpy.Event:
        dst = peer if peer is not None else rank
        events = []
        for f in flows:
            demands = {(tier, (rank if d == "out" else dst).index, d): rate
                       for tier, d, rate in f.demands}
            if f.intra_rate and rank.index in self.on_fabric:
                node, procs = self.on_fabric[rank.index]
                demands[("fabric", node, "both")] = min(self.fabric, procs * f.intra_rate)
            job = Job(work_s=f.alone_s, rank=rank.index, demands=demands,
                      ranks=tuple(sorted({rank.index, dst.index})), name=f.name,
                      stream=f.stream)
            events.append(self.fluid.run(job))
        return events[0] if len(events) == 1 else self.env.all_of(events)

    def _collective(self, rank: _Rank, key: tuple, flows: tuple[_Flow, ...]):
        """A DP collective (gradient reduction, FSDP all-gather) starts once every class
        has reached it (stragglers included) and ends for all once the slowest class's
        part has ended (other hardware)."""
        if len(self.classes) > 1:
            yield self._barrier((*key, "start"))
        yield self._run_flows(rank, flows)
        if len(self.classes) > 1:
            yield self._barrier((*key, "end"))

    def _barrier(self, key: tuple, size: int | None = None) -> simpy.Event:
        """An event that fires once every class (or `size` of them) has asked for it
        under `key`."""
        waiting = self.barriers.setdefault(key, [])
        ev = self.env.event()
        waiting.append(ev)
        if len(waiting) == (size or len(self.classes)):
            for e in waiting:
                e.succeed()
        return ev

    def _dp_stream(self, rank: _Rank):
        """Reduce gradient units as the rank's layers finish their last backward (those
        that block the compute: `_blocking_grads`)."""
        for i, (need, flows, blocks) in enumerate(self.hw[rank.cls].grad_units[rank.pp]):
            if blocks:
                continue
            while rank.layers_ready < need:
                yield rank.ready
            yield from self._collective(rank, ("grad", rank.pp, i), flows)
        assert rank.dp_done is not None
        rank.dp_done.succeed()

    def _gather_stream(self, rank: _Rank, uses: int):
        """FSDP all-gathers, at most one unit ahead of the layer computing."""
        units = self.hw[rank.cls].gather_units[rank.pp]
        for k in range(uses):
            while rank.gathers_used < k - 1:
                yield rank.used
            yield from self._collective(rank, ("gather", rank.pp, k), units[k % len(units)])
            rank.gathers_done += 1
            _bump(self.env, rank, "gathered")

    # ---- compute stream ---------------------------------------------------------------
    def _wait(self, rank: _Rank, event: simpy.Event, category: str):
        t0 = self.env.now
        yield event
        rank.spent[category] += self.env.now - t0

    def _blocks(self, rank: _Rank, blocks: list[_Block], gathering: bool, grad_pass: bool,
                name: str, lock: simpy.Resource | None = None):
        """Run one pass's blocks; with `lock` (the rank's compute, shared with the pass it
        is paired with) its communication waits are the pair's to account."""
        t_start = self.env.now
        for b in blocks:
            if b.gather and gathering:
                yield from self._use_gather(rank)
            comm = self._layer_flows(rank, b.flows) if b.flows else None
            if b.compute_s:
                req = lock.request() if lock is not None else None
                if req is not None:
                    yield req
                t0 = self.env.now
                yield self._compute(rank, b.compute_s)
                rank.spent[b.kind] += self.env.now - t0
                if lock is not None:
                    lock.release(req)
            if comm is not None:
                t1 = self.env.now
                yield comm
                if lock is None:
                    rank.spent["exposed_comm"] += self.env.now - t1
            if b.grads_ready and grad_pass:
                rank.layers_ready += 1
                _bump(self.env, rank, "ready")
                if self.cm.plan.dp_overlap:
                    yield from self._blocking_grads(rank)
        self.spans.append(Span(rank=rank.index, stream="compute", name=name,
                               start_s=t_start, end_s=self.env.now))

    def _layer_flows(self, rank: _Rank, flows: tuple[_Flow, ...]) -> simpy.Event:
        if self.ep_span > 1 and flows[0].stream == "ep":
            rank.ep_calls += 1
            return self.env.process(self._ep_exchange(rank, rank.ep_calls, flows))
        return self._run_flows(rank, flows)

    def _ep_exchange(self, rank: _Rank, call: int, flows: tuple[_Flow, ...]):
        """An EP all-to-all whose group spans classes starts once each has reached it."""
        group = rank.cls // self.ep_span
        yield self._barrier(("ep", group, rank.pp, call), self.ep_span)
        yield self._run_flows(rank, flows)

    def _ep_classes(self) -> int:
        """Classes one EP group spans: where every DP replica is a class of its own and
        an EP group holds several (`runtime.mesh` cuts the flattened dp·cp ranks into
        consecutive EP groups), their number; else 1, each class's all-to-alls its own
        (the representative class stands for whole groups)."""
        plan = self.cm.plan
        if plan.ep == 1 or len(self.classes) != plan.dp or plan.ep % plan.cp:
            return 1
        return plan.ep // plan.cp

    def _blocking_grads(self, rank: _Rank):
        """The reductions that block the compute stream and whose layers are all ready,
        in order, on the compute stream."""
        units = self.hw[rank.cls].grad_units[rank.pp]
        while rank.grads_blocked < len(units):
            i = rank.grads_blocked
            need, flows, blocks = units[i]
            if blocks and need > rank.layers_ready:
                return
            rank.grads_blocked += 1
            if blocks:
                reduce = self.env.process(self._collective(rank, ("grad", rank.pp, i), flows))
                yield from self._wait(rank, reduce, "exposed_comm")

    def _use_gather(self, rank: _Rank):
        if self.cm.plan.dp_overlap:
            while rank.gathers_done <= rank.gathers_used:
                yield from self._wait(rank, rank.gathered, "exposed_comm")
        else:
            units = self.hw[rank.cls].gather_units[rank.pp]
            flows = units[rank.gathers_used % len(units)]
            key = ("gather", rank.pp, rank.gathers_used)
            yield from self._wait(rank, self.env.process(self._collective(rank, key, flows)),
                                  "exposed_comm")
        rank.gathers_used += 1
        _bump(self.env, rank, "used")

    def _rank_proc(self, rank: _Rank):
        hw = self.hw[rank.cls]
        cm, plan = hw.cm, hw.cm.plan
        grads_at = "W" if self.split_w else "B"
        last_mb = {a.stage: a.microbatch for a in self.sched.actions[rank.pp]
                   if a.kind == grads_at}
        has_gathers = bool(hw.gather_units[rank.pp])
        seen: set[int] = set()

        def compute_pass(a: Action, lock: simpy.Resource | None = None):
            k = a.kind
            prog = hw.programs[self.sched.block(a.stage)]
            blocks = {"F": prog.fwd, "B": prog.bwd, "W": prog.wgt}[k]
            if k == "F":  # ZeRO-1/2 without overlap gathers after the optimizer step
                gathering = has_gathers and (cm.regathers or (
                    a.stage not in seen and plan.dp_overlap))
                seen.add(a.stage)
            else:
                gathering = has_gathers and k == "B" and cm.regathers
            grad_pass = k == grads_at and a.microbatch == last_mb[a.stage]
            return self._blocks(rank, blocks, gathering, grad_pass, str(a), lock)

        acts = self.sched.actions[rank.pp]
        for i, a in enumerate(acts):
            k = a.kind
            if a.paired:
                continue  # ran with the forward before it
            if k == "F" and i + 1 < len(acts) and acts[i + 1].paired:
                yield from self._pair(rank, compute_pass(a, rank.lock),
                                      compute_pass(acts[i + 1], rank.lock))
            elif k in ("F", "B", "W"):
                yield from compute_pass(a)
            elif k in ("SF", "SB"):
                self._send(rank, a)
            elif k in ("RF", "RB"):
                yield from self._receive(rank, a)
            elif k == "RG":
                yield from self._reduce_grads(rank)
            elif k == "OPT":
                yield from self._optimizer(rank)
        rank.end_s = self.env.now

    def _pair(self, rank: _Rank, first, second):
        """A forward and a backward of the other direction at once (DualPipe): one
        compute stream between them, so each one's communication can run under the
        other's compute. What of the pair's time no compute explains is exposed comm."""
        t0, before = self.env.now, sum(rank.spent.values())
        yield self.env.all_of([self.env.process(first), self.env.process(second)])
        rank.spent["exposed_comm"] += (self.env.now - t0) - (sum(rank.spent.values()) - before)

    def _arrival(self, key: tuple) -> simpy.Event:
        if key not in self.arrivals:
            self.arrivals[key] = self.env.event()
        return self.arrivals[key]

    def _send(self, rank: _Rank, a: Action) -> None:
        """Post a pipeline send (it never blocks the compute stream, as with isend). The
        message moves now unless the transport waits for its receive
        (`CostModel.sends_on_receive`) and that is not posted yet."""
        cm = self.hw[rank.cls].cm
        to_stage = a.stage + 1 if a.kind == "SF" else a.stage - 1
        peer = self.ranks[rank.cls * cm.plan.pp + self.sched.rank_of(to_stage)]
        key = (rank.cls, "F" if a.kind == "SF" else "B", to_stage, a.microbatch)
        self.posted[key] = (rank, peer)
        if not cm.costs.sends_on_receive() or key in self.asked:
            self._move(key, late=False)

    def _move(self, key: tuple, late: bool) -> None:
        """Run a posted message's transfer; its arrival fires at the end."""
        rank, peer = self.posted[key]
        cm, pr = self.hw[rank.cls].cm, self.hw[rank.cls].pr
        done = self._run_flows(rank, (pr.send(cm.stage_send_bytes, cm.pp_crosses_node, late),),
                               peer)
        arrival = self._arrival(key)
        done.callbacks.append(lambda _e: arrival.succeed())

    def _receive(self, rank: _Rank, a: Action):
        """Wait for a pipeline message: waiting for one not yet sent is bubble. One sent
        before its receive is posted costs the transport's hand-over (`late_receive_s`)
        and, where the transport moves it only now, its whole transfer: both exposed
        communication."""
        costs = self.hw[rank.cls].cm.costs
        key = (rank.cls, "F" if a.kind == "RF" else "B", a.stage, a.microbatch)
        arrival, late = self._arrival(key), costs.late_receive_s()
        if key not in self.posted:
            self.asked.add(key)
            yield from self._wait(rank, arrival, "bubble")
        elif costs.sends_on_receive():
            if late > 0:
                yield from self._wait(rank, self.env.timeout(late), "exposed_comm")
            self._move(key, late=True)
            yield from self._wait(rank, arrival, "exposed_comm")
        else:
            arrived = arrival.triggered
            yield from self._wait(rank, arrival, "bubble")
            if arrived and late > 0:
                yield from self._wait(rank, self.env.timeout(late), "exposed_comm")

    def _reduce_grads(self, rank: _Rank):
        hw = self.hw[rank.cls]
        if self.cm.plan.dp_overlap:
            assert rank.dp_done is not None
            yield from self._wait(rank, rank.dp_done, "exposed_comm")
        else:
            for i, (_need, flows, _blocks) in enumerate(hw.grad_units[rank.pp]):
                t0 = self.env.now
                yield from self._collective(rank, ("grad", rank.pp, i), flows)
                rank.spent["exposed_comm"] += self.env.now - t0
        twin = hw.cm.twin_sync_s(rank.pp)
        if twin:  # DualPipe: the two copies of each block sum their gradients
            flows = hw.pr.collective("pp", hw.cm.twin_group, "all_reduce",
                                     hw.cm.twin_sync_bytes(rank.pp), twin, "twin all_reduce")
            yield from self._wait(rank, self._run_flows(rank, flows), "exposed_comm")
        sp = hw.cm.sp_grads_bytes(rank.pp)
        if sp:  # SP: the norm weights' partial gradients, once per step
            flows = hw.pr.collective("tp", hw.cm.tp_group, "all_reduce", sp,
                                     label="sp norm grads all_reduce")
            yield from self._wait(rank, self._run_flows(rank, flows), "exposed_comm")

    def _optimizer(self, rank: _Rank):
        """The optimizer step, the host offload after it, and, for ZeRO-1/2 without
        overlap, the all-gather of the updated parameters (Megatron's distributed optimizer
        without --overlap-param-gather)."""
        hw = self.hw[rank.cls]
        opt_s, offload_s = hw.cm.optimizer_s(rank.pp)
        t0 = self.env.now
        stream = hw.cm.stream_s() - t0  # offload=layers: PCIe streaming outlasting compute
        if stream > 0:
            yield self.env.timeout(stream)
            rank.spent["offload"] += stream
            t0 = self.env.now
        if opt_s:
            yield self._compute(rank, opt_s)
            rank.spent["optimizer"] += self.env.now - t0
            self.spans.append(Span(rank=rank.index, stream="compute", name="OPT",
                                   start_s=t0, end_s=self.env.now))
        if offload_s:  # grads down and parameters up over PCIe, Adam on the host
            t0 = self.env.now
            cap = hw.pr.cap["pcie"]
            yield self.fluid.run(Job(
                work_s=offload_s, rank=rank.index, ranks=(rank.index,),
                demands={("pcie", rank.index, d): cap for d in ("out", "in")},
                name="optimizer offload", stream="offload"))
            rank.spent["offload"] += self.env.now - t0
        if not self.cm.plan.dp_overlap and not self.cm.regathers:
            for i, flows in enumerate(hw.gather_units[rank.pp]):
                gather = self.env.process(self._collective(rank, ("regather", rank.pp, i), flows))
                yield from self._wait(rank, gather, "exposed_comm")

    def _record(self, job: Job) -> None:
        if job.is_flow:
            self.spans.append(Span(rank=job.rank, stream=job.stream, name=job.name,
                                   start_s=job.start_s, end_s=self.env.now))

    # ---- run ---------------------------------------------------------------------------
    def run(self) -> float:
        for rank in self.ranks:
            for attr in ("ready", "gathered", "used", "dp_done"):
                setattr(rank, attr, self.env.event())
            rank.lock = simpy.Resource(self.env, capacity=1)
            self.env.process(self._rank_proc(rank))
            hw = self.hw[rank.cls]
            if self.cm.plan.dp_overlap and hw.grad_units[rank.pp]:
                self.env.process(self._dp_stream(rank))
            else:
                rank.dp_done.succeed()  # type: ignore[union-attr]
            if hw.gather_units[rank.pp] and self.cm.plan.dp_overlap:
                self.env.process(self._gather_stream(rank, self._gather_uses(rank)))
        self.env.run()
        stuck = [r.index for r in self.ranks if r.end_s is None]
        if stuck:
            raise RuntimeError(f"the event engine stalled: ranks {stuck} never finished")
        return max(r.end_s or 0.0 for r in self.ranks)

    def _gather_uses(self, rank: _Rank) -> int:
        """Layer passes on this rank that wait for an all-gather in one step."""
        cm, hw = self.cm, self.hw[rank.cls]
        layers = sum(hw.programs[s].layers for s in cm.rank_stages[rank.pp])
        return 2 * layers * self.sched.n_microbatches if cm.regathers else layers


def _peak_flops(cm: PlanCosts, eng: _Engine) -> float:
    """Nominal FLOP/s of every GPU of a mixed job: each replica's on its own device."""
    where = eng.elsewhere
    per_replica = cm.cluster.n_gpus // cm.plan.dp
    return per_replica * sum(where.get(i, cm.cluster).device.peak_flops_per_s[cm.work.dtype]
                             for i in range(cm.plan.dp))


def _schedule(cm: PlanCosts) -> PipelineSchedule:
    plan = cm.plan
    return build_schedule(plan.schedule, plan.pp, cm.m, plan.vpp)


def simulate_des(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
                 cache: CostCache | None = None, options: DesOptions | None = None) -> DesRun:
    """Run one training step of `plan` through the event engine. Where the cores are
    time-shared (`CostModel.time_slicing`), every DP replica is simulated and the
    step is the median of `SLICED_RUNS` runs, each with its own run-queue order."""
    cm = prepare(model, cluster, work, plan, cache)
    schedule, opts = _schedule(cm), options or DesOptions()
    slicing = cm.costs.time_slicing()
    runs = [_run(_Engine(cm, schedule, opts, slicing, seed))
            for seed in range(SLICED_RUNS if slicing is not None else 1)]
    return sorted(runs, key=lambda r: r.result.step_time_s)[len(runs) // 2]


def _run(eng: _Engine) -> DesRun:
    cm = eng.cm
    step = eng.run()
    for r in eng.ranks:
        r.spent["bubble"] += step - (r.end_s or 0.0)
    worst = max(eng.ranks, key=lambda r: r.spent["compute"] + r.spent["recompute"])
    time = TimeBreakdown(**{k: worst.spent[k] for k in CATEGORIES})
    dp = [s for s in eng.spans if s.stream == "dp" and s.rank == worst.index]
    others = tuple(eng.elsewhere.values())
    result = summarise(cm, step, time, engine="des",
                       comm_s={"dp_total": sum(s.end_s - s.start_s for s in dp)},
                       peak_flops_per_s=_peak_flops(cm, eng) if others else None,
                       clusters=others)
    util = {f"{t}:{r}:{d}": b / (eng.fluid.capacity[(t, r, d)] * step)
            for (t, r, d), b in sorted(eng.fluid.link_bytes.items()) if step > 0}
    many = len(eng.classes) > 1
    on = [f" {eng.hw[r.cls].cm.cluster.device.name}" if others else "" for r in eng.ranks]
    labels = tuple(f"class {r.cls}{o} pp {r.pp}" if many else f"pp {r.pp}"
                   for r, o in zip(eng.ranks, on, strict=True))
    return DesRun(result=result, spans=tuple(eng.spans), ranks=labels,
                  per_rank_s=tuple(dict(r.spent) for r in eng.ranks),
                  link_utilisation=util, events=eng.fluid.events)
