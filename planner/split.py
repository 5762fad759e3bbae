"""Pipeline layer split: contiguous layer ranges per (virtual) stage, as an ILP and a DP.

Stage s (of S = pp·vpp) runs on pipeline rank s mod pp, as in Megatron's interleaved
schedule. With t_s the seconds stage s spends per micro-batch and R_r = Σ_{s≡r} t_s the
rank totals, the analytical pipeline time is m·max_r R_r + (Σ_r R_r − max_r R_r)/v
(Narayanan 2021 §2.2, our `simulator.analytical`), which the ILP minimises exactly:

    min  m·T + (Σ_r R_r − T)/v      s.t.  T ≥ R_r,  mem_r ≤ capacity of r's device.

Contiguity: layers are grouped into runs of identical layers (segments); z[s,g] counts
segment-g layers in stages ≤ s, rises with s, and may include segment g+1 only once it
holds all of segment g (see `build`). Layers differ (dense-first layers of MoE models;
the first stage carries the embedding, the last the LM head and loss). Mixed GPU
types: each pipeline rank picks one device kind a[r,k] within the kind's rank count;
its time scales by the kind's speed and its memory is bounded by the kind's capacity
(big-M on the time rows). Alpa's inter-operator pass
(Zheng et al. 2022, §5) is the reference formulation.

`dp_split` is the exact dynamic program for one device kind and no interleaving, where
Σ_r R_r is fixed and the objective reduces to the bottleneck stage; tests hold the ILP to
it. Build, solve and decode are separate; constraints are named; an infeasible model is
re-solved with elastic memory to say by how much the tightest rank misses.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import pulp

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError, require
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels import memory as mem
from meshplan.simulator.analytical import CostCache, PlanCosts, prepare

GIB = 2**30
TIE_BREAK = 1e-6  # weight of the longest virtual stage, seconds per second
MIP_GAP = 1e-9  # relative optimality gap asked of the solver


@dataclass(frozen=True, kw_only=True)
class DeviceKind:
    name: str
    ranks: int  # pipeline ranks of this kind available
    memory_bytes: float  # usable bytes per GPU
    time_scale: float = 1.0  # seconds on this kind / seconds on the reference device


@dataclass(frozen=True, kw_only=True)
class SplitProblem:
    """Per-layer costs on the reference device, for one micro-batch on one rank."""

    layer_s: tuple[float, ...]  # forward + backward (+ recompute, exposed comm) per layer
    first_s: float  # embedding, on the first virtual stage
    last_s: float  # final norm, LM head and loss, on the last virtual stage
    layer_state_bytes: tuple[float, ...]  # weights, grads, optimizer a layer puts on its rank
    layer_act_bytes: tuple[float, ...]  # activations per in-flight micro-batch
    first_bytes: float  # embedding states on rank 0
    last_bytes: float  # head states and the loss's logits on the last rank
    base_bytes: float  # on every rank whatever its layers (runtime, recompute peak)
    inflight: tuple[float, ...]  # per pipeline rank: micro-batches of its layers alive
    pp: int
    vpp: int = 1
    micro_batches: int
    devices: tuple[DeviceKind, ...]
    min_layers: int = 1

    def __post_init__(self) -> None:
        n = len(self.layer_s)
        require(len(self.layer_state_bytes) == n and len(self.layer_act_bytes) == n,
                "split", "layer_s, layer_state_bytes and layer_act_bytes differ in length")
        require(len(self.inflight) == self.pp, "split.inflight",
                f"{len(self.inflight)} entries for pp={self.pp}")
        require(self.n_stages * self.min_layers <= n, "split",
                f"{self.n_stages} stages of at least {self.min_layers} layers need "
                f"{self.n_stages * self.min_layers} layers, the model has {n}")
        ranks = sum(d.ranks for d in self.devices)
        require(ranks >= self.pp, "split.devices",
                f"{ranks} pipeline ranks of devices for pp={self.pp}")

    @property
    def n_layers(self) -> int:
        return len(self.layer_s)

    @property
    def n_stages(self) -> int:
        return self.pp * self.vpp


@dataclass(frozen=True, kw_only=True)
class Split:
    stage_layers: tuple[int, ...]
    rank_devices: tuple[str, ...]  # device kind per pipeline rank
    objective_s: float  # m·T + (ΣR − T)/v, the pipeline seconds of the split
    status: str


# ---- evaluation (shared by ILP, DP and tests) ----------------------------------------

def stage_times(pr: SplitProblem, stage_layers: tuple[int, ...]) -> list[float]:
    """Seconds per micro-batch of each virtual stage on the reference device."""
    out, start = [], 0
    for s, n in enumerate(stage_layers):
        t = sum(pr.layer_s[start:start + n])
        t += pr.first_s if s == 0 else 0.0
        t += pr.last_s if s == pr.n_stages - 1 else 0.0
        out.append(t)
        start += n
    return out


def rank_memory_bytes(pr: SplitProblem, stage_layers: tuple[int, ...]) -> list[float]:
    out = [pr.base_bytes] * pr.pp
    start = 0
    for s, n in enumerate(stage_layers):
        r = s % pr.pp
        layers = range(start, start + n)
        out[r] += sum(pr.layer_state_bytes[i] + pr.layer_act_bytes[i] * pr.inflight[r]
                      for i in layers)
        start += n
    out[0] += pr.first_bytes
    out[-1] += pr.last_bytes
    return out


def pipeline_objective(pr: SplitProblem, stage_layers: tuple[int, ...],
                       scales: tuple[float, ...] | None = None) -> float:
    t = stage_times(pr, stage_layers)
    ranks = [0.0] * pr.pp
    for s, ts in enumerate(t):
        ranks[s % pr.pp] += ts
    if scales:
        ranks = [r * k for r, k in zip(ranks, scales, strict=True)]
    top = max(ranks)
    return pr.micro_batches * top + (sum(ranks) - top) / pr.vpp


def even_split(pr: SplitProblem) -> tuple[int, ...]:
    base, extra = divmod(pr.n_layers, pr.n_stages)
    return tuple(base + (1 if s < extra else 0) for s in range(pr.n_stages))


# ---- ILP -----------------------------------------------------------------------------

@dataclass
class _Ilp:
    prob: pulp.LpProblem
    z: dict  # (stage, segment) -> layers of the segment in stages <= stage
    a: dict  # (rank, kind) -> 1 if the rank runs on that device kind
    segments: list[tuple[int, int]]  # (first layer, count) of runs of identical layers
    elastic: pulp.LpVariable | None


def segments(pr: SplitProblem) -> list[tuple[int, int]]:
    """Maximal runs of identical layers (cost, states, activations): (start, length)."""
    out: list[tuple[int, int]] = []
    key = None
    for i in range(pr.n_layers):
        k = (pr.layer_s[i], pr.layer_state_bytes[i], pr.layer_act_bytes[i])
        if k == key:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
            key = k
    return out


def _contiguity(prob: pulp.LpProblem, z: dict, segs: list[tuple[int, int]], S: int) -> None:
    """z grows with the stage, ends with every layer placed, and takes segment g+1 only
    once segment g is complete (the binary f[s,g])."""
    G = len(segs)
    for s in range(S):
        for g in range(G):
            if s + 1 < S:
                prob += z[s, g] <= z[s + 1, g], f"nested_{s}_{g}"
            if g + 1 < G:
                full = prob.add_variable(f"f_{s}_{g}", cat="Binary")
                prob += z[s, g] >= segs[g][1] * full, f"full_{s}_{g}"
                prob += z[s, g + 1] <= segs[g + 1][1] * full, f"contiguous_{s}_{g}"
    for g in range(G):
        prob += z[S - 1, g] == segs[g][1], f"all_layers_placed_{g}"


def build(pr: SplitProblem, elastic: bool = False) -> _Ilp:
    """The split ILP; with `elastic`, memory rows get a shared overflow to minimise.

    Identical layers are grouped into segments g of length len_g, so the integers are
    z[s,g] (segment-g layers in stages <= s) rather than one binary per layer and stage,
    which removes the layer symmetry that makes the per-layer form slow. f[s,g] = 1 when
    stages <= s hold all of segment g; only then may they hold any of segment g+1, which
    keeps stages contiguous.
    """
    S, P = pr.n_stages, pr.pp
    segs = segments(pr)
    G = len(segs)
    kinds = range(len(pr.devices))
    prob = pulp.LpProblem("pipeline_split", pulp.LpMinimize)
    z = {(s, g): prob.add_variable(f"z_{s}_{g}", lowBound=0, upBound=segs[g][1], cat="Integer")
         for s in range(S) for g in range(G)}
    a = {(r, k): prob.add_variable(f"a_{r}_{k}", cat="Binary") for r in range(P) for k in kinds}
    T = prob.add_variable("T", lowBound=0)
    C = prob.add_variable("C", lowBound=0)  # longest virtual stage: a tie-breaker only
    R = {r: prob.add_variable(f"R_{r}", lowBound=0) for r in range(P)}
    over = prob.add_variable("overflow_bytes", lowBound=0) if elastic else None

    def n(s: int, g: int):
        return z[s, g] - (z[s - 1, g] if s else 0)

    _contiguity(prob, z, segs, S)
    for s in range(S):
        prob += pulp.lpSum(n(s, g) for g in range(G)) >= pr.min_layers, f"min_layers_{s}"
    for k in kinds:
        prob += pulp.lpSum(a[r, k] for r in range(P)) <= pr.devices[k].ranks, \
            f"ranks_of_{pr.devices[k].name}"
    big = (sum(pr.layer_s) + pr.first_s + pr.last_s) * max(d.time_scale for d in pr.devices)
    for r in range(P):
        prob += pulp.lpSum(a[r, k] for k in kinds) == 1, f"one_device_{r}"
        stages = range(r, S, P)
        for s in stages:
            prob += C >= pulp.lpSum(pr.layer_s[segs[g][0]] * n(s, g) for g in range(G)), \
                f"longest_stage_{s}"
        work = pulp.lpSum(pr.layer_s[segs[g][0]] * n(s, g) for s in stages for g in range(G))
        work += pr.first_s if r == 0 else 0.0
        work += pr.last_s if r == (S - 1) % P else 0.0
        for k in kinds:
            prob += R[r] >= pr.devices[k].time_scale * work - big * (1 - a[r, k]), \
                f"time_{r}_{pr.devices[k].name}"
        prob += T >= R[r], f"bottleneck_{r}"
        per_layer = [pr.layer_state_bytes[i] + pr.layer_act_bytes[i] * pr.inflight[r]
                     for i, _ in segs]
        held = pulp.lpSum(per_layer[g] * n(s, g) for s in stages for g in range(G))
        held += pr.base_bytes + (pr.first_bytes if r == 0 else 0.0)
        held += pr.last_bytes if r == P - 1 else 0.0
        cap = pulp.lpSum(pr.devices[k].memory_bytes * a[r, k] for k in kinds)
        prob += held <= cap + (over if over is not None else 0), f"memory_rank_{r}"
    if over is not None:
        prob += over
    else:
        # The analytical pipeline time sees rank totals only; among splits equal in it,
        # prefer even chunks (they keep the interleaved fill/drain short).
        prob += pr.micro_batches * T + (pulp.lpSum(R.values()) - T) * (1.0 / pr.vpp) \
            + TIE_BREAK * C
    return _Ilp(prob=prob, z=z, a=a, segments=segs, elastic=over)


SOLVER = "auto"  # "auto": HiGHS through highspy when installed, else CBC; or "cbc"


def _solver(time_limit_s: float) -> pulp.LpSolver:
    if SOLVER == "auto":
        highs = pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=MIP_GAP)
        if highs.available():
            return highs
    coin = pulp.COIN_CMD(msg=False, timeLimit=time_limit_s, gapRel=MIP_GAP)
    if coin.available():
        return coin
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC for 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=MIP_GAP)


def solve(ilp: _Ilp, time_limit_s: float = 10.0) -> str:
    """Solve in place; returns pulp's status name ('Optimal', 'Infeasible', ...)."""
    ilp.prob.solve(_solver(time_limit_s))
    status = pulp.LpStatus[ilp.prob.status]
    if status == "Not Solved" and ilp.prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return "Feasible (time limit)"
    return status


def decode(pr: SplitProblem, ilp: _Ilp, status: str) -> Split:
    S, G = pr.n_stages, len(ilp.segments)
    placed = [sum(round(ilp.z[s, g].value() or 0) for g in range(G)) for s in range(S)]
    stage_layers = tuple(placed[s] - (placed[s - 1] if s else 0) for s in range(S))
    kinds = [next(k for k in range(len(pr.devices)) if round(ilp.a[r, k].value() or 0))
             for r in range(pr.pp)]
    scales = tuple(pr.devices[k].time_scale for k in kinds)
    return Split(stage_layers=stage_layers,
                 rank_devices=tuple(pr.devices[k].name for k in kinds),
                 objective_s=pipeline_objective(pr, stage_layers, scales), status=status)


def ilp_split(pr: SplitProblem, time_limit_s: float = 10.0) -> Split:
    """Optimal split (or the best found within the time limit). Raises SpecError with the
    memory shortfall when no contiguous split fits."""
    ilp = build(pr)
    status = solve(ilp, time_limit_s)
    if status in ("Optimal", "Feasible (time limit)"):
        split = decode(pr, ilp, status)
        _recheck(pr, split)
        return split
    if status == "Infeasible":
        raise _explain_infeasible(pr, time_limit_s)
    raise SpecError("split", f"the solver stopped with status {status!r} and no split "
                    f"within {time_limit_s:g} s; raise the time limit")


def _recheck(pr: SplitProblem, split: Split) -> None:
    require(sum(split.stage_layers) == pr.n_layers and
            min(split.stage_layers) >= pr.min_layers, "split",
            f"decoded split {split.stage_layers} does not place {pr.n_layers} layers "
            f"with at least {pr.min_layers} per stage")
    caps = {d.name: d.memory_bytes for d in pr.devices}
    for r, used in enumerate(rank_memory_bytes(pr, split.stage_layers)):
        cap = caps[split.rank_devices[r]]
        require(used <= cap * (1 + 1e-6), f"split.memory_rank_{r}",
                f"decoded split needs {used / GIB:.2f} GiB on rank {r}, "
                f"capacity {cap / GIB:.2f} GiB")


def _explain_infeasible(pr: SplitProblem, time_limit_s: float) -> SpecError:
    ilp = build(pr, elastic=True)
    status = solve(ilp, time_limit_s)
    if status not in ("Optimal", "Feasible (time limit)") or ilp.elastic is None:
        return SpecError("split", f"no split is feasible and the elastic model ended {status}")
    over = ilp.elastic.value() or 0.0
    split = decode(pr, ilp, status)
    used = rank_memory_bytes(pr, split.stage_layers)
    caps = {d.name: d.memory_bytes for d in pr.devices}
    worst = max(range(pr.pp), key=lambda r: used[r] - caps[split.rank_devices[r]])
    return SpecError(f"split.memory_rank_{worst}",
                     f"no contiguous split of {pr.n_layers} layers over {pr.n_stages} stages "
                     f"fits: the best needs {used[worst] / GIB:.2f} GiB on rank {worst} "
                     f"({split.rank_devices[worst]}, {caps[split.rank_devices[worst]] / GIB:.2f}"
                     f" GiB), over by {over / GIB:.2f} GiB; split {split.stage_layers}")


# ---- exact DP for one device kind, no interleaving -------------------------------------

def dp_split(pr: SplitProblem) -> Split:
    """Minimise the bottleneck stage under per-stage memory (Σ t_s is fixed), exactly."""
    require(pr.vpp == 1 and len(pr.devices) == 1, "split",
            "the dynamic program handles one device kind and vpp=1; use ilp_split")
    L, S = pr.n_layers, pr.n_stages
    cap = pr.devices[0].memory_bytes
    t_pre = [0.0]
    for t in pr.layer_s:
        t_pre.append(t_pre[-1] + t)
    inf = math.inf
    # best[s][j]: smallest bottleneck placing layers [0, j) on stages 0..s-1
    best = [[inf] * (L + 1) for _ in range(S + 1)]
    back = [[-1] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for s in range(S):
        last = s == S - 1
        for i in range(L + 1):
            if best[s][i] == inf:
                continue
            states = acts = 0.0
            for j in range(i + 1, L + 1):
                states += pr.layer_state_bytes[j - 1]
                acts += pr.layer_act_bytes[j - 1]
                if j - i < pr.min_layers:
                    continue
                if last and j != L:
                    continue
                held = pr.base_bytes + states + acts * pr.inflight[s]
                held += (pr.first_bytes if s == 0 else 0.0) + (pr.last_bytes if last else 0.0)
                if held > cap:
                    break  # more layers only add memory
                t = t_pre[j] - t_pre[i] + (pr.first_s if s == 0 else 0.0) + (
                    pr.last_s if last else 0.0)
                value = max(best[s][i], t)
                if value < best[s + 1][j]:
                    best[s + 1][j], back[s + 1][j] = value, i
    require(best[S][L] < inf, "split.memory",
            f"no contiguous split of {L} layers over {S} stages fits {cap / GIB:.2f} GiB")
    counts, j = [], L
    for s in range(S, 0, -1):
        i = back[s][j]
        counts.append(j - i)
        j = i
    stage_layers = tuple(reversed(counts))
    return Split(stage_layers=stage_layers, rank_devices=(pr.devices[0].name,) * pr.pp,
                 objective_s=pipeline_objective(pr, stage_layers), status="Optimal")


# ---- from the analytical model --------------------------------------------------------

def split_problem(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
                  cache: CostCache | None = None,
                  devices: tuple[DeviceKind, ...] | None = None) -> SplitProblem:
    """The per-layer costs the analytical model charges for `plan`, as a split problem."""
    costs = prepare(model, cluster, work, replace(plan, stage_layers=None), cache)
    p = costs.plan
    layers = [moe_layer(model, i) for i in range(model.n_layers)]
    t = {k: _total(costs, k) for k in set(layers)}
    state = {k: sum(costs.state_bytes(*costs.layer_params(k))) for k in set(layers)}
    acts = {k: costs.layer_acts(p.recompute, k) for k in set(layers)}
    first_f, first_b = costs.ends_phase(True, False)
    last_f, last_b = costs.ends_phase(False, True)
    m = p.micro_batches(work.global_batch)
    return SplitProblem(
        layer_s=tuple(t[k] for k in layers),
        first_s=first_f.total + first_b.total,
        last_s=last_f.total + last_b.total,
        layer_state_bytes=tuple(state[k] for k in layers),
        layer_act_bytes=tuple(acts[k] for k in layers),
        first_bytes=sum(costs.state_bytes(costs.end_params(True, False), 0.0)),
        last_bytes=sum(costs.state_bytes(costs.end_params(False, True), 0.0))
        + mem.head_held_bytes(model, costs.shard, p.kernels == "eager", p.schedule, p.pp, m)
        + mem.loss_backward_bytes(model, costs.shard, p.kernels == "eager"),
        base_bytes=cluster.device.runtime_reserved_bytes + costs.recompute_peak_bytes(),
        inflight=tuple(mem.inflight_microbatches(p.schedule, p.pp, p.vpp, r, m)
                       for r in range(p.pp)),
        pp=p.pp, vpp=p.vpp, micro_batches=m,
        devices=devices or (DeviceKind(name=cluster.device.name, ranks=p.pp,
                                       memory_bytes=cluster.device.hbm_bytes),),
    )


def moe_layer(model: ModelSpec, index: int) -> bool:
    return model.moe is not None and index >= model.moe.first_k_dense


def _total(costs: PlanCosts, moe: bool) -> float:
    f, b = costs.layer_phase(moe)
    return f.total + b.total


def optimise_split(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
                   cache: CostCache | None = None,
                   time_limit_s: float = 10.0) -> tuple[int, ...] | None:
    """The best split for `plan` (DP when exact, else ILP); None when none fits, or for
    DualPipe, whose mirrored placement (rank r holds blocks r and pp − 1 − r) this
    formulation does not describe."""
    if plan.schedule == "dualpipe":
        return None
    pr = split_problem(model, cluster, work, plan, cache)
    try:
        split = dp_split(pr) if pr.vpp == 1 else ilp_split(pr, time_limit_s)
    except SpecError:
        return None
    return split.stage_layers
