"""Search: enumerate the space, prune by memory, time what fits, rank, refine the best.

Every candidate's peak memory is computed before any timing (`PlanCosts.peak_memory`
needs no compute model); only plans that fit are timed. The best `refine` plans with a
pipeline then get an optimised layer split (`planner.split`), are timed again and the
list is re-ranked. Ranking keys (smaller is better) come from the `Objective`; equal
scores go to the plan with more memory headroom.

Pure: `progress` is a callback the caller may pass (the CLI drives a progress bar with it).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError, require
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.results import SimResult
from meshplan.core.routing import RoutingStats
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels.calibrated import HardwareProfile, costs_for
from meshplan.simulator.analytical import CostCache, assemble, prepare
from meshplan.simulator.des import simulate_des

from .offload import offload_plan, offload_problem, quantise, solve_offload
from .placement import plan_placement
from .space import SearchSpace, enumerate_plans
from .split import optimise_split

GIB = 2**30
ObjectiveKind = Literal["throughput", "cost", "gpus"]
Mapper = Callable[[Callable, Iterable], Iterable]


class NoFeasiblePlan(SpecError):
    """Nothing in the space fits; the message names the tightest plan and its shortfall."""


@dataclass(frozen=True, kw_only=True)
class Objective:
    """What "best" means.

    throughput: most tokens/s. cost: fewest dollars per million tokens at the cluster's
    `price_per_gpu_hour`. gpus: fewest GPUs whose best plan trains `token_budget` tokens
    within `target_days` (see `search_fewest_gpus`); among plans on one GPU count it ranks
    by throughput.
    """

    kind: ObjectiveKind = "throughput"
    token_budget: float | None = None
    target_days: float | None = None

    def __post_init__(self) -> None:
        require(self.kind in ("throughput", "cost", "gpus"), "objective",
                f"{self.kind!r} is not one of ['throughput', 'cost', 'gpus']")
        if self.kind == "gpus":
            require(bool(self.token_budget and self.token_budget > 0), "objective.token_budget",
                    f"the gpus objective needs a positive token budget, got {self.token_budget}")
            require(bool(self.target_days and self.target_days > 0), "objective.target_days",
                    f"the gpus objective needs a positive target in days, got "
                    f"{self.target_days}")

    def score(self, r: SimResult, cluster: ClusterSpec) -> float:
        """Smaller is better."""
        if self.kind == "cost":
            return dollars_per_million_tokens(r, cluster)
        return 1.0 / r.tokens_per_s  # seconds per token


def dollars_per_million_tokens(r: SimResult, cluster: ClusterSpec) -> float:
    price = cluster.device.price_per_gpu_hour
    require(price is not None, "cluster.device.price_per_gpu_hour",
            f"the cost objective needs a price per GPU-hour; {cluster.device.name} has none")
    return price * cluster.n_gpus / 3600 / r.tokens_per_s * 1e6


@dataclass(frozen=True, kw_only=True)
class SearchStats:
    enumerated: int  # structurally valid candidates
    over_memory: int  # pruned before timing
    timed: int
    split_refined: int  # plans whose layer split the optimiser changed
    des_refined: int = 0  # best plans re-timed by the event engine


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    ranked: tuple[SimResult, ...]  # best first
    stats: SearchStats
    objective: Objective

    @property
    def best(self) -> SimResult:
        return self.ranked[0]


def _key(objective: Objective, cluster: ClusterSpec, r: SimResult) -> tuple[float, float]:
    score = float(f"{objective.score(r, cluster):.9g}")  # equal to 9 digits: a tie
    return score, r.peak_memory_bytes  # ties: more headroom first


def search(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
           space: SearchSpace | None = None, objective: Objective | None = None,
           top: int = 5, refine: int = 8,
           progress: Callable[[int], None] | None = None,
           profile: HardwareProfile | None = None, refine_des: int = 0,
           mapper: Mapper | None = None, routing: RoutingStats | None = None
           ) -> SearchResult:
    """The `top` best plans of `space` (analytical model), best first; timed with the
    calibrated cost model when a hardware `profile` is given. With `refine_des` = K the
    best K are timed again by the event engine (overlap, link sharing) and re-ranked
    ahead of the rest; those carry `engine="des"`. `mapper` (map's signature) runs
    those K runs; the caller may pass a process pool's map. With `routing` (MoE models)
    every candidate carries that routing's loads and EPLB's placement for its ep, so
    skewed routing is timed on each plan's busiest EP rank.

    Raises NoFeasiblePlan when no candidate fits in memory, naming the tightest one.
    """
    require(top >= 1, "top", f"must be >= 1, got {top}")
    objective = objective or Objective()
    cache = CostCache(costs=costs_for(cluster, profile))
    hbm = cluster.device.hbm_bytes
    require(refine_des >= 0, "refine", f"must be >= 0, got {refine_des}")
    keep = max(top, refine, refine_des)
    heap: list[tuple[tuple[float, float], int, SimResult]] = []  # max-heap on key via negation
    enumerated = over = timed = 0
    tightest: tuple[float, Plan] | None = None
    to_offload: list[tuple[float, int, Plan]] = []  # the tightest plans without pipelining
    plain_fits = False  # some plan fits without offloading
    placed = _Placer(model, cluster, routing)
    for plan in map(placed, enumerate_plans(model, cluster, work, space)):
        enumerated += 1
        if progress and enumerated % 256 == 0:
            progress(256)
        costs = prepare(model, cluster, work, plan, cache)
        peak = costs.peak_memory().total
        if peak > hbm:
            over += 1
            if tightest is None or peak < tightest[0]:
                tightest = (peak, costs.plan)
            if _offloadable(costs.plan):
                _keep(to_offload, (-peak, enumerated, costs.plan), OFFLOAD_TRIES)
            continue
        r = assemble(costs)
        timed += 1
        plain_fits |= costs.plan.offload == "none"
        _keep(heap, _ranked(objective, cluster, r, timed), keep)
    if progress:
        progress(enumerated % 256)
    if not plain_fits:  # the offloading LP for the tightest, then what the runtime can run
        for r in _offloaded(model, cluster, work, [p for _, _, p in to_offload], cache):
            timed += 1
            _keep(heap, _ranked(objective, cluster, r, timed), keep)
    if not heap:
        raise _nothing_fits(cluster, enumerated, tightest)
    results = [r for _, _, r in heap]
    results, refined = _refine_splits(model, cluster, work, results, refine, objective, cache)
    results.sort(key=lambda r: _key(objective, cluster, r))
    if refine_des:
        results = _refine_des(model, cluster, work, results, refine_des, objective, cache,
                              mapper)
    stats = SearchStats(enumerated=enumerated, over_memory=over, timed=timed,
                        split_refined=refined, des_refined=min(refine_des, len(results)))
    return SearchResult(ranked=tuple(results[:top]), stats=stats, objective=objective)


OFFLOAD_TRIES = 48  # plans that miss memory the offloading LP is tried on, tightest first


def _offloadable(plan: Plan) -> bool:
    """What the LP starts from: one pipeline stage (its units are whole layers), ZeRO-3
    (the runtime's per-layer host offload is FSDP2's), recompute and offload left to it."""
    return (plan.pp == 1 and plan.zero == 3 and plan.recompute == "none"
            and plan.offload == "none")


def _ranked(objective: Objective, cluster: ClusterSpec, r: SimResult, order: int) -> tuple:
    """A heap item: the negated key (the heap keeps the best), then arrival order."""
    key = _key(objective, cluster, r)
    return (-key[0], -key[1]), order, r


def _keep(heap: list, item: tuple, size: int) -> None:
    """Keep the `size` largest items (a min-heap on the first field)."""
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def _offloaded(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
               plans: list[Plan], cache: CostCache) -> list[SimResult]:
    """Plans that do not fit, given the offloading LP's choice rounded to what the runtime
    runs (`planner.offload`); those that then fit, timed."""
    out = []
    for plan in plans:
        try:
            pr = offload_problem(model, cluster, work, plan, cache)
            q, _ = quantise(pr, solve_offload(pr))
        except SpecError:
            continue  # even offloading cannot hold this one
        r = assemble(prepare(model, cluster, work, offload_plan(plan, q), cache))
        if r.fits:
            out.append(r)
    return out


def _nothing_fits(cluster: ClusterSpec, enumerated: int,
                  tightest: tuple[float, Plan] | None) -> NoFeasiblePlan:
    if tightest is None:
        return NoFeasiblePlan("plan", "no plan of the search space passes the structural "
                              "rules (degrees, divisibility); widen the space or change the "
                              "GPU count or global batch")
    peak, plan = tightest
    hbm = cluster.device.hbm_bytes
    return NoFeasiblePlan(
        "memory", f"none of {enumerated} plans fits in {hbm / GIB:.1f} GiB per "
        f"{cluster.device.name}; the tightest, {plan.to_text()}, needs {peak / GIB:.1f} GiB "
        f"and misses by {(peak - hbm) / GIB:.1f} GiB")


def _refine_splits(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                   results: list[SimResult], refine: int, objective: Objective,
                   cache: CostCache) -> tuple[list[SimResult], int]:
    """Optimise the layer split of the best `refine` pipelined plans; keep what improves."""
    results = sorted(results, key=lambda r: _key(objective, cluster, r))
    changed = 0
    for i, r in enumerate(results[:refine]):
        if r.plan.pp == 1:
            continue
        split = optimise_split(model, cluster, work, r.plan, cache)
        if split is None or split == (r.plan.stage_layers or ()):
            continue
        better = assemble(prepare(model, cluster, work, replace(r.plan, stage_layers=split),
                                  cache))
        if better.fits and _key(objective, cluster, better) < _key(objective, cluster, r):
            results[i] = better
            changed += 1
    return results, changed


def _refine_des(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                results: list[SimResult], k: int, objective: Objective,
                cache: CostCache, mapper: Mapper | None) -> list[SimResult]:
    """Re-time the best `k` (sorted best first) with the event engine and re-rank them;
    the analytical rest follows (memory is the same model in both engines)."""
    jobs = [(model, cluster, work, r.plan, cache) for r in results[:k]]
    timed = list((mapper or map)(des_result, jobs))
    timed.sort(key=lambda r: _key(objective, cluster, r))
    return timed + results[k:]


def des_result(job: tuple[ModelSpec, ClusterSpec, TrainWorkload, Plan, CostCache]
               ) -> SimResult:
    """One event-engine run, as a top-level function a process pool can call."""
    model, cluster, work, plan, cache = job
    return simulate_des(model, cluster, work, plan, cache).result


def gpu_counts(cluster: ClusterSpec) -> list[int]:
    """GPU counts tried by the fewest-GPUs objective: whole nodes of 2^k or 3·2^k GPUs
    (and the partial-node powers of two below one node), up to the cluster's size."""
    g = cluster.node.gpus_per_node
    counts = {n for n in (2**k for k in range(int(math.log2(g)) + 1)) if n <= g}
    nodes = 1
    while nodes * g <= cluster.n_gpus:
        counts.update({nodes * g} | ({nodes * 3 // 2 * g} if nodes % 2 == 0 else set()))
        nodes *= 2
    counts.add(cluster.n_gpus)
    return sorted(n for n in counts if n <= cluster.n_gpus)


def days_to_train(r: SimResult, token_budget: float) -> float:
    return token_budget / r.tokens_per_s / 86400


class _Placer:
    """Adds the routing's loads and EPLB's placement for the plan's ep (one per ep)."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, routing: RoutingStats | None):
        self.routing = routing
        if routing is not None:
            require(model.moe is not None, "routing", f"{model.name} has no experts to route")
            assert model.moe is not None and self.routing is not None
            require(self.routing.n_experts == model.moe.n_experts and
                    self.routing.n_layers in (1, model.n_moe_layers), "routing",
                    f"{self.routing.n_layers} layers x {self.routing.n_experts} experts; "
                    f"{model.name} has {model.n_moe_layers} MoE layers of "
                    f"{model.moe.n_experts} experts")
        self.gpn = cluster.node.gpus_per_node
        self.by_ep: dict[int, tuple] = {}

    def __call__(self, plan: Plan) -> Plan:
        if self.routing is None:
            return plan
        if plan.ep not in self.by_ep:
            self.by_ep[plan.ep] = plan_placement(self.routing, plan.ep, self.gpn)
        load, placement = self.by_ep[plan.ep]
        return replace(plan, expert_load=load, expert_placement=placement)


def search_fewest_gpus(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                       objective: Objective, space: SearchSpace | None = None, top: int = 5,
                       progress: Callable[[int], None] | None = None,
                       profile: HardwareProfile | None = None,
                       refine_des: int = 0, mapper: Mapper | None = None,
                       routing: RoutingStats | None = None) -> SearchResult:
    """Fewest GPUs (of `gpu_counts`, at most the cluster's) meeting the time-to-train
    target; raises with the fastest count's shortfall when even the whole cluster misses."""
    assert objective.token_budget and objective.target_days
    last: SearchResult | None = None
    for n in gpu_counts(cluster):
        try:
            found = search(model, cluster.with_gpus(n), work, space, objective, top,
                           progress=progress, profile=profile, refine_des=refine_des,
                           mapper=mapper, routing=routing)
        except NoFeasiblePlan:
            continue
        last = found
        if days_to_train(found.best, objective.token_budget) <= objective.target_days:
            return found
    if last is None:
        raise NoFeasiblePlan("cluster.gpus", f"no GPU count up to {cluster.n_gpus} has a plan "
                             "that fits in memory")
    days = days_to_train(last.best, objective.token_budget)
    raise NoFeasiblePlan("objective.target_days", f"even {last.best.plan.world_size} GPUs need "
                         f"{days:.1f} days for {objective.token_budget:.3g} tokens, "
                         f"{days - objective.target_days:.1f} days over the "
                         f"{objective.target_days:g}-day target")
