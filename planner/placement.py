"""MoE expert placement: which GPU holds each expert, and how many replicas hot experts get.

Per MoE layer, E logical experts with token loads w_e go into the physical slots of G GPUs
in nodes of `gpus_per_node`, E + R slots in all (R redundant), at most `slots_per_gpu` on
a GPU. An expert with r_e replicas splits its tokens evenly among them (EPLB's rule). The
layer costs, in seconds,

    compute_s_per_token · max_g Σ_{replicas on g} w_e / r_e          (the busiest GPU)
  + nic_s_per_token / G · (tokens that change node from layer l - 1 to l)
  + migration_s_per_expert · (replicas not where `current` had them)

where a token routed to e at layer l - 1 and to e2 at layer l stays on its node with
probability Σ_n min(y_{l-1}[e, n], y_l[e2, n]) (y[e, n]: the share of e's replicas on node
n), the affinity term of Yao et al. 2024 (arXiv 2401.08383, §3).

Baselines, from their published descriptions: round-robin (replica counts as below, slots
dealt to GPUs in expert order) and DeepSeek's EPLB (github.com/deepseek-ai/EPLB,
`rebalance_experts`): replicate (each redundant slot to the expert with the most tokens
per replica) then balanced packing (heaviest replica first, to the least-loaded GPU with a
free slot); its hierarchical policy packs experts onto nodes first and replicates within
each node.

The optimiser decomposes as the field does (EPLB's hierarchy, Alpa's two levels):
1. replica counts by the same water-filling, which is exact for min_r max_e w_e / r_e;
2. per layer, a node-level MILP: replicas per (expert, node), node loads balanced, tokens
   that stay on their node from the previous layer's placement maximised;
3. per node, a GPU-level MILP: replicas to GPUs, the busiest GPU minimised.
Each MILP starts from the EPLB solution (HiGHS `setSolution`), has a time limit, and a layer
keeps the EPLB placement when the optimiser's is not better for it; the result records
how many layers the optimiser improved and the gap to a lower bound.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np
import pulp

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import require
from meshplan.core.model import ModelSpec
from meshplan.core.routing import RoutingStats

from .split import MIP_GAP


@dataclass(frozen=True, kw_only=True)
class PlacementProblem:
    routing: RoutingStats
    n_gpus: int
    gpus_per_node: int
    redundant: int = 0  # extra physical slots per layer
    slots_per_gpu: int = 0  # most experts a GPU holds; 0: ceil((E + R) / G)
    compute_s_per_token: float = 1.0
    nic_s_per_token: float = 0.0
    migration_s_per_expert: float = 0.0
    current: Placement | None = None

    def __post_init__(self) -> None:
        n, g, gpn = self.routing.n_experts, self.n_gpus, self.gpus_per_node
        require(g >= 1 and gpn >= 1 and g % gpn == 0, "placement.gpus",
                f"{g} GPUs is not a whole number of {gpn}-GPU nodes")
        require(self.redundant >= 0, "placement.redundant", f"must be >= 0, got "
                f"{self.redundant}")
        require(self.slots >= 1 and self.slots * g >= n + self.redundant, "placement.slots",
                f"{g} GPUs x {self.slots} slots = {g * self.slots} < {n} experts + "
                f"{self.redundant} redundant")
        for name in ("compute_s_per_token", "nic_s_per_token", "migration_s_per_expert"):
            require(getattr(self, name) >= 0, f"placement.{name}",
                    f"must be >= 0, got {getattr(self, name)}")
        if self.current is not None:
            require(len(self.current.gpu_experts) == self.routing.n_layers,
                    "placement.current", f"{len(self.current.gpu_experts)} layers, routing "
                    f"has {self.routing.n_layers}")

    @property
    def slots(self) -> int:
        return self.slots_per_gpu or math.ceil(
            (self.routing.n_experts + self.redundant) / self.n_gpus)

    @property
    def n_nodes(self) -> int:
        return self.n_gpus // self.gpus_per_node


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Per MoE layer, per GPU, the logical experts of its physical slots (one per replica)."""

    gpu_experts: tuple[tuple[tuple[int, ...], ...], ...]
    method: str = ""

    @classmethod
    def from_maps(cls, physical_to_logical: list, n_gpus: int) -> Placement:
        """Back from EPLB's map (per layer, G x slots entries, -1 for a free slot)."""
        rows = []
        for layer, row in enumerate(physical_to_logical):
            require(len(row) % n_gpus == 0, f"placement.current[{layer}]",
                    f"{len(row)} slots do not split over {n_gpus} GPUs")
            per = len(row) // n_gpus
            rows.append(tuple(tuple(int(e) for e in row[g * per:(g + 1) * per] if e >= 0)
                              for g in range(n_gpus)))
        return cls(gpu_experts=tuple(rows), method="current")

    def replica_counts(self, n_experts: int) -> np.ndarray:
        out = np.zeros((len(self.gpu_experts), n_experts), dtype=int)
        for layer, gpus in enumerate(self.gpu_experts):
            for experts in gpus:
                for e in experts:
                    out[layer, e] += 1
        return out

    def maps(self, n_experts: int) -> dict[str, list]:
        """EPLB's maps: physical slot -> logical expert (G x slots per layer, -1 where a
        GPU has a slot free), logical expert -> its physical slots (-1 padded), and the
        replica counts."""
        slots = max(len(g) for gpus in self.gpu_experts for g in gpus)
        phy2log, log2phy = [], []
        counts = self.replica_counts(n_experts)
        width = int(counts.max())
        for gpus in self.gpu_experts:
            row = [e for g in gpus for e in (*g, *[-1] * (slots - len(g)))]
            phy2log.append(row)
            where: list[list[int]] = [[] for _ in range(n_experts)]
            for slot, e in enumerate(row):
                if e >= 0:
                    where[e].append(slot)
            log2phy.append([w + [-1] * (width - len(w)) for w in where])
        return {"physical_to_logical": phy2log, "logical_to_physical": log2phy,
                "replica_counts": counts.tolist()}


@dataclass(frozen=True, kw_only=True, eq=False)
class PlacementCost:
    max_gpu_tokens: np.ndarray  # per layer
    mean_gpu_tokens: np.ndarray  # per layer
    cross_node_tokens: np.ndarray  # per layer (0 for the first)
    moved: np.ndarray  # per layer: replicas not where `current` had them
    objective_s: float

    @property
    def imbalance(self) -> np.ndarray:
        """Per layer, the busiest GPU over the mean GPU."""
        return self.max_gpu_tokens / np.maximum(self.mean_gpu_tokens, 1e-300)


@dataclass(frozen=True, kw_only=True)
class PlacementResult:
    placement: Placement
    cost: PlacementCost
    baselines: dict[str, PlacementCost]
    lower_bound_s: float
    lower_bound_tokens: float  # Σ over layers of the busiest GPU's least possible tokens
    layers_improved: int
    solve_s: float

    @property
    def gap(self) -> float:
        """(objective − lower bound) / objective; the bound knows nothing of cross-node
        tokens, so where they weigh this overstates the gap."""
        obj = self.cost.objective_s
        return (obj - self.lower_bound_s) / obj if obj > 0 else 0.0

    @property
    def compute_gap(self) -> float:
        """The busiest GPUs' tokens summed over layers against the same bound."""
        busiest = float(self.cost.max_gpu_tokens.sum())
        return (busiest - self.lower_bound_tokens) / busiest if busiest > 0 else 0.0


def token_costs_s(model: ModelSpec, cluster: ClusterSpec, dtype: str = "bf16"
                  ) -> tuple[float, float]:
    """(expert compute seconds per routed token, forward and backward, at the device's
    GEMM efficiency; NIC seconds for one routed token to cross nodes and back, forward and
    backward: four hidden-state transfers at the GPU's share of the NICs)."""
    require(model.moe is not None, "model", f"{model.name} has no experts to place")
    assert model.moe is not None
    dev = cluster.device
    flops = 3 * 2 * model.mlp_params(model.moe.expert_ffn_hidden_size)
    rate = dev.peak(dtype) * dev.gemm_peak_fraction.get(dtype, 1.0)
    nbytes = 4 * model.hidden_size * (4 if dtype == "fp32" else 2)
    nic = cluster.nic_bw_per_gpu_bytes_per_s * cluster.node.nic_efficiency
    return flops / rate, nbytes / nic


# ---- evaluation (shared by every method and the tests) --------------------------------

def node_counts(pr: PlacementProblem, gpus: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """x[e, n]: replicas of expert e on node n."""
    x = np.zeros((pr.routing.n_experts, pr.n_nodes))
    for g, experts in enumerate(gpus):
        for e in experts:
            x[e, g // pr.gpus_per_node] += 1
    return x


def node_shares(pr: PlacementProblem, gpus: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """y[e, n]: the share of expert e's replicas on node n."""
    x = node_counts(pr, gpus)
    return x / np.maximum(x.sum(axis=1, keepdims=True), 1)


def layer_terms(pr: PlacementProblem, layer: int, gpus: tuple[tuple[int, ...], ...],
                prev: tuple[tuple[int, ...], ...] | None) -> tuple[float, float, int]:
    """(busiest GPU's tokens, tokens changing node from the previous layer, moves)."""
    w = pr.routing.expert_tokens[layer]
    per_replica = w / np.maximum(node_counts(pr, gpus).sum(axis=1), 1)
    busiest = max(sum(per_replica[e] for e in experts) for experts in gpus)
    cross = 0.0
    if prev is not None and pr.routing.pair_tokens is not None:
        a = pr.routing.pair_tokens[layer - 1]
        y0, y1 = node_shares(pr, prev), node_shares(pr, gpus)
        stay = sum(float((a * np.minimum.outer(y0[:, n], y1[:, n])).sum())
                   for n in range(pr.n_nodes))
        cross = float(a.sum()) - stay
    moved = 0
    if pr.current is not None:
        for g, experts in enumerate(gpus):
            before = list(pr.current.gpu_experts[layer][g])
            for e in experts:
                if e in before:
                    before.remove(e)
                else:
                    moved += 1
    return busiest, cross, moved


def layer_objective_s(pr: PlacementProblem, terms: tuple[float, float, int]) -> float:
    busiest, cross, moved = terms
    return (pr.compute_s_per_token * busiest + pr.nic_s_per_token * cross / pr.n_gpus
            + pr.migration_s_per_expert * moved)


def evaluate(pr: PlacementProblem, placement: Placement) -> PlacementCost:
    require(len(placement.gpu_experts) == pr.routing.n_layers, "placement",
            f"{len(placement.gpu_experts)} layers for {pr.routing.n_layers}")
    rows = [layer_terms(pr, layer, gpus, placement.gpu_experts[layer - 1] if layer else None)
            for layer, gpus in enumerate(placement.gpu_experts)]
    return PlacementCost(
        max_gpu_tokens=np.array([r[0] for r in rows]),
        cross_node_tokens=np.array([r[1] for r in rows]),
        moved=np.array([r[2] for r in rows]),
        objective_s=sum(layer_objective_s(pr, r) for r in rows),
        mean_gpu_tokens=pr.routing.expert_tokens.sum(axis=1) / pr.n_gpus)


def lower_bound_tokens(pr: PlacementProblem) -> float:
    """No placement's busiest GPU holds, per layer, fewer tokens than the mean GPU or the
    hottest expert split over the most replicas water-filling gives it; summed."""
    out = 0.0
    for layer in range(pr.routing.n_layers):
        w = pr.routing.expert_tokens[layer]
        r = replica_counts(pr, w)
        out += max(w.sum() / pr.n_gpus, float((w / r).max()))
    return out


# ---- baselines ---------------------------------------------------------------------

def replica_counts(pr: PlacementProblem, w: np.ndarray) -> np.ndarray:
    """EPLB's replicate step: each redundant slot to the expert with the most tokens per
    replica (at most one replica per GPU). Exact for min max_e w_e / r_e."""
    r = np.ones(len(w), dtype=int)
    heap = [(-w[e], e) for e in range(len(w))]
    heapq.heapify(heap)
    for _ in range(pr.redundant):
        while heap:
            _, e = heapq.heappop(heap)
            if r[e] < pr.n_gpus:
                break
        else:
            break
        r[e] += 1
        heapq.heappush(heap, (-w[e] / r[e], e))
    return r


def _balanced_pack(weights: list[tuple[float, int]], caps: list[int],
                   loads: list[float] | None = None) -> list[list[int]]:
    """EPLB's balanced packing: heaviest first, each to the least-loaded bin with room that
    does not hold the same expert already (when one exists)."""
    bins: list[list[int]] = [[] for _ in caps]
    load = list(loads) if loads is not None else [0.0] * len(caps)
    for weight, e in sorted(weights, key=lambda x: (-x[0], x[1])):
        open_bins = [b for b in range(len(caps)) if len(bins[b]) < caps[b]]
        fresh = [b for b in open_bins if e not in bins[b]] or open_bins
        b = min(fresh, key=lambda k: (load[k], k))
        bins[b].append(e)
        load[b] += weight
    return bins


def _replicas(w: np.ndarray, r: np.ndarray) -> list[tuple[float, int]]:
    return [(w[e] / r[e], e) for e in range(len(w)) for _ in range(r[e])]


def round_robin(pr: PlacementProblem) -> Placement:
    layers = []
    for layer in range(pr.routing.n_layers):
        r = replica_counts(pr, pr.routing.expert_tokens[layer])
        slots = [e for e in range(len(r))] + [e for e in range(len(r)) for _ in range(r[e] - 1)]
        layers.append(tuple(tuple(slots[g::pr.n_gpus]) for g in range(pr.n_gpus)))
    return Placement(gpu_experts=tuple(layers), method="round-robin")


def eplb_global(pr: PlacementProblem) -> Placement:
    layers = []
    for layer in range(pr.routing.n_layers):
        w = pr.routing.expert_tokens[layer]
        bins = _balanced_pack(_replicas(w, replica_counts(pr, w)), [pr.slots] * pr.n_gpus)
        layers.append(tuple(tuple(sorted(b)) for b in bins))
    return Placement(gpu_experts=tuple(layers), method="eplb")


def eplb_hierarchical(pr: PlacementProblem) -> Placement:
    """Experts packed onto nodes by load (equal counts), each node's share of the
    redundant slots replicated within it, then packed onto its GPUs."""
    n, nodes, gpn = pr.routing.n_experts, pr.n_nodes, pr.gpus_per_node
    per_node_slots = pr.slots * gpn
    layers = []
    for layer in range(pr.routing.n_layers):
        w = pr.routing.expert_tokens[layer]
        cap = math.ceil(n / nodes)
        groups = _balanced_pack([(w[e], e) for e in range(n)], [cap] * nodes)
        gpus: list[tuple[int, ...]] = []
        spare = [min(per_node_slots - len(g), pr.redundant // nodes) for g in groups]
        extra = pr.redundant - sum(spare)
        for k in range(nodes):  # redundant slots the even share left over
            add = min(extra, per_node_slots - len(groups[k]) - spare[k])
            spare[k] += add
            extra -= add
        for k, members in enumerate(groups):
            sub = PlacementProblem(
                routing=RoutingStats(expert_tokens=w[members][None, :]), n_gpus=gpn,
                gpus_per_node=gpn, redundant=spare[k], slots_per_gpu=pr.slots)
            local = w[members]
            bins = _balanced_pack(_replicas(local, replica_counts(sub, local)),
                                  [pr.slots] * gpn)
            gpus += [tuple(sorted(members[i] for i in b)) for b in bins]
        layers.append(tuple(gpus))
    return Placement(gpu_experts=tuple(layers), method="eplb-hierarchical")


BASELINES = {"round-robin": round_robin, "eplb": eplb_global,
             "eplb-hierarchical": eplb_hierarchical}


# ---- the optimiser -------------------------------------------------------------------

class _WarmHighs(pulp.HiGHS):
    """PuLP's HiGHS with the variables' current values handed over as a start, and the
    integer columns marked in one call (PuLP marks them one by one, which costs more than
    solving these models)."""

    def buildSolverModel(self, lp):  # noqa: N802 (PuLP's name)
        import highspy

        mip, self.mip = self.mip, False
        try:
            super().buildSolverModel(lp)
        finally:
            self.mip = mip
        ints = np.array([v.index for v in lp.variables() if v.cat == pulp.LpInteger],
                        dtype=np.int32)
        if mip and len(ints):
            kinds = np.full(len(ints), highspy.HighsVarType.kInteger)
            lp.solverModel.changeColsIntegrality(len(ints), ints, kinds)

    def callSolver(self, lp):  # noqa: N802 (PuLP's name)
        import highspy

        sol = highspy.HighsSolution()
        sol.col_value = [v.varValue if v.varValue is not None else 0.0
                         for v in lp.variables()]
        sol.value_valid = True
        lp.solverModel.setSolution(sol)
        lp.solverModel.run()


def _solve(prob: pulp.LpProblem, time_limit_s: float) -> bool:
    """Solve; True when a solution (optimal or the best within the limit) came back."""
    solver = _WarmHighs(msg=False, timeLimit=max(time_limit_s, 0.01), gapRel=MIP_GAP)
    if not solver.available():
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(time_limit_s, 0.01),
                                   gapRel=MIP_GAP, warmStart=True)
    prob.solve(solver)
    return prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)


def _node_milp(pr: PlacementProblem, layer: int, r: np.ndarray,
               prev: tuple[tuple[int, ...], ...] | None, start: np.ndarray,
               time_limit_s: float) -> np.ndarray | None:
    """Replicas per (expert, node): balanced node loads, tokens kept on their node."""
    w, nodes, gpn = pr.routing.expert_tokens[layer], pr.n_nodes, pr.gpus_per_node
    n = len(w)
    u = w / r
    prob = pulp.LpProblem("node_placement", pulp.LpMinimize)
    x = {(e, k): prob.add_variable(f"x_{e}_{k}", 0, min(int(r[e]), gpn), cat="Integer")
         for e in range(n) for k in range(nodes)}
    top = prob.add_variable("node_tokens", 0)
    for e in range(n):
        prob += pulp.lpSum(x[e, k] for k in range(nodes)) == int(r[e]), f"replicas_{e}"
    for k in range(nodes):
        prob += pulp.lpSum(x[e, k] for e in range(n)) <= pr.slots * gpn, f"slots_{k}"
        prob += pulp.lpSum(u[e] * x[e, k] for e in range(n)) <= top, f"load_{k}"
    cost = pr.compute_s_per_token * top * (1.0 / gpn)
    stay = []
    if prev is not None and pr.routing.pair_tokens is not None and pr.nic_s_per_token > 0:
        a = pr.routing.pair_tokens[layer - 1]
        y0 = node_shares(pr, prev)
        for e0, e1 in _strong_pairs(a):
            for k in np.nonzero(y0[e0])[0]:
                z = prob.add_variable(f"z_{e0}_{e1}_{k}", 0, float(y0[e0, k]))
                prob += z * float(r[e1]) <= x[e1, int(k)], f"stay_{e0}_{e1}_{k}"
                z.setInitialValue(min(float(y0[e0, k]), start[e1, k] / r[e1]))
                stay.append(float(a[e0, e1]) * z)
        cost -= pr.nic_s_per_token / pr.n_gpus * pulp.lpSum(stay)
    if pr.current is not None and pr.migration_s_per_expert > 0:
        have = node_counts(pr, pr.current.gpu_experts[layer])
        keep = {}
        for e in range(n):
            for k in range(nodes):
                if have[e, k]:
                    keep[e, k] = prob.add_variable(f"keep_{e}_{k}", 0, float(have[e, k]))
                    prob += keep[e, k] <= x[e, k], f"keep_{e}_{k}"
                    keep[e, k].setInitialValue(min(have[e, k], start[e, k]))
        cost += pr.migration_s_per_expert * (int(r.sum()) - pulp.lpSum(keep.values()))
    prob += cost
    for (e, k), var in x.items():
        var.setInitialValue(float(start[e, k]))
    top.setInitialValue(float(max((u * start[:, k]).sum() for k in range(nodes))))
    if not _solve(prob, time_limit_s):
        return None
    return np.array([[round(x[e, k].value()) for k in range(nodes)] for e in range(n)])


def _strong_pairs(a: np.ndarray, keep: float = 0.9, most: int = 4) -> list[tuple[int, int]]:
    """The (e, e2) pairs carrying `keep` of the layer pair's tokens, at most `most` x E."""
    flat = np.argsort(-a, axis=None)
    total, acc, out = float(a.sum()), 0.0, []
    for idx in flat[: most * a.shape[0]]:
        if total <= 0 or acc >= keep * total or a.flat[idx] <= 0:
            break
        out.append(divmod(int(idx), a.shape[1]))
        acc += float(a.flat[idx])
    return out


def _gpu_milp(pr: PlacementProblem, u: np.ndarray, nodes: dict[int, dict[int, int]],
              start: dict[int, list[tuple[int, ...]]], time_limit_s: float
              ) -> dict[int, list[tuple[int, ...]]] | None:
    """Replicas onto GPUs for the given nodes (expert -> count on that node), one replica
    of an expert per GPU, the busiest GPU minimised: one model, a block per node."""
    gpn = pr.gpus_per_node
    prob = pulp.LpProblem("gpu_placement", pulp.LpMinimize)
    top = prob.add_variable("gpu_tokens", 0)
    v = {(k, e, g): prob.add_variable(f"v_{k}_{e}_{g}", cat="Binary")
         for k, counts in nodes.items() for e in counts for g in range(gpn)}
    for k, counts in nodes.items():
        for e, c in counts.items():
            prob += pulp.lpSum(v[k, e, g] for g in range(gpn)) == c, f"replicas_{k}_{e}"
        for g in range(gpn):
            prob += pulp.lpSum(v[k, e, g] for e in counts) <= pr.slots, f"slots_{k}_{g}"
            prob += pulp.lpSum(float(u[e]) * v[k, e, g] for e in counts) <= top, \
                f"load_{k}_{g}"
    prob += top
    for (k, e, g), var in v.items():
        var.setInitialValue(1.0 if e in start[k][g] else 0.0)
    top.setInitialValue(max(_bin_load(u, b) for k in nodes for b in start[k]))
    if not _solve(prob, time_limit_s):
        return None
    return {k: [tuple(sorted(e for e in counts if round(v[k, e, g].value()) == 1))
                for g in range(gpn)] for k, counts in nodes.items()}


def _bin_load(u: np.ndarray, experts: tuple[int, ...]) -> float:
    return float(sum(u[e] for e in experts))


def _optimise_layer(pr: PlacementProblem, layer: int, start: tuple[tuple[int, ...], ...],
                    prev: tuple[tuple[int, ...], ...] | None,
                    time_limit_s: float) -> tuple[tuple[int, ...], ...] | None:
    w, gpn = pr.routing.expert_tokens[layer], pr.gpus_per_node
    r = replica_counts(pr, w)
    x0 = node_counts(pr, start)
    if not np.array_equal(x0.sum(axis=1).astype(int), r):
        return None  # the start has other replica counts (e.g. `current`): nothing to warm
    x = _node_milp(pr, layer, r, prev, x0, time_limit_s / 2)
    if x is None:
        return None
    u = w / r
    packed: dict[int, list[tuple[int, ...]]] = {}
    hard: dict[int, dict[int, int]] = {}
    for k in range(pr.n_nodes):
        counts = {e: int(x[e, k]) for e in range(len(w)) if x[e, k]}
        if np.array_equal(x[:, k], x0[:, k]):
            packed[k] = [start[k * gpn + g] for g in range(gpn)]
        else:  # the start does not fit this node: greedy within it
            packed[k] = [tuple(b) for b in _balanced_pack(
                [(u[e], e) for e, c in counts.items() for _ in range(c)], [pr.slots] * gpn)]
        bound = max(sum(u[e] * c for e, c in counts.items()) / gpn,
                    max((u[e] for e in counts), default=0.0))
        if max(_bin_load(u, b) for b in packed[k]) > bound * (1 + 1e-9):
            hard[k] = counts  # the packing may not be optimal: the MILP decides
    if hard:
        packed |= _gpu_milp(pr, u, hard, packed, time_limit_s / 2) or {}
    return tuple(g for k in range(pr.n_nodes) for g in packed[k])


def optimise_placement(pr: PlacementProblem, time_limit_s: float = 60.0) -> PlacementResult:
    """The decomposed optimiser, warm-started from EPLB; never worse than a baseline on
    any layer it keeps (a layer falls back to the best start when the MILPs do not
    improve it)."""
    t0 = time.perf_counter()
    baselines = {name: fn(pr) for name, fn in BASELINES.items()}
    costs = {name: evaluate(pr, p) for name, p in baselines.items()}
    deadline = t0 + time_limit_s
    chosen: list[tuple[tuple[int, ...], ...]] = []
    improved, overhead = 0, 0.0  # the most a layer spent beyond its solvers' limits
    for layer in range(pr.routing.n_layers):
        # what is left, shared by the layers left, less building and checking a layer
        share = (deadline - time.perf_counter()) / (pr.routing.n_layers - layer)
        per_layer = max(0.05, share - overhead)
        t_layer = time.perf_counter()
        prev = chosen[-1] if chosen else None
        options = [p.gpu_experts[layer] for p in baselines.values()]
        scored = [(layer_objective_s(pr, layer_terms(pr, layer, o, prev)), i, o)
                  for i, o in enumerate(options)]
        best_s, _, best = min(scored)
        found = _optimise_layer(pr, layer, baselines["eplb"].gpu_experts[layer], prev,
                                per_layer)
        if found is not None:
            s = layer_objective_s(pr, layer_terms(pr, layer, found, prev))
            if s < best_s * (1 - 1e-9):
                best, improved = found, improved + 1
        chosen.append(best)
        overhead = max(overhead, time.perf_counter() - t_layer - per_layer)
    placement = Placement(gpu_experts=tuple(chosen), method="milp")
    bound = lower_bound_tokens(pr)
    return PlacementResult(placement=placement, cost=evaluate(pr, placement),
                           baselines=costs, lower_bound_tokens=bound,
                           lower_bound_s=pr.compute_s_per_token * bound,
                           layers_improved=improved, solve_s=time.perf_counter() - t0)


# ---- for the search ----------------------------------------------------------------

def plan_placement(routing: RoutingStats, ep: int, gpus_per_node: int, redundant: int = 0
                   ) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[int, ...], ...]]:
    """(expert_load, expert_placement) rows for a plan with `ep` expert-parallel ranks:
    EPLB's placement of this routing (equal slots per rank, as the plan's map needs)."""
    n = routing.n_experts
    require((n + redundant) % ep == 0, "placement.redundant",
            f"{n} experts + {redundant} redundant slots do not split over ep={ep} ranks")
    pr = PlacementProblem(routing=routing, n_gpus=ep, gpus_per_node=math.gcd(ep, gpus_per_node),
                          redundant=redundant, slots_per_gpu=(n + redundant) // ep)
    maps = eplb_global(pr).maps(n)["physical_to_logical"]
    load = tuple(tuple(float(x) for x in row) for row in routing.expert_tokens)
    return load, tuple(tuple(int(e) for e in row) for row in maps)
