"""Offloading as a linear program: which share of each layer's state lives on GPU, CPU or
NVMe, and which share of its activations is kept, sent to the host or recomputed.

Per unit i (a transformer layer, or the embedding/head) of one GPU's shard, with W, G, O
the bytes of its 16-bit weights, gradients and optimizer states, P its parameters, A the
activations one micro-batch saves and K what full recompute keeps (the layer's input),
the variables are fractions in [0, 1]: w^t, g^t, o^t over tiers t in {gpu, cpu, nvme}
(each summing to 1) and a^keep + a^host + a^recompute = 1. The step has two phases
(ZeRO-Offload, Ren et al. 2021 §4; ZeRO-Infinity, Rajbhandari et al. 2021 §5):

  forward/backward  T_fb >= m Σ (F + B + a^recompute F)                    compute
                    T_fb >= host->GPU bytes / PCIe,  GPU->host bytes / PCIe,  NVMe / its bw
     weights off the GPU are streamed in for each micro-batch's forward and backward
     (2m W), offloaded activations go out and come back (m A each way), offloaded
     gradients go out per micro-batch (m G);
  optimizer         T_opt >= GPU update of o^gpu, CPU update of the rest (states update
                    where they live), PCIe upload of the CPU-updated weights, NVMe read
                    and write of NVMe states;

minimise T_fb + T_opt, with transfers overlapping compute (the bandwidth-centric bound
of ZeRO-Infinity §5.2). Gradients live where their update runs (g^gpu <= o^gpu). Each
tier's capacity holds in each phase: the GPU holds its states, buffers for two streamed
layers and the in-flight activations during forward/backward, its states alone in the
optimizer step; the host its share of states and the offloaded activations; NVMe its
share. An infeasible problem is solved again with elastic capacities to say which tier
misses and by how much.

`quantise` rounds the fractions to what the runtime executes: per layer, all of the
layer's state on the GPU or all on the host (FSDP2's CPU offload of that block, update on
the CPU), and per layer recompute on or off; no NVMe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pulp

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError, require
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels import memory as mem
from meshplan.costmodels.costs import OPTIMIZER_BYTES_PER_PARAM
from meshplan.simulator.analytical import CostCache, PlanCosts, prepare

TIERS = ("gpu", "cpu", "nvme")
STATES = ("weights", "grads", "optimizer")
PHASES = ("forward/backward", "optimizer")
GB = 1e-9
TIE_BREAK = 1e-3


@dataclass(frozen=True, kw_only=True)
class OffloadUnit:
    name: str
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    params: float  # parameters this GPU updates for the unit
    act_bytes: float  # saved by one micro-batch without recompute
    ckpt_bytes: float  # kept by one micro-batch under full recompute
    fwd_s: float  # one micro-batch
    bwd_s: float


@dataclass(frozen=True, kw_only=True)
class OffloadProblem:
    units: tuple[OffloadUnit, ...]
    micro_batches: int
    inflight: float  # micro-batches whose activations are alive at the peak
    gpu_bytes: float  # HBM left for states, activations and stream buffers
    cpu_bytes: float  # host memory for this GPU
    nvme_bytes: float
    pcie_bytes_per_s: float  # per direction
    nvme_bytes_per_s: float
    gpu_update_s_per_param: float
    cpu_update_s_per_param: float

    def __post_init__(self) -> None:
        require(len(self.units) > 0, "offload.units", "no units")
        require(self.micro_batches >= 1 and self.inflight > 0, "offload",
                f"micro-batches {self.micro_batches}, in flight {self.inflight}")
        for name in ("pcie_bytes_per_s", "gpu_update_s_per_param", "cpu_update_s_per_param"):
            require(getattr(self, name) > 0, f"offload.{name}",
                    f"must be > 0, got {getattr(self, name)}")

    @property
    def stream_buffer_bytes(self) -> float:
        """Two layers' weights: the one computing and the one being fetched."""
        return 2 * max(u.weight_bytes for u in self.units)


@dataclass(frozen=True, kw_only=True, eq=False)
class OffloadSolution:
    """Fractions per unit: `states[s]` [units, 3] over TIERS for s in STATES, `acts`
    [units, 3] over (keep, host, recompute)."""

    states: dict[str, np.ndarray]
    acts: np.ndarray
    fb_s: float
    optimizer_s: float
    solve_s: float = 0.0

    @property
    def step_s(self) -> float:
        return self.fb_s + self.optimizer_s


@dataclass(frozen=True, kw_only=True)
class Quantised:
    """What the runtime runs: per unit, state on the host (FSDP CPU offload) or not, and
    recompute on or off."""

    host: tuple[bool, ...]
    recompute: tuple[bool, ...]


# ---- the model of a solution (shared by the LP's check, quantisation and tests) --------

def tier_bytes(pr: OffloadProblem, sol: OffloadSolution) -> dict[tuple[str, str], float]:
    """Bytes each tier holds in each phase."""
    u = pr.units
    size = {"weights": np.array([x.weight_bytes for x in u]),
            "grads": np.array([x.grad_bytes for x in u]),
            "optimizer": np.array([x.optimizer_bytes for x in u])}
    held = {t: sum(float(sol.states[s][:, k] @ size[s]) for s in STATES)
            for k, t in enumerate(TIERS)}
    act = np.array([x.act_bytes for x in u]) * pr.inflight
    ckpt = np.array([x.ckpt_bytes for x in u]) * pr.inflight
    streams = bool(sol.states["weights"][:, 1:].sum() > 1e-9)
    on_gpu_fb = (held["gpu"] + float(sol.acts[:, 0] @ act) + float(sol.acts[:, 2] @ ckpt)
                 + (pr.stream_buffer_bytes if streams else 0.0))
    host_acts = float(sol.acts[:, 1] @ act)
    return {("forward/backward", "gpu"): on_gpu_fb, ("optimizer", "gpu"): held["gpu"],
            ("forward/backward", "cpu"): held["cpu"] + host_acts,
            ("optimizer", "cpu"): held["cpu"],
            ("forward/backward", "nvme"): held["nvme"], ("optimizer", "nvme"): held["nvme"]}


def _col(pr: OffloadProblem, attr: str) -> np.ndarray:
    return np.array([getattr(x, attr) for x in pr.units])


def _over(nbytes: float, rate: float) -> float:
    return nbytes / rate if rate else (0.0 if nbytes == 0 else float("inf"))


def capacity(pr: OffloadProblem, tier: str) -> float:
    return {"gpu": pr.gpu_bytes, "cpu": pr.cpu_bytes, "nvme": pr.nvme_bytes}[tier]


def phase_times(pr: OffloadProblem, sol: OffloadSolution) -> tuple[float, float]:
    """(forward/backward, optimizer) seconds of a solution, by the LP's own rules."""
    m = pr.micro_batches
    w, g, o, a = sol.states["weights"], sol.states["grads"], sol.states["optimizer"], sol.acts
    wb, gb, ob, ab = (_col(pr, k) for k in ("weight_bytes", "grad_bytes", "optimizer_bytes",
                                             "act_bytes"))
    fwd, bwd, params = _col(pr, "fwd_s"), _col(pr, "bwd_s"), _col(pr, "params")
    compute = m * float((fwd + bwd + a[:, 2] * fwd).sum())
    up = float(2 * m * (w[:, 1] + w[:, 2]) @ wb + m * a[:, 1] @ ab)
    down = float(m * a[:, 1] @ ab + m * (g[:, 1] + g[:, 2]) @ gb)
    fb = max(compute, up / pr.pcie_bytes_per_s, down / pr.pcie_bytes_per_s,
             _over(float(2 * m * w[:, 2] @ wb + 2 * m * g[:, 2] @ gb), pr.nvme_bytes_per_s))
    off = o[:, 1] + o[:, 2]
    opt = max(float(o[:, 0] @ params) * pr.gpu_update_s_per_param,
              float(off @ params) * pr.cpu_update_s_per_param,
              float(off @ wb) / pr.pcie_bytes_per_s,
              _over(float(2 * o[:, 2] @ ob + w[:, 2] @ wb), pr.nvme_bytes_per_s))
    return fb, opt


# ---- the LP ----------------------------------------------------------------------

def solve_offload(pr: OffloadProblem, time_limit_s: float = 10.0) -> OffloadSolution:
    """The optimal fractions. Raises SpecError naming the tier and phase that cannot hold
    the state, with the shortfall in bytes, when nothing fits."""
    t0 = time.perf_counter()
    prob, var = _build(pr, elastic=False)
    status = _solve(prob, time_limit_s)
    if status != "Optimal":
        raise _explain(pr, time_limit_s, status)
    sol = _decode(pr, var)
    fb, opt = phase_times(pr, sol)
    return OffloadSolution(states=sol.states, acts=sol.acts, fb_s=fb, optimizer_s=opt,
                           solve_s=time.perf_counter() - t0)


def _build(pr: OffloadProblem, elastic: bool) -> tuple[pulp.LpProblem, dict]:
    n, m = len(pr.units), pr.micro_batches
    prob = pulp.LpProblem("offload", pulp.LpMinimize)
    v = {(s, i, t): prob.add_variable(f"{s}_{i}_{t}", 0, 1)
         for s in STATES for i in range(n) for t in TIERS}
    a = {(i, k): prob.add_variable(f"act_{i}_{k}", 0, 1)
         for i in range(n) for k in ("keep", "host", "recompute")}
    if not pr.nvme_bytes_per_s or not pr.nvme_bytes:
        for s in STATES:
            for i in range(n):
                v[s, i, "nvme"].upBound = 0
    fb = prob.add_variable("fb_s", 0)
    opt = prob.add_variable("optimizer_s", 0)
    stream = prob.add_variable("streams", cat="Binary")  # 1 when any weights leave the GPU
    over = {(ph, t): prob.add_variable(f"over_{ph[:3]}_{t}", 0)
            for ph in PHASES for t in TIERS} if elastic else {}
    u = pr.units
    for i in range(n):
        for s in STATES:
            prob += pulp.lpSum(v[s, i, t] for t in TIERS) == 1, f"{s}_placed_{i}"
        prob += pulp.lpSum(a[i, k] for k in ("keep", "host", "recompute")) == 1, f"acts_{i}"
        prob += v["grads", i, "gpu"] <= v["optimizer", i, "gpu"], f"grads_with_update_{i}"
        prob += stream >= 1 - v["weights", i, "gpu"], f"streams_{i}"
    compute = m * pulp.lpSum(x.fwd_s + x.bwd_s + x.fwd_s * a[i, "recompute"]
                             for i, x in enumerate(u))
    up = pulp.lpSum(2 * m * x.weight_bytes * (v["weights", i, "cpu"] + v["weights", i, "nvme"])
                    + m * x.act_bytes * a[i, "host"] for i, x in enumerate(u))
    down = pulp.lpSum(m * x.act_bytes * a[i, "host"]
                      + m * x.grad_bytes * (v["grads", i, "cpu"] + v["grads", i, "nvme"])
                      for i, x in enumerate(u))
    prob += fb >= compute, "fb_compute"
    prob += fb >= up * (1 / pr.pcie_bytes_per_s), "fb_pcie_to_gpu"
    prob += fb >= down * (1 / pr.pcie_bytes_per_s), "fb_pcie_to_host"
    if pr.nvme_bytes_per_s:
        nvme = pulp.lpSum(2 * m * (x.weight_bytes * v["weights", i, "nvme"]
                                   + x.grad_bytes * v["grads", i, "nvme"])
                          for i, x in enumerate(u))
        prob += fb >= nvme * (1 / pr.nvme_bytes_per_s), "fb_nvme"
        opt_nvme = pulp.lpSum(2 * x.optimizer_bytes * v["optimizer", i, "nvme"]
                              + x.weight_bytes * v["weights", i, "nvme"]
                              for i, x in enumerate(u))
        prob += opt >= opt_nvme * (1 / pr.nvme_bytes_per_s), "opt_nvme"
    off = {i: v["optimizer", i, "cpu"] + v["optimizer", i, "nvme"] for i in range(n)}
    prob += opt >= pr.gpu_update_s_per_param * pulp.lpSum(
        x.params * v["optimizer", i, "gpu"] for i, x in enumerate(u)), "opt_gpu_update"
    prob += opt >= pr.cpu_update_s_per_param * pulp.lpSum(
        x.params * off[i] for i, x in enumerate(u)), "opt_cpu_update"
    prob += opt >= (1 / pr.pcie_bytes_per_s) * pulp.lpSum(
        x.weight_bytes * off[i] for i, x in enumerate(u)), "opt_pcie_upload"
    for ph in PHASES:
        for t in TIERS:
            held = pulp.lpSum(x.weight_bytes * v["weights", i, t] + x.grad_bytes * v["grads", i, t]
                              + x.optimizer_bytes * v["optimizer", i, t] for i, x in enumerate(u))
            if t == "gpu" and ph == "forward/backward":
                held += pulp.lpSum(pr.inflight * (x.act_bytes * a[i, "keep"]
                                                  + x.ckpt_bytes * a[i, "recompute"])
                                   for i, x in enumerate(u)) + pr.stream_buffer_bytes * stream
            if t == "cpu" and ph == "forward/backward":
                held += pulp.lpSum(pr.inflight * x.act_bytes * a[i, "host"]
                                   for i, x in enumerate(u))
            slack = over[ph, t] if elastic else 0  # rows in GB: tolerances suit them
            prob += held * GB <= capacity(pr, t) * GB + slack, f"capacity_{ph[:3]}_{t}"
    # Transfers and recompute hidden under the bottleneck cost nothing in fb + opt; a
    # small price on them keeps state on the GPU when moving it gains nothing.
    moved = (up + down) * (1 / pr.pcie_bytes_per_s) + m * pulp.lpSum(
        x.fwd_s * a[i, "recompute"] for i, x in enumerate(u))
    prob += (pulp.lpSum(over.values()) if elastic else fb + opt + TIE_BREAK * moved)
    return prob, {"v": v, "a": a, "over": over}


def _solve(prob: pulp.LpProblem, time_limit_s: float) -> str:
    solver = pulp.HiGHS(msg=False, timeLimit=time_limit_s)
    if not solver.available():
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)
    prob.solve(solver)
    return pulp.LpStatus[prob.status]


def _decode(pr: OffloadProblem, var: dict) -> OffloadSolution:
    n = len(pr.units)
    states = {s: np.array([[var["v"][s, i, t].value() or 0.0 for t in TIERS]
                           for i in range(n)]) for s in STATES}
    acts = np.array([[var["a"][i, k].value() or 0.0 for k in ("keep", "host", "recompute")]
                     for i in range(n)])
    return OffloadSolution(states=states, acts=acts, fb_s=0.0, optimizer_s=0.0)


def _explain(pr: OffloadProblem, time_limit_s: float, status: str) -> SpecError:
    prob, var = _build(pr, elastic=True)
    if _solve(prob, time_limit_s) != "Optimal":
        return SpecError("offload", f"the LP stopped with status {status!r}")
    (ph, t), worst = max(((k, x.value() or 0.0) for k, x in var["over"].items()),
                         key=lambda kv: kv[1])
    return SpecError(f"offload.{t}", f"even with everything offloaded and recomputed, the "
                     f"{t} tier misses its capacity in the {ph} phase by {worst:.2f} GB "
                     f"(capacity {capacity(pr, t) / 1e9:.2f} GB)")


# ---- what the runtime can run ------------------------------------------------------

def quantise(pr: OffloadProblem, sol: OffloadSolution) -> tuple[Quantised, OffloadSolution]:
    """Round to per-layer decisions the runtime executes and re-check every tier.

    A unit goes to the host when the LP keeps less than half of its state bytes on the
    GPU; recompute where the LP recomputes at least half of its activations and offloaded
    activations stay (the runtime does not send activations to the host). If the GPU then
    overflows, the units with the most state per second of their compute move to the host
    (then recompute turns on) until it fits. Raises SpecError when the host cannot hold
    what must leave the GPU."""
    n = len(pr.units)
    sizes = np.array([[x.weight_bytes, x.grad_bytes, x.optimizer_bytes] for x in pr.units])
    on_gpu = sum(sol.states[s][:, 0] * sizes[:, k] for k, s in enumerate(STATES))
    host = list(on_gpu < 0.5 * sizes.sum(axis=1))
    recompute = list(sol.acts[:, 2] + sol.acts[:, 1] >= 0.5)
    order = sorted(range(n), key=lambda i: -sizes[i].sum() / max(
        pr.units[i].fwd_s + pr.units[i].bwd_s, 1e-12))
    while True:
        q = Quantised(host=tuple(host), recompute=tuple(recompute))
        fixed = _as_solution(pr, q)
        used = tier_bytes(pr, fixed)
        if all(used[ph, "gpu"] <= pr.gpu_bytes for ph in PHASES):
            break
        nxt = next((i for i in order if not host[i]), None)
        if nxt is None:
            nxt = next((i for i in order if not recompute[i]), None)
            if nxt is None:
                break
            recompute[nxt] = True
        else:
            host[nxt] = True
    for ph in PHASES:
        for t in ("gpu", "cpu"):
            if used[ph, t] > capacity(pr, t):
                raise SpecError(f"offload.{t}", f"the runtime's per-layer offload needs "
                                f"{used[ph, t] / 1e9:.2f} GB of {t} memory in the {ph} phase, "
                                f"{(used[ph, t] - capacity(pr, t)) / 1e9:.2f} GB over its "
                                f"{capacity(pr, t) / 1e9:.2f} GB")
    return q, fixed


def _as_solution(pr: OffloadProblem, q: Quantised) -> OffloadSolution:
    n = len(pr.units)
    tier = np.array([[0.0, 1.0, 0.0] if h else [1.0, 0.0, 0.0] for h in q.host])
    acts = np.array([[0.0, 0.0, 1.0] if r else [1.0, 0.0, 0.0] for r in q.recompute])
    sol = OffloadSolution(states={s: tier.copy() for s in STATES}, acts=acts.reshape(n, 3),
                          fb_s=0.0, optimizer_s=0.0)
    fb, opt = phase_times(pr, sol)
    return OffloadSolution(states=sol.states, acts=sol.acts, fb_s=fb, optimizer_s=opt)


# ---- from a plan ---------------------------------------------------------------------

def offload_problem(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
                    cache: CostCache | None = None, rank: int = 0) -> OffloadProblem:
    """One GPU of pipeline rank `rank` under `plan` (its ZeRO sharding, micro-batches and
    schedule), whatever the plan's own offload and recompute settings: the LP chooses
    those. Per-layer time and bytes come from the analytical engine's `PlanCosts`; the
    host's update rate from its DRAM bandwidth shared by the node's GPUs (Adam touches
    `OPTIMIZER_BYTES_PER_PARAM` bytes a parameter)."""
    base = replace(plan, offload="none", recompute="none")
    cm = prepare(model, cluster, work, base, cache)
    p, node = cm.plan, cluster.node
    units = []
    for stage in cm.rank_stages[rank]:
        start = sum(cm.stage_layers[:stage])
        for layer in range(start, start + cm.stage_layers[stage]):
            units.append(_layer_unit(cm, layer))
        first, last = stage == 0, stage == len(cm.stage_layers) - 1
        if first or last:
            units.append(_end_unit(cm, first, last))
    gpn = node.gpus_per_node
    host_bw = node.host_mem_bw_bytes_per_s / gpn
    fixed = (cluster.device.runtime_reserved_bytes + cm.recompute_peak_bytes()
             + (mem.head_activation_bytes(model, cm.shard, p.kernels == "eager")
                if len(cm.stage_layers) - 1 in cm.rank_stages[rank] else 0.0))
    return OffloadProblem(
        units=tuple(units), micro_batches=cm.m,
        inflight=mem.inflight_microbatches(p.schedule, p.pp, p.vpp, rank, cm.m),
        gpu_bytes=cluster.device.hbm_bytes - fixed, cpu_bytes=node.host_memory_bytes / gpn,
        nvme_bytes=node.nvme_bytes / gpn, pcie_bytes_per_s=node.pcie_bw_bytes_per_s,
        nvme_bytes_per_s=node.nvme_bw_bytes_per_s / gpn,
        gpu_update_s_per_param=cm.costs.optimizer_s(work.optimizer, 1e9, 1) / 1e9,
        cpu_update_s_per_param=OPTIMIZER_BYTES_PER_PARAM[work.optimizer] / host_bw)


def _layer_unit(cm: PlanCosts, layer: int) -> OffloadUnit:
    moe = cm.model.is_moe_layer(layer)
    dense, expert = cm.layer_params(moe)
    weights, grads, optimizer, _ = cm.state_bytes(dense, expert)
    f, b = cm.layer_phase(moe)
    return OffloadUnit(name=f"layer {layer}", weight_bytes=weights, grad_bytes=grads,
                       optimizer_bytes=optimizer, params=_updated(cm, dense, expert),
                       act_bytes=cm.layer_acts("none", moe), ckpt_bytes=cm.layer_acts("full", moe),
                       fwd_s=f.total, bwd_s=b.total)


def _end_unit(cm: PlanCosts, first: bool, last: bool) -> OffloadUnit:
    params = cm.end_params(first, last)
    weights, grads, optimizer, _ = cm.state_bytes(params, 0.0)
    f, b = cm.ends_phase(first, last)
    return OffloadUnit(name="embedding/head", weight_bytes=weights, grad_bytes=grads,
                       optimizer_bytes=optimizer, params=_updated(cm, params, 0.0),
                       act_bytes=0.0, ckpt_bytes=0.0, fwd_s=f.total, bwd_s=b.total)


def _updated(cm: PlanCosts, dense: float, expert: float) -> float:
    """Parameters this GPU steps: its ZeRO shard."""
    p = cm.plan
    if p.zero == 0:
        return dense + expert
    return dense / (p.dp * p.cp) + expert / cm.edp
