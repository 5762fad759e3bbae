"""The plan space: which degrees and options a search tries, and the rules that cut it.

Hardware and model rules are applied while enumerating, cheapest first, so whole subtrees
are skipped: tp within a node (unless allowed) and dividing the attention heads (with the
KV heads dividing or divided by it), cp dividing the sequence into 2·cp load-balanced
chunks, pp at most the layer count, dp·mbs dividing the global batch, ep dividing the
experts and dp·cp·tp/etp, interleaving only with pp > 1 and micro-batches divisible by pp.
Every candidate is then checked with the same `check_plan` the rest of meshplan uses.

Enumeration is a generator: nothing is materialised, and memory pruning happens per
candidate in `planner.search` before any timing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from meshplan.core.check import check_plan
from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import require
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.workload import TrainWorkload


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Options per plan key; `None` means "every value the hardware and model allow".

    `base` carries the fields a search does not choose (they describe the software stack:
    attention kernel, fused or eager kernels, TP/DP overlap) into every candidate.
    `vpp=None` tries 2 and 4 chunks per rank and every chunk count that splits the
    layers evenly (Megatron's interleaving wants that; down to one layer per chunk).
    `sp=(True,)` by default: with tp > 1, sequence parallelism moves the same bytes as the
    all-reduce it replaces (Korthikanti §4.2.2) and holds less, so it is never worse here.
    GPipe is left out by default for the same reason against 1F1B (same time, m in-flight
    micro-batches instead of at most p).
    """

    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    cp: tuple[int, ...] | None = (1, 2, 4, 8)
    ep: tuple[int, ...] | None = None
    etp: tuple[int, ...] = (0, 1)  # expert TP degree; 0: equal to tp
    vpp: tuple[int, ...] | None = None
    mbs: tuple[int, ...] = (1, 2, 4, 8)
    schedule: tuple[str, ...] = ("1f1b", "interleaved")
    recompute: tuple[str, ...] = ("none", "selective", "op", "full")
    zero: tuple[int, ...] = (0, 1, 2, 3)
    sp: tuple[bool, ...] = (True,)
    offload: tuple[str, ...] = ("none", "optimizer")
    tp_across_nodes: bool = False
    base: Plan = field(default_factory=Plan)

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "cp", "ep", "vpp", "mbs"):
            values = getattr(self, key)
            if values is not None:
                require(len(values) > 0 and all(v >= 1 for v in values), f"space.{key}",
                        f"needs positive integers, got {list(values)}")
        for key in ("schedule", "recompute", "zero", "sp", "offload", "etp"):
            require(len(getattr(self, key)) > 0, f"space.{key}", "is empty")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_options(model: ModelSpec, cluster: ClusterSpec, space: SearchSpace) -> list[int]:
    limit = cluster.n_gpus if space.tp_across_nodes else min(cluster.node.gpus_per_node,
                                                              cluster.n_gpus)
    values = space.tp if space.tp is not None else divisors(limit)
    out = []
    for tp in values:
        kv_ok = model.mla is not None or model.n_kv_heads % tp == 0 or tp % model.n_kv_heads == 0
        if tp <= limit and cluster.n_gpus % tp == 0 and model.n_heads % tp == 0 and kv_ok:
            out.append(tp)
    return out


def degree_triples(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                   space: SearchSpace) -> Iterator[tuple[int, int, int, int]]:
    """(tp, cp, pp, dp) with tp·cp·pp·dp = GPUs and dp dividing the global batch."""
    n = cluster.n_gpus
    for tp in tp_options(model, cluster, space):
        for cp in space.cp if space.cp is not None else divisors(n // tp):
            if (n // tp) % cp or (cp > 1 and work.seq_len % (2 * cp)):
                continue
            rest = n // (tp * cp)
            pps = space.pp if space.pp is not None else divisors(rest)
            for pp in pps:
                if rest % pp or pp > model.n_layers:
                    continue
                dp = rest // pp
                if work.global_batch % dp == 0:
                    yield tp, cp, pp, dp


def expert_options(model: ModelSpec, space: SearchSpace, tp: int, cp: int,
                   dp: int) -> Iterator[tuple[int, int]]:
    """(ep, etp) pairs: experts split over ep ranks inside dp·cp·tp/etp."""
    if model.moe is None:
        yield 1, tp
        return
    for etp in dict.fromkeys(e or tp for e in space.etp):
        if tp % etp:
            continue
        room = dp * cp * tp // etp
        eps = space.ep if space.ep is not None else divisors(model.moe.n_experts)
        for ep in eps:
            if model.moe.n_experts % ep == 0 and room % ep == 0:
                yield ep, etp


def vpp_options(n_layers: int, pp: int, space: SearchSpace) -> list[int]:
    """Chunks per pipeline rank (> 1) for the interleaved schedule."""
    if space.vpp is not None:
        return [v for v in space.vpp if v > 1 and pp * v <= n_layers]
    even = [v for v in range(2, n_layers // pp + 1) if n_layers % (pp * v) == 0]
    return sorted({v for v in (2, 4) if pp * v <= n_layers} | set(even))


def pipeline_options(model: ModelSpec, space: SearchSpace,
                     pp: int) -> Iterator[tuple[int, str]]:
    """(vpp, schedule) pairs for pp pipeline ranks."""
    for schedule in space.schedule:
        if schedule == "interleaved":
            if pp == 1:
                continue
            for v in vpp_options(model.n_layers, pp, space):
                yield v, schedule
        else:
            yield 1, schedule


def enumerate_plans(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                    space: SearchSpace | None = None) -> Iterator[Plan]:
    """Every valid plan of the space, lazily, model-state choices outermost."""
    space = space or SearchSpace()
    for tp, cp, pp, dp in degree_triples(model, cluster, work, space):
        for ep, etp in expert_options(model, space, tp, cp, dp):
            for zero in space.zero:
                for offload in space.offload:
                    for vpp, schedule in pipeline_options(model, space, pp):
                        for sp in dict.fromkeys(s and tp > 1 for s in space.sp):
                            yield from _activation_choices(
                                model, cluster, work, space,
                                replace(space.base, dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp,
                                        zero=zero, offload=offload, vpp=vpp,
                                        schedule=schedule, sp=sp, stage_layers=None))


def _activation_choices(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                        space: SearchSpace, plan: Plan) -> Iterator[Plan]:
    per_dp = work.global_batch // plan.dp
    for mbs in space.mbs:
        if per_dp % mbs:
            continue
        if plan.vpp > 1 and (per_dp // mbs) % plan.pp:
            continue
        for recompute in space.recompute:
            candidate = replace(plan, mbs=mbs, recompute=recompute)
            if not check_plan(model, cluster, work, candidate):
                yield candidate
