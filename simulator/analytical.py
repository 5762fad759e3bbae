"""Analytical step-time and memory model: one plan in well under a millisecond.

The step is a pipeline of micro-batches (Narayanan et al. 2021 §2.2): every pipeline rank
spends t_r per micro-batch (forward + backward + recompute + exposed TP/CP/EP
communication of the layers it owns); with m micro-batches and v chunks per rank the
pipeline takes m·max_r t_r + (Σ_r t_r − max_r t_r)/v, which for equal stages is the
familiar (m + (p−1)/v)·t, i.e. a bubble of (p−1)/(v·m) of the ideal time. Data-parallel
communication is added where backward (or, for ZeRO-3, forward and backward) cannot hide
it, then the optimizer step. Peak memory is the largest over pipeline ranks of model
states plus the activations of the micro-batches its schedule keeps alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from meshplan.core.check import check_plan
from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan, ep_rank_imbalance, layer_split, rank_blocks
from meshplan.core.results import MemoryBreakdown, SimResult, TimeBreakdown
from meshplan.core.schedule import SPLIT_SCHEDULES, build_schedule, execute, late_receives
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels import collectives as coll
from meshplan.costmodels import memory as mem
from meshplan.costmodels.costs import (
    OPTIMIZER_BYTES_PER_PARAM,
    CostModel,
    NominalCosts,
    exposed_beside,
)
from meshplan.costmodels.flops import (
    Op,
    Shard,
    backward,
    embedding_ops,
    fp8_casts,
    head_ops,
    kv_width,
    layer_ops,
    model_flops_per_token,
    recompute_flops_per_token,
    tp_chunked,
)
from meshplan.costmodels.offload import (
    OffloadProblem,
    OffloadSolution,
    OffloadUnit,
    Quantised,
    optimizer_phase_s,
    runtime_solution,
    transfer_s,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Phase:
    """Seconds one micro-batch spends in a block of layers on one rank."""

    compute: float = 0.0
    recompute: float = 0.0
    comm: float = 0.0  # exposed TP / CP / EP communication

    def __add__(self, other: Phase) -> Phase:
        return Phase(compute=self.compute + other.compute,
                     recompute=self.recompute + other.recompute, comm=self.comm + other.comm)

    def scale(self, k: float) -> Phase:
        return Phase(compute=self.compute * k, recompute=self.recompute * k, comm=self.comm * k)

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.comm


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerParts:
    """One transformer layer for one micro-batch on one rank: compute seconds (with the
    runtime's per-layer overheads) and its communication as it would take alone. The
    analytical engine folds them into `Phase`s; the event engine runs them as they overlap.
    """

    fwd: float
    bwd: float
    gemm_f: float  # forward GEMMs (each backward repeats them twice: input and weight grads)
    attn_f: float
    attn_b: float
    tp_f: float
    tp_b: float
    tp_overlap: bool  # TP chunked against the GEMMs (Megatron --tp-comm-overlap)
    cp_ring: float  # forward ring passes
    cp_ring_b: float  # backward ring passes (K/V and their gradients)
    cp_home: float  # the backward's last hop, gradients home after the compute (exposed)
    ep: float  # one all-to-all (dispatch or combine)
    ep_counts: float  # the forward's exchange of routed-token counts before dispatch
    recompute: float
    slowdown: float  # compute slowdown while communication overlaps it
    split_extra: float = 0.0  # what a split backward adds, in `bwd`; runs in the W pass

    def exposed(self) -> tuple[float, float]:
        """Communication seconds not hidden, (forward, backward): TP behind the GEMMs when
        overlapped, the ring behind blockwise attention, EP all-to-alls always; what
        overlaps slows the compute under it (`costs.exposed_beside`)."""
        tp_f, tp_b, sd = self.tp_f, self.tp_b, self.slowdown
        if self.tp_overlap:
            tp_f = exposed_beside(self.gemm_f, tp_f, sd)
            tp_b = exposed_beside(2 * self.gemm_f, tp_b, sd)
        cp_f = exposed_beside(self.attn_f, self.cp_ring, sd)
        cp_b = exposed_beside(self.attn_b, self.cp_ring_b, sd) + self.cp_home
        return tp_f + cp_f + 2 * self.ep + self.ep_counts, tp_b + cp_b + 2 * self.ep

    @property
    def wgrad_s(self) -> float:
        """The weight-gradient pass of a split backward."""
        return self.gemm_f + self.split_extra

    @property
    def phases(self) -> tuple[Phase, Phase]:
        comm_f, comm_b = self.exposed()
        return (Phase(compute=self.fwd, comm=comm_f),
                Phase(compute=self.bwd, recompute=self.recompute, comm=comm_b))


@dataclass(frozen=True, kw_only=True, slots=True)
class DpUnits:
    """One rank's data-parallel traffic over one group, cut into equal units."""

    group: coll.Group
    zero: bool  # ZeRO/FSDP: gradients reduce-scattered, parameters all-gathered per unit
    units: int
    unit_bytes: float
    layers: int  # transformer layers on the rank (ZeRO: one unit each, plus the root)

    @property
    def grad_op(self) -> coll.Collective:
        return "reduce_scatter" if self.zero else "all_reduce"


def ops_time_s(costs: CostModel, dtype: str, ops: list[Op], eager: bool = False) -> float:
    """Seconds for a list of ops. FP8 applies to GEMMs; attention runs in 16-bit."""
    attn_dtype = "bf16" if dtype == "fp8" else dtype
    total = 0.0
    for op in ops:
        if op.kind == "gemm":
            total += op.chunks * costs.gemm_s(dtype, op.m // op.chunks, op.n, op.k, op.batch)
        elif op.kind == "attn":
            total += costs.attention_s(attn_dtype, op.flops, op.kv_len,
                                       backward=op.name.endswith("_bwd"))
        else:
            total += costs.mem_op_s(dtype, op.name, op.bytes, eager)
    return total


@dataclass(kw_only=True)
class CostCache:
    """Per-layer costs shared by every plan of one (model, cluster, workload).

    A search evaluates thousands of plans that differ only in degrees and options; the
    layer costs depend on a few of them (the Shard, recompute, overlap, kernels), so one
    cache per search turns most evaluations into arithmetic. Pass the same cache only
    with the same model, cluster and workload. `costs` is the device cost model the cached
    times come from (None: `NominalCosts` of the cluster).
    """

    costs: CostModel | None = None
    layer: dict = field(default_factory=dict)
    ends: dict = field(default_factory=dict)
    acts: dict = field(default_factory=dict)


class PlanCosts:
    """The costs of one (model, cluster, workload, plan), computed once and reused."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
                 cache: CostCache | None = None):
        self.model, self.cluster, self.work, self.plan = model, cluster, work, plan
        self.cache = cache if cache is not None else CostCache()
        self.costs = self.cache.costs or NominalCosts(cluster)
        self.dtype = work.dtype
        self.shard = Shard(mbs=plan.mbs, seq=work.seq_len, tp=plan.tp, cp=plan.cp, sp=plan.sp,
                           ep=plan.ep, etp=plan.etp, attn=plan.attn,
                           act_bytes=work.activation_bytes)
        self.m = plan.micro_batches(work.global_batch)
        self.stage_layers = layer_split(model, plan)
        gpn = cluster.node.gpus_per_node
        self.tp_group = coll.group_of(cluster, plan.tp, 1)
        self.cp_group = coll.group_of(cluster, plan.cp, plan.tp)
        self.dp_group = coll.group_of(cluster, plan.dp * plan.cp, plan.tp)
        self.ep_group = coll.group_of(cluster, plan.ep, plan.etp)
        self.edp = plan.dp * plan.cp * plan.tp // (plan.ep * plan.etp)
        self.edp_group = coll.group_of(cluster, self.edp, plan.ep * plan.etp)
        self.pp_crosses_node = plan.tp * plan.cp * plan.dp >= gpn
        self.twin_group = coll.group_of(cluster, 2, plan.tp * plan.cp * plan.dp)
        n = len(self.stage_layers)
        self.kinds = [self._stage_kinds(s) for s in range(n)]
        self._layer_params = {k: self._one_layer_params(k) for k in (False, True)}
        seen: dict[tuple, tuple[float, float]] = {}
        self.params = []
        for s in range(n):
            key = (self.kinds[s], s == 0, s == n - 1)
            if key not in seen:
                seen[key] = self._stage_params(s)
            self.params.append(seen[key])
        self.rank_stages = [rank_blocks(plan, r, n) for r in range(plan.pp)]
        self.signatures = [tuple((self.kinds[s], s == 0, s == n - 1)
                                 for s in self.rank_stages[r]) for r in range(plan.pp)]

    @cached_property
    def phases(self) -> list[tuple[Phase, Phase]]:
        """(forward, backward) per virtual stage; stages alike in layers share one value."""
        seen: dict[tuple, tuple[Phase, Phase]] = {}
        out = []
        last = len(self.stage_layers) - 1
        for s in range(last + 1):
            key = (self.kinds[s], s == 0, s == last)
            if key not in seen:
                seen[key] = self._stage_phase(s)
            out.append(seen[key])
        return out

    def layer_phase(self, moe_layer: bool) -> tuple[Phase, Phase]:
        return self.layer_parts(moe_layer).phases

    def layer_parts(self, moe_layer: bool) -> LayerParts:
        p = self.plan
        key = (self.shard, p.recompute, p.tp_overlap, p.kernels, moe_layer,
               tuple(self.mechanisms(moe_layer)), self.ep_imbalance if moe_layer else 1.0,
               p.schedule in SPLIT_SCHEDULES)
        if key not in self.cache.layer:
            self.cache.layer[key] = self._layer_parts(moe_layer)
        return self.cache.layer[key]

    def layer_acts(self, recompute: str, moe_layer: bool) -> float:
        eager = self.plan.kernels == "eager"
        key = (self.shard, recompute, moe_layer, eager)
        if key not in self.cache.acts:
            self.cache.acts[key] = mem.layer_activation_bytes(
                self.model, self.shard, recompute, moe_layer, eager=eager)
        return self.cache.acts[key]

    def _time(self, ops: list[Op], dtype: str | None = None) -> float:
        return ops_time_s(self.costs, dtype or self.dtype, ops, self.plan.kernels == "eager")

    # ---- per-layer costs -------------------------------------------------------
    def _layer_parts(self, moe_layer: bool) -> LayerParts:
        """One layer's compute and raw communication for one micro-batch."""
        ops = layer_ops(self.model, self.shard, moe_layer)
        if self.plan.tp_overlap and self.plan.tp > 1:
            ops = tp_chunked(ops, self.plan.tp)
        if self.dtype == "fp8":
            ops += fp8_casts(ops)
        fwd = self._time(ops)
        bwd = self._time(backward(ops))
        gemm_f = self._time([o for o in ops if o.kind == "gemm"])
        if moe_layer and self.ep_imbalance != 1.0:  # the busiest EP rank's routed tokens
            routed = [o for o in ops if o.name.startswith("experts_")
                      or o.name in ("permute", "unpermute")]
            extra = self.ep_imbalance - 1.0
            fwd += extra * self._time(routed)
            bwd += extra * self._time(backward(routed))
            gemm_f += extra * self._time([o for o in routed if o.kind == "gemm"])
        attn = [o for o in ops if o.kind == "attn" or o.name in ("qk", "pv", "softmax")]
        attn_f = self._time(attn)
        attn_b = self._time(backward(attn))
        fwd += self.costs.overhead_s("layer", backward=False)
        bwd += self.costs.overhead_s("layer", backward=True)
        work_f, work_b = fwd, bwd
        for unit in self.mechanisms(moe_layer):
            fwd += self.costs.overhead_s(unit, backward=False, work_s=work_f)
            bwd += self.costs.overhead_s(unit, backward=True, work_s=work_b)
        split = self.costs.split_backward_s(bwd) if self.plan.schedule in SPLIT_SCHEDULES \
            else 0.0
        bwd += split
        tp = self._tp_comm()
        parts = LayerParts(fwd=fwd, bwd=bwd, gemm_f=gemm_f, attn_f=attn_f, attn_b=attn_b,
                           tp_f=tp, tp_b=tp, tp_overlap=self.plan.tp_overlap,
                           cp_ring=self._cp_ring(), cp_ring_b=self._cp_ring(backward=True),
                           cp_home=self.costs.ring_hop_s(self.cp_group, self.cp_home_bytes)
                           if self.cp_home_bytes else 0.0,
                           ep=self._ep_comm() if moe_layer else 0.0,
                           ep_counts=self._ep_counts() if moe_layer else 0.0, recompute=0.0,
                           slowdown=self.costs.overlap_slowdown(), split_extra=split)
        recompute = {"full": fwd + parts.exposed()[0], "selective": attn_f, "none": 0.0,
                     "op": gemm_f / 2 + self._time([o for o in ops if o.kind == "mem"])}[
            self.plan.recompute]
        return replace(parts, recompute=recompute)

    @property
    def regathers(self) -> bool:
        """FSDP gathers the parameters for every forward and backward: ZeRO-3 without
        pipelining (under PP they stay gathered for the step, as torchtitan does)."""
        return self.plan.zero == 3 and self.plan.pp == 1

    def mechanisms(self, moe_layer: bool) -> list[str]:
        """The parallel mechanisms a layer of this plan runs through, each with its own
        per-layer host overhead in a calibrated profile (`validate/mechbench.py`)."""
        p = self.plan
        out = [f"layer:{m}" for m, on in (("tp", p.tp > 1), ("cp", p.cp > 1)) if on]
        if p.dp * p.cp > 1 and p.zero >= 1:
            out.append("layer:fsdp" if self.regathers else "layer:zero2")
        if moe_layer:
            out += ["layer:moe"] + (["layer:ep"] if p.ep > 1 else [])
        return out

    def _tp_comm(self) -> float:
        """Megatron TP: 2 all-reduces per layer each way; with SP, 2 all-gathers and 2
        reduce-scatters of the same bytes (Korthikanti §4.2.2). Seconds one way."""
        if self.plan.tp == 1:
            return 0.0
        nbytes = self.tp_bytes
        g = self.tp_group
        if self.plan.sp:
            one = self.costs.collective_s(g, "all_gather", nbytes) + \
                self.costs.collective_s(g, "reduce_scatter", nbytes)
        else:
            one = self.costs.collective_s(g, "all_reduce", nbytes)
        return 2 * one

    def _cp_ring(self, backward: bool = False) -> float:
        """Ring attention's messages (`cp_ring_messages`) one after another, hidden
        behind blockwise attention (each rank computes its causal share; the flash
        kernels run per chunk pair)."""
        return sum(self.costs.ring_hop_s(self.cp_group, b)
                   for b in self.cp_ring_messages(backward))

    def cp_ring_messages(self, backward: bool) -> list[float]:
        """Bytes of each message a rank sends around the ring under blockwise attention,
        per layer and micro-batch: K/V blocks travel cp−1 hops in forward. In backward
        they travel cp−1 hops again, each block's fp32 gradient one hop behind it
        (ring-flash-attention, torch's context_parallel; meshplan's `runtime.context`):
        cp−1 gradient hops under the compute, then the last (`cp_home_bytes`)."""
        hops, kv = self.plan.cp - 1, self.cp_step_bytes
        return [kv] * hops + ([self.cp_grad_bytes] * hops if backward else [])

    @property
    def cp_grad_bytes(self) -> float:
        """One block's K/V gradients in fp32."""
        return self.cp_step_bytes * 4 / self.shard.act_bytes

    @property
    def cp_home_bytes(self) -> float:
        """The backward's last ring hop: the gradients return to their block's owner
        after every block is computed, so nothing hides it."""
        return self.cp_grad_bytes if self.plan.cp > 1 else 0.0

    def _ep_comm(self) -> float:
        """One of the dispatch and combine all-to-alls each way (GShard; Megatron-Core MoE)."""
        if self.plan.ep == 1:
            return 0.0
        return self.costs.collective_s(self.ep_group, "all_to_all", self.ep_bytes)

    def _ep_counts(self) -> float:
        """Dropless dispatch first tells every EP rank how many tokens it will receive
        per expert: a small all-to-all of int64 counts, latency-bound, before each forward
        dispatch (Megatron-Core's all-to-all token dispatcher; meshplan's runtime,
        `experts.ExpertDispatch`). Backward reuses the counts."""
        if self.plan.ep == 1:
            return 0.0
        return self.costs.collective_s(self.ep_group, "all_to_all", self.ep_counts_bytes)

    @property
    def ep_counts_bytes(self) -> float:
        """The count exchange's buffer: one int64 per expert slot of the EP group."""
        return 8 * self.experts_per_rank * self.plan.ep

    # message sizes of one layer and micro-batch
    @property
    def stage_send_bytes(self) -> float:
        """One pipeline send: a micro-batch's activations (or their gradient) between
        stages, sequence-sharded under SP."""
        return self.shard.sp_tokens * self.model.hidden_size * self.shard.act_bytes

    @property
    def tp_bytes(self) -> float:
        """One TP collective's buffer: the layer's activations (Korthikanti §4.2.2)."""
        return self.shard.tokens * self.model.hidden_size * self.shard.act_bytes

    @property
    def cp_step_bytes(self) -> float:
        """One ring pass: this rank's K and V blocks."""
        return 2 * self.shard.tokens * kv_width(self.model, self.plan.tp) * self.shard.act_bytes

    @property
    def ep_bytes(self) -> float:
        """One dispatch (or combine) all-to-all: top-k copies of the tokens' activations,
        on the EP rank that receives the most (`ep_imbalance`)."""
        top_k = self.model.moe.top_k if self.model.moe else 0
        return (self.shard.tokens * top_k * self.model.hidden_size * self.shard.act_bytes
                * self.plan.etp / self.plan.tp * self.ep_imbalance)

    @cached_property
    def ep_imbalance(self) -> float:
        """The busiest EP rank's routed tokens over the mean's, averaged over MoE layers
        (every layer waits for its busiest rank): from the plan's expert loads and
        placement; 1 for even routing."""
        moe = self.model.moe
        if moe is None:
            return 1.0
        per_layer = ep_rank_imbalance(self.plan, moe.n_experts, self.model.n_moe_layers)
        return sum(per_layer) / len(per_layer)

    @property
    def experts_per_rank(self) -> float:
        """Expert slots on an EP rank: E/ep, more where the placement replicates."""
        assert self.model.moe is not None
        rows = self.plan.expert_placement
        slots = max(len(r) for r in rows) if rows else self.model.moe.n_experts
        return slots / self.plan.ep

    # ---- stages -----------------------------------------------------------------
    def _stage_kinds(self, stage: int) -> tuple[int, int]:
        """(dense layers, MoE layers) of a virtual stage."""
        start = sum(self.stage_layers[:stage])
        n = self.stage_layers[stage]
        if not self.model.moe:
            return n, 0
        dense = max(0, min(start + n, self.model.moe.first_k_dense) - start)
        return dense, n - dense

    def _stage_phase(self, stage: int) -> tuple[Phase, Phase]:
        dense, moe = self.kinds[stage]
        f, b = self.layer_phase(False)
        fwd, bwd = f.scale(dense), b.scale(dense)
        if moe:
            fm, bm = self.layer_phase(True)
            fwd, bwd = fwd + fm.scale(moe), bwd + bm.scale(moe)
        first, last = stage == 0, stage == len(self.stage_layers) - 1
        if first or last:
            ef, eb = self.ends_phase(first, last)
            fwd, bwd = fwd + ef, bwd + eb
        fwd = fwd + Phase(compute=self.costs.overhead_s("stage", backward=False))
        bwd = bwd + Phase(compute=self.costs.overhead_s("stage", backward=True))
        return fwd, bwd

    def ends_phase(self, first: bool, last: bool) -> tuple[Phase, Phase]:
        """Embedding (first stage) and LM head + loss (last stage) of one micro-batch."""
        key = (self.shard, self.plan.kernels, first, last)
        if key not in self.cache.ends:
            eager = self.plan.kernels == "eager"
            extra: list[Op] = []
            if first:
                extra += embedding_ops(self.model, self.shard)
            if last:
                extra += head_ops(self.model, self.shard, gathered=eager and self.plan.tp > 1)
            # embedding and LM head stay in 16-bit under FP8 (torchao default)
            dtype = "bf16" if self.dtype == "fp8" else self.dtype
            comm_f, comm_b = (sum(self.costs.collective_s(self.tp_group, op, nbytes)
                                  for op, nbytes in way) for way in self.ends_tp(first, last))
            self.cache.ends[key] = (Phase(compute=self._time(extra, dtype), comm=comm_f),
                                    Phase(compute=self._time(backward(extra), dtype),
                                          comm=comm_b))
        return self.cache.ends[key]

    def ends_tp(self, first: bool, last: bool) -> tuple[list[tuple[coll.Collective, float]],
                                                        list[tuple[coll.Collective, float]]]:
        """The TP collectives of the embedding and the LM head for one micro-batch,
        (forward, backward), each (op, bytes of the whole buffer), exposed.

        The vocabulary-parallel embedding's output holds partial sums: under SP they are
        reduce-scattered to the sequence shards (all-gathered back in backward), without
        SP all-reduced. The head's input is all-gathered from the sequence shards under SP
        (reduce-scattered back); without SP its gradient is all-reduced (Shoeybi et al.
        2019 §3, Korthikanti et al. 2022 §4.2.2). An eager loss reads all-gathered logits
        (meshplan's runtime, torchtitan without loss_parallel; the memory model keeps them,
        `memory.head_activation_bytes`); a fused one stays vocabulary-parallel, with three
        all-reduces of one fp32 per token (max, target logit, sum of exponentials;
        Megatron-LM's vocab-parallel cross-entropy)."""
        fwd: list[tuple[coll.Collective, float]] = []
        bwd: list[tuple[coll.Collective, float]] = []
        if self.plan.tp == 1:
            return fwd, bwd
        act, sp = self.tp_bytes, self.plan.sp
        if first:
            fwd.append(("reduce_scatter" if sp else "all_reduce", act))
            bwd += [("all_gather", act)] if sp else []
        if last:
            fwd += [("all_gather", act)] if sp else []
            bwd.append(("reduce_scatter" if sp else "all_reduce", act))
            if self.plan.kernels == "eager":
                logits = self.shard.tokens * self.model.vocab_size * self.shard.act_bytes
                fwd.append(("all_gather", logits))
            else:
                fwd += [("all_reduce", 4 * self.shard.tokens)] * 3
        return fwd, bwd

    @cached_property
    def rank_phases(self) -> list[Phase]:
        """Per micro-batch work of each pipeline rank over all its chunks (under DualPipe a
        micro-batch passes one of the rank's two blocks: their mean)."""
        seen: dict[tuple, Phase] = {}
        out = []
        share = 0.5 if self.plan.schedule == "dualpipe" else 1.0
        for rank in range(self.plan.pp):
            sig = self.signatures[rank]
            if sig not in seen:
                total = Phase()
                for stage in self.rank_stages[rank]:
                    f, b = self.phases[stage]
                    total = total + f + b
                seen[sig] = total.scale(share) if share != 1.0 else total
            out.append(seen[sig])
        return out

    def rank_wgrad_s(self, rank: int) -> float:
        """Seconds of one micro-batch's weight-gradient pass on a rank; what a
        split-backward schedule can move into the bubble."""
        return sum(self.block_wgrad_s(s) for s in self.rank_stages[rank])

    def block_wgrad_s(self, block: int) -> float:
        """One micro-batch's weight-gradient pass in one block: its GEMMs (as long as the
        forward's) and what splitting the backward adds."""
        dense, moe = self.kinds[block]
        out = dense * self.layer_parts(False).wgrad_s
        return out + (moe * self.layer_parts(True).wgrad_s if moe else 0.0)

    def stream_s(self) -> float:
        """offload=layers: forward/backward's PCIe time streaming the host's layers in
        (each micro-batch's forward and backward) and their gradients out."""
        return 0.0 if self._host_layers is None else transfer_s(*self._host_layers)

    def twin_sync_s(self, rank: int) -> float:
        """DualPipe keeps each block on two ranks (r and pp − 1 − r); their gradients are
        summed by an all-reduce between the two before the optimizer step."""
        if self.plan.schedule != "dualpipe":
            return 0.0
        return self.costs.collective_s(self.twin_group, "all_reduce", self.twin_sync_bytes(rank))

    def twin_sync_bytes(self, rank: int) -> float:
        """The gradients a DualPipe rank sums with its twin (as reduced: fp32 or 16-bit)."""
        dense, expert = self.rank_params(rank)
        return self.work.activation_bytes * (dense + expert)

    def sp_grads_bytes(self, rank: int) -> float:
        """SP: the norm weights are replicated over TP but each rank saw only its sequence
        shard, so their gradients are partial sums, all-reduced over TP once per step in
        one buffer (Megatron-LM `_allreduce_layernorm_grads`; meshplan's runtime,
        `grads.reduce_partial_grads`): fp32, two norms a layer and the final norm."""
        if self.plan.tp == 1 or not self.plan.sp:
            return 0.0
        final = len(self.stage_layers) - 1 in self.rank_stages[rank]
        return 4 * self.model.norm_params() * (2 * self.rank_layers(rank) + final)

    def sp_grads_s(self, rank: int) -> float:
        nbytes = self.sp_grads_bytes(rank)
        return self.costs.collective_s(self.tp_group, "all_reduce", nbytes) if nbytes else 0.0

    def p2p_s(self) -> float:
        """One pipeline send, from its start to its receive's end."""
        return self.costs.stage_send_s(self.pp_crosses_node, self.stage_send_bytes)

    # ---- parameters and memory ---------------------------------------------------------
    def layer_params(self, moe_layer: bool) -> tuple[float, float]:
        """(dense, expert) parameters one transformer layer puts on a rank."""
        return self._layer_params[moe_layer]

    def _one_layer_params(self, moe_layer: bool) -> tuple[float, float]:
        m, p = self.model, self.plan
        attn_norm = m.attention_params() + 2 * m.norm_params()
        if not moe_layer or m.moe is None:
            return (attn_norm + m.mlp_params(m.ffn_hidden_size)) / p.tp, 0.0
        moe = m.moe
        shared = moe.n_shared_experts * m.mlp_params(moe.shared_ffn)
        router = m.hidden_size * moe.n_experts
        expert = self.experts_per_rank * m.mlp_params(moe.expert_ffn_hidden_size) / p.etp
        return (attn_norm + shared) / p.tp + router, expert

    def end_params(self, first: bool, last: bool) -> float:
        """Embedding (first stage) and final norm + LM head (last stage) on a rank."""
        m, p = self.model, self.plan
        out = m.embedding_params() / p.tp if first else 0.0
        if last:
            out += m.norm_params() + (m.vocab_size * m.hidden_size / p.tp
                                      if not m.tied_embeddings or p.pp > 1 else 0)
        return out

    def _stage_params(self, stage: int) -> tuple[float, float]:
        """(dense, expert) parameters a rank holds for one virtual stage.
        Ranks with equal `signatures` hold the same layers, embedding and head."""
        n_dense, n_moe = self.kinds[stage]
        d0, e0 = self.layer_params(False)
        d1, e1 = self.layer_params(True) if n_moe else (0.0, 0.0)
        dense = n_dense * d0 + n_moe * d1 + self.end_params(
            stage == 0, stage == len(self.stage_layers) - 1)
        return dense, n_dense * e0 + n_moe * e1

    def state_bytes(self, dense: float, expert: float) -> tuple[float, float, float, float]:
        """(weights, gradients, optimizer, gathered buffers) bytes for parameters on a rank."""
        p = self.plan
        k = self.work.optimizer_state_bytes
        wd, gd, od = mem.model_state_bytes(dense, p.dp * p.cp, p.zero, k)
        we, ge, oe = mem.model_state_bytes(expert, self.edp, p.zero, k)
        optimizer = 0.0 if p.offload == "optimizer" else od + oe
        # ZeRO-3 under pipelining: gathered for the whole step, 16-bit grads beside
        gathered = 4 * (dense + expert) if p.zero == 3 and not self.regathers else 0.0
        return wd + we, gd + ge, optimizer, gathered

    def rank_layers(self, rank: int) -> int:
        return sum(self.stage_layers[s] for s in self.rank_stages[rank])

    def rank_params(self, rank: int) -> tuple[float, float]:
        dense = expert = 0.0
        for stage in self.rank_stages[rank]:
            d, e = self.params[stage]
            dense, expert = dense + d, expert + e
        return dense, expert

    def rank_memory(self, rank: int) -> MemoryBreakdown:
        dense, expert = self.rank_params(rank)
        weights, grads, optimizer, _ = self.state_bytes(dense, expert)
        hw, hg, ho, streams = self.host_state_bytes()
        return MemoryBreakdown(weights=weights - hw, gradients=grads - hg,
                               optimizer=optimizer - ho, activations=self._rank_activations(rank),
                               buffers=self._buffers(rank) + streams)

    def _buffers(self, rank: int) -> float:
        """The runtime's reserve, parameters ZeRO-3 keeps gathered under pipelining, and
        without pipelining the current and prefetched layer gathered with their grads."""
        dense, expert = self.rank_params(rank)
        out = self.cluster.device.runtime_reserved_bytes + self.state_bytes(dense, expert)[3]
        if self.regathers:
            out += 2 * 4 * (dense + expert) / max(1, self.rank_layers(rank))
        return out

    def _rank_activations(self, rank: int) -> float:
        p, eager = self.plan, self.plan.kernels == "eager"
        stages = self.rank_stages[rank]
        last = len(self.stage_layers) - 1
        dense = sum(self.kinds[s][0] for s in stages)
        moe = sum(self.kinds[s][1] for s in stages)
        per_mb = dense * self.layer_acts(p.recompute, False)
        if moe:
            per_mb += moe * self.layer_acts(p.recompute, True)
        if p.pp > 1:
            per_mb += sum(s != last for s in stages) * mem.stage_output_bytes(
                self.model, self.shard)
        live = mem.inflight_microbatches(p.schedule, p.pp, p.vpp, rank, self.m)
        acts = per_mb * live
        if last in stages:
            acts += mem.head_held_bytes(self.model, self.shard, eager, p.schedule, p.pp,
                                        self.m)
        pending = mem.split_backward_pending(p.schedule, rank, self.m)
        if not pending:
            return acts + self._transient_bytes(last in stages)
        # the peak follows a B, which keeps what its recompute and loss gradients made
        held = self._held_for_w(False) * dense + (self._held_for_w(True) * moe if moe else 0.0)
        if last in stages:
            held += mem.head_grad_bytes(self.model, self.shard, eager)
        return acts + pending * held

    def _held_for_w(self, moe_layer: bool) -> float:
        """What one layer holds for a micro-batch from its B to its W beyond what forward
        kept: the weight GEMMs' output gradients, and what B recomputed (B retains the
        graph, `mem.split_backward_grad_bytes`)."""
        recomputed = self.layer_acts("none", moe_layer) - self.layer_acts(self.plan.recompute,
                                                                          moe_layer)
        return mem.split_backward_grad_bytes(self.model, self.shard, moe_layer) + recomputed

    # ---- offloading (`costmodels.offload`; the LP is `planner.offload`) ----------------
    def offload_problem(self, rank: int = 0) -> OffloadProblem:
        """One GPU of pipeline rank `rank`: its units (the layers in order, then the
        embedding/head) with their state bytes, activations and compute; its tiers. The
        host's update rate is its DRAM bandwidth shared by the node's GPUs (Adam touches
        `OPTIMIZER_BYTES_PER_PARAM` bytes a parameter)."""
        p, node = self.plan, self.cluster.node
        units = []
        for stage in self.rank_stages[rank]:
            start = sum(self.stage_layers[:stage])
            units += [self._layer_unit(i) for i in range(start, start + self.stage_layers[stage])]
            first, last = stage == 0, stage == len(self.stage_layers) - 1
            if first or last:
                units.append(self._end_unit(first, last))
        gpn = node.gpus_per_node
        # what stays whatever the LP chooses: buffers, the logits, and one layer's full
        # activations while it is recomputed (`rank_memory`, `_rank_activations`)
        fixed = (self._buffers(rank) + self.layer_acts("none", self.model.is_moe)
                 + (mem.head_held_bytes(self.model, self.shard, p.kernels == "eager",
                                        p.schedule, p.pp, self.m)
                    if len(self.stage_layers) - 1 in self.rank_stages[rank] else 0.0))
        return OffloadProblem(
            units=tuple(units), micro_batches=self.m,
            inflight=mem.inflight_microbatches(p.schedule, p.pp, p.vpp, rank, self.m),
            gpu_bytes=self.cluster.device.hbm_bytes - fixed,
            cpu_bytes=node.host_memory_bytes / gpn, nvme_bytes=node.nvme_bytes / gpn,
            pcie_bytes_per_s=node.pcie_bw_bytes_per_s,
            nvme_bytes_per_s=node.nvme_bw_bytes_per_s / gpn,
            gpu_update_s_per_param=self.costs.optimizer_s(self.work.optimizer, 1e9, 1) / 1e9,
            cpu_update_s_per_param=OPTIMIZER_BYTES_PER_PARAM[self.work.optimizer]
            / (node.host_mem_bw_bytes_per_s / gpn))

    def _layer_unit(self, layer: int) -> OffloadUnit:
        moe = self.model.is_moe_layer(layer)
        dense, expert = self.layer_params(moe)
        weights, grads, optimizer, _ = self.state_bytes(dense, expert)
        f, b = self.layer_phase(moe)
        return OffloadUnit(name=f"layer {layer}", weight_bytes=weights, grad_bytes=grads,
                           optimizer_bytes=optimizer, params=self._updated(dense, expert),
                           act_bytes=self.layer_acts("none", moe),
                           ckpt_bytes=self.layer_acts("full", moe), fwd_s=f.total, bwd_s=b.total)

    def _end_unit(self, first: bool, last: bool) -> OffloadUnit:
        params = self.end_params(first, last)
        weights, grads, optimizer, _ = self.state_bytes(params, 0.0)
        f, b = self.ends_phase(first, last)
        return OffloadUnit(name="embedding/head", weight_bytes=weights, grad_bytes=grads,
                           optimizer_bytes=optimizer, params=self._updated(params, 0.0),
                           act_bytes=0.0, ckpt_bytes=0.0, fwd_s=f.total, bwd_s=b.total)

    def _updated(self, dense: float, expert: float) -> float:
        """Parameters this GPU steps: its ZeRO shard."""
        p = self.plan
        if p.zero == 0:
            return dense + expert
        return dense / (p.dp * p.cp) + expert / self.edp

    @cached_property
    def _host_layers(self) -> tuple[OffloadProblem, OffloadSolution] | None:
        """Under offload=layers (pp = 1): the units and the plan's per-layer choice."""
        if self.plan.offload != "layers":
            return None
        pr = self.offload_problem(0)
        host = set(self.plan.host_layers or ())
        q = Quantised(host=tuple(i in host for i in range(len(pr.units))),
                      recompute=(False,) * len(pr.units))
        return pr, runtime_solution(pr, q)

    def host_state_bytes(self) -> tuple[float, float, float, float]:
        """(weights, gradients, optimizer, stream buffers) bytes offload=layers moves off
        the GPU, and the double buffer it adds for streaming weights in."""
        if self._host_layers is None:
            return 0.0, 0.0, 0.0, 0.0
        pr, sol = self._host_layers
        on_host = sol.states["weights"][:, 1]
        sizes = [sum(f * getattr(u, k) for f, u in zip(on_host, pr.units, strict=True))
                 for k in ("weight_bytes", "grad_bytes", "optimizer_bytes")]
        streams = pr.stream_buffer_bytes if on_host.any() else 0.0
        return sizes[0], sizes[1], sizes[2], streams

    def _transient_bytes(self, last_stage: bool) -> float:
        """The larger of what backward briefly adds on the rank: a layer recomputed in
        full, or (last stage) the eager loss's gradients, which come and go before any
        layer's backward starts."""
        loss = (mem.loss_backward_bytes(self.model, self.shard, self.plan.kernels == "eager")
                if last_stage else 0.0)
        return max(self.recompute_peak_bytes(), loss)

    def recompute_peak_bytes(self) -> float:
        """Full recompute briefly holds one layer's full activations again."""
        if self.plan.recompute != "full":
            return 0.0
        return self.layer_acts("none", self.model.is_moe)

    @cached_property
    def _peak(self) -> MemoryBreakdown:
        # In-flight micro-batches never grow with the rank index (GPipe: equal), so among
        # ranks holding the same layers the first is the most loaded: time only those.
        firsts: dict[tuple, int] = {}
        for r in range(self.plan.pp):
            firsts.setdefault(self.signatures[r], r)
        return max((self.rank_memory(r) for r in firsts.values()), key=lambda mb: mb.total)

    def peak_memory(self) -> MemoryBreakdown:
        """The most loaded pipeline rank's memory."""
        return self._peak

    # ---- data parallelism and optimizer -------------------------------------------------
    def dp_units(self, rank: int) -> list[DpUnits]:
        """How a rank's data-parallel traffic is cut, per group (dense parameters over DP×CP,
        experts over the expert-data-parallel group). Collectives go one unit at a time,
        each paying its latency: ZeRO shards per layer (FSDP2 wraps each block and the
        root: layers + 1 units; Zhao et al. 2023 §3), ZeRO-0 reduces DDP buckets of
        `plan.bucket_mb` (Li et al. 2020 §3.2.3)."""
        p = self.plan
        dense, expert = self.rank_params(rank)
        nlayers = max(1, self.rank_layers(rank))
        elem = self.work.activation_bytes  # gradients are reduced in the activations' dtype
        out = []
        for params, group in ((dense, self.dp_group), (expert, self.edp_group)):
            grad_bytes = elem * params
            if group.size <= 1 or params == 0:
                continue
            units = (max(1, math.ceil(grad_bytes / p.bucket_bytes)) if p.zero == 0
                     else nlayers + 1)
            out.append(DpUnits(group=group, zero=p.zero >= 1, units=units,
                               unit_bytes=grad_bytes / units, layers=nlayers))
        return out

    def dp_exposed_s(self, rank: int, phase_f: float, phase_b: float) -> tuple[float, float]:
        """(exposed seconds, total seconds) of DP/FSDP communication for one step, unit by
        unit (`dp_units`). Gradients are reduced once per step, after the last
        micro-batch's backward (no sync while accumulating); FSDP's reduce-scatters block
        the backward where the device has no side stream (`reduce_scatter_overlaps`)."""
        p = self.plan
        sd = self.costs.overlap_slowdown()
        total = exposed = 0.0
        for u in self.dp_units(rank):
            units = u.units

            def hide(comm: float, compute: float, units: int = units) -> float:
                """Units go one after another, each beside the compute of the units after
                it: nothing runs beside the first unit's share of `compute` (no gradient
                is complete yet; no layer but the first is gathered), and at least one
                unit waits."""
                return max(comm / units, exposed_beside(compute * (1 - 1 / units), comm, sd))

            grads = units * self.costs.collective_s(u.group, u.grad_op, u.unit_bytes)
            gather = units * self.costs.collective_s(u.group, "all_gather", u.unit_bytes) \
                if u.zero else 0.0
            beside = not u.zero or self.costs.reduce_scatter_overlaps()
            if self.regathers:
                total += self.m * 2 * gather + grads
                if p.dp_overlap:  # the next unit's gather runs under this one's compute
                    exposed += self.m * (hide(gather, phase_f) + hide(gather, phase_b))
                    exposed += hide(grads, max(0.0, phase_b - gather)) if beside else grads
                else:
                    exposed += self.m * 2 * gather + grads
                continue
            # ZeRO-1/2, and ZeRO-3 under pipelining (torchtitan's reshard_after_forward=False
            # with PP): parameters gathered once per step, gradients reduce-scattered once.
            total += grads + gather
            if p.dp_overlap:
                # A unit's reduction starts when its last gradient is ready, so at least the
                # last unit's is exposed.
                exposed += hide(grads, phase_b) if beside else grads
                exposed += hide(gather, phase_f) if gather else 0.0
            else:
                exposed += grads + gather
        return exposed, total

    def optimizer_s(self, rank: int) -> tuple[float, float]:
        """(GPU optimizer seconds, offload seconds) for this rank's shard of parameters."""
        p = self.plan
        dense, expert = self.rank_params(rank)
        local = dense / (p.dp * p.cp if p.zero >= 1 else 1) + expert / (
            self.edp if p.zero >= 1 else 1)
        if p.offload == "layers":  # the host updates its layers beside the GPU
            assert self._host_layers is not None
            pr, sol = self._host_layers
            gpu = float(sol.states["optimizer"][:, 0] @ np.array([u.params for u in pr.units]))
            gpu_s = gpu * pr.gpu_update_s_per_param
            return gpu_s, max(0.0, optimizer_phase_s(pr, sol) - gpu_s)
        if p.offload == "optimizer":
            node = self.cluster.node
            host_bw = node.host_mem_bw_bytes_per_s / node.gpus_per_node
            copies = 4 * local / node.pcie_bw_bytes_per_s  # 16-bit grads down, params up
            step = local * OPTIMIZER_BYTES_PER_PARAM[self.work.optimizer] / host_bw
            return 0.0, step + copies
        return self.costs.optimizer_s(self.work.optimizer, local, self.rank_tensors(rank)), 0.0

    def rank_tensors(self, rank: int) -> int:
        """Parameter tensors a rank steps (FSDP shards every tensor, so ZeRO keeps them)."""
        model, n = self.model, len(self.stage_layers)
        total = 0
        for stage in self.rank_stages[rank]:
            start = sum(self.stage_layers[:stage])
            total += sum(model.layer_tensors(i)
                         for i in range(start, start + self.stage_layers[stage]))
            total += model.end_tensors(stage == 0, stage == n - 1)
        return total


def prepare(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
             cache: CostCache | None) -> PlanCosts:
    plan = plan.resolve(cluster.n_gpus)
    problems = check_plan(model, cluster, work, plan)
    if problems:
        first, rest = problems[0], [str(v) for v in problems[1:]]
        raise SpecError(first.field, "; ".join([first.message, *rest]))
    if plan.schedule == "interleaved" and plan.vpp == 1:
        plan = replace(plan, schedule="1f1b")
    return PlanCosts(model, cluster, work, plan, cache)


def simulate_analytical(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                        plan: Plan, cache: CostCache | None = None) -> SimResult:
    """Predict one training step. Raises SpecError listing every structural violation."""
    return assemble(prepare(model, cluster, work, plan, cache))


def assemble(cm: PlanCosts) -> SimResult:
    plan = cm.plan
    ranks = cm.rank_phases
    if plan.schedule == "dualpipe":
        worst, fill, hidden = _dualpipe_pipeline(cm)
    else:
        worst = max(range(plan.pp), key=lambda r: ranks[r].total)
        fill, hidden = _closed_form_fill(cm, worst), 0.0
    t_max = ranks[worst].total
    p2p = 2 * (plan.pp - 1) * cm.p2p_s() if plan.pp > 1 else 0.0
    p2p += cm.m * _message_cycle_s(cm, worst) + _late_receives_s(cm, worst)
    pipeline = cm.m * t_max - hidden + fill + p2p

    fwd_b = [cm.phases[s] for s in cm.rank_stages[worst]]
    phase_f = sum(f.total for f, _ in fwd_b)
    phase_b = sum(b.total for _, b in fwd_b)
    dp_exposed, dp_total = cm.dp_exposed_s(worst, phase_f, phase_b)
    dp_exposed += cm.twin_sync_s(worst) + cm.sp_grads_s(worst)
    opt_s, offload_s = cm.optimizer_s(worst)
    offload_s += max(0.0, cm.stream_s() - pipeline)  # streaming longer than the compute
    step = pipeline + dp_exposed + opt_s + offload_s

    reclaimed = _shared_core_bubble_s(cm, step, fill)
    step -= reclaimed
    w = ranks[worst]
    layers_exposed = cm.m * w.comm - hidden
    time = TimeBreakdown(compute=cm.m * w.compute, recompute=cm.m * w.recompute,
                         exposed_comm=layers_exposed + p2p + dp_exposed,
                         bubble=fill - reclaimed, offload=offload_s, optimizer=opt_s)
    return summarise(cm, step, time, {"dp_total": dp_total, "dp_exposed": dp_exposed,
                                      "pp_p2p": p2p, "layers_exposed": layers_exposed})


def _shared_core_bubble_s(cm: PlanCosts, step: float, fill: float) -> float:
    """Seconds of pipeline bubble that processes sharing few cores give back.

    Where the processes outnumber the cores (`CostModel.shared_cores`), every op was
    priced with all of them computing; a rank idle in its fill or drain frees its core
    for the others, which then run faster. A fair scheduler is work-conserving, so the
    step is bounded below by the work (each process's step less its idle bubble, the
    cores shared by all) and by the critical path uncrowded (the step over the
    crowding) (Graham 1969, "Bounds on multiprocessing timing anomalies"): the larger
    bound is taken. The event engine shares the cores over the schedule itself."""
    shared = cm.costs.shared_cores()
    if shared is None or fill <= 0:
        return 0.0
    return step - max(step - fill, step / shared[1])


def _message_cycle_s(cm: PlanCosts, worst: int) -> float:
    """Seconds per micro-batch that pipeline sends add to 1F1B's steady state. Rank r
    runs F(i + p − r − 1) then B(i), one forward more in flight than rank r + 1, so
    between rank r + 1's B(i) and its B(i + 2) come the gradient's send back, rank r's
    B(i) and next F, the activation's send out and rank r + 1's F: two micro-batches
    take at least W_r + W_{r+1} + 2 sends (W: a rank's F and B of one micro-batch), a
    period of (W_r + W_{r+1})/2 + one send. The deeper schedules keep more work between
    a send and its use; here their sends are priced in the fill only (with a send an
    eighth of W, the event engine, which runs every send, finds interleaved and ZB-H1
    steps at pp=4 8-10% longer)."""
    plan, ranks = cm.plan, cm.rank_phases
    if plan.schedule != "1f1b" or plan.pp == 1:
        return 0.0
    pairs = max((ranks[r].total + ranks[r + 1].total) / 2 for r in range(plan.pp - 1))
    return max(0.0, pairs + cm.p2p_s() - ranks[worst].total)


def _late_receives_s(cm: PlanCosts, worst: int) -> float:
    """Seconds the slowest rank's receives wait for senders that have gone on computing
    (`schedule.late_receives`): the transport's hand-over and, where a message moves
    only once its receive is posted (`CostModel.sends_on_receive`), its transfer."""
    if cm.plan.pp == 1:
        return 0.0
    late = cm.costs.late_receive_s()
    if cm.costs.sends_on_receive():
        late += cm.costs.p2p_s(cm.pp_crosses_node, cm.stage_send_bytes)
    if late <= 0:
        return 0.0
    sched = build_schedule(cm.plan.schedule, cm.plan.pp, cm.m, cm.plan.vpp)
    return late * late_receives(sched, worst)


def _closed_form_fill(cm: PlanCosts, worst: int) -> float:
    """Fill and drain of the one-direction schedules: (Σ_r t_r − t_max)/v."""
    plan, ranks = cm.plan, cm.rank_phases
    fill = (sum(r.total for r in ranks) - ranks[worst].total) / plan.vpp
    if plan.schedule == "zb" and plan.pp > 1:
        # ZB-H1 (Qi et al. 2023 §3.1): weight-gradient passes fill the drain, so each
        # rank's fill/drain costs T_F + T_B − T_W instead of T_F + T_B + T_W
        w = [cm.rank_wgrad_s(r) for r in range(plan.pp)]
        fill -= 2 * (sum(w) - w[worst])
    return fill


def _dualpipe_pipeline(cm: PlanCosts) -> tuple[int, float, float]:
    """(slowest rank, its idle seconds, its communication seconds hidden by pairing).

    DualPipe's two directions have no closed form for uneven blocks, so the schedule IR is
    executed with each block's F, B (input gradients) and W. A paired forward and backward
    run as one chunk whose communication overlaps the other's compute (DeepSeek-V3 report
    §3.2.1, Fig. 4): the pair's communication runs beside its compute, which it slows
    (`costs.exposed_beside`), instead of after it."""
    plan = cm.plan
    sched = build_schedule("dualpipe", plan.pp, cm.m)
    n = sched.n_stages
    f = [cm.phases[sched.block(s)][0] for s in range(n)]
    b = [cm.phases[sched.block(s)][1] for s in range(n)]
    w = [cm.block_wgrad_s(sched.block(s)) for s in range(n)]

    sd = cm.costs.overlap_slowdown()

    def pair_saving(fs: int, bs: int) -> float:
        compute = f[fs].compute + f[fs].recompute + b[bs].compute + b[bs].recompute
        comm = f[fs].comm + b[bs].comm
        return comm - exposed_beside(compute, comm, sd)

    spans = execute(sched, [x.total for x in f], [x.total - w[s] for s, x in enumerate(b)],
                    w, pair_saving)
    end = max(s[-1][2] for s in spans)
    busy = [sum(e - st for _, st, e in rank) for rank in spans]
    worst = max(range(plan.pp), key=lambda r: busy[r])
    hidden = cm.m * cm.rank_phases[worst].total - busy[worst]
    return worst, end - busy[worst], hidden


def summarise(cm: PlanCosts, step: float, time: TimeBreakdown, comm_s: dict[str, float],
              engine: str = "analytical", peak_flops_per_s: float | None = None,
              clusters: tuple[ClusterSpec, ...] = ()) -> SimResult:
    """A SimResult from a step time and its breakdown: throughput, MFU (PaLM, Chowdhery et
    al. 2022 App. B) against `peak_flops_per_s` of all GPUs (default: the cluster's), and
    the plan's peak memory and violations, memory checked on `clusters` too (the other
    hardware of a mixed job)."""
    plan, work, model, cluster = cm.plan, cm.work, cm.model, cm.cluster
    peak_mem = cm.peak_memory()
    tokens = work.tokens_per_step
    model_flops = model_flops_per_token(model, work.seq_len) * tokens
    hw_flops = model_flops + recompute_flops_per_token(model, work.seq_len,
                                                       plan.recompute) * tokens
    nominal = peak_flops_per_s or cluster.device.peak_flops_per_s[work.dtype] * cluster.n_gpus
    violations = check_plan(model, cluster, work, plan, peak_mem.total)
    for other in clusters:
        violations += [v for v in check_plan(model, other, work, plan, peak_mem.total)
                       if v.field == "memory"]
    return SimResult(
        step_time_s=step,
        tokens_per_s=tokens / step,
        tflops_per_gpu=model_flops / step / cluster.n_gpus / 1e12,
        mfu=model_flops / step / nominal,
        hfu=hw_flops / step / nominal,
        peak_memory_bytes=peak_mem.total,
        fits=not violations,
        memory=peak_mem,
        time=time,
        plan=plan,
        engine=engine,
        comm_s=comm_s,
        violations=tuple(str(v) for v in violations),
    )
