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
the CPU), and recompute on or off; no NVMe.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pulp

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels.offload import (
    PHASES,
    STATES,
    TIERS,
    OffloadProblem,
    OffloadSolution,
    Quantised,
    capacity,
    phase_times,
    runtime_solution,
    tier_bytes,
)
from meshplan.simulator.analytical import CostCache, prepare

GB = 1e-9
TIE_BREAK = 1e-3

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


ACTS = ("keep", "host", "recompute")


def _build(pr: OffloadProblem, elastic: bool) -> tuple[pulp.LpProblem, dict]:
    """The LP; with `elastic`, capacities get overflows (GB) to minimise instead."""
    n = len(pr.units)
    prob = pulp.LpProblem("offload", pulp.LpMinimize)
    nvme = 1 if pr.nvme_bytes_per_s and pr.nvme_bytes else 0
    var = {"v": {(s, i, t): prob.add_variable(f"{s}_{i}_{t}", 0, nvme if t == "nvme" else 1)
                 for s in STATES for i in range(n) for t in TIERS},
           "a": {(i, k): prob.add_variable(f"act_{i}_{k}", 0, 1)
                 for i in range(n) for k in ACTS},
           "stream": prob.add_variable("streams", cat="Binary"),  # any weights off the GPU
           "over": {(ph, t): prob.add_variable(f"over_{ph[:3]}_{t}", 0)
                    for ph in PHASES for t in TIERS} if elastic else {}}
    v, a, stream = var["v"], var["a"], var["stream"]
    for i in range(n):
        for s in STATES:
            prob += pulp.lpSum(v[s, i, t] for t in TIERS) == 1, f"{s}_placed_{i}"
        prob += pulp.lpSum(a[i, k] for k in ACTS) == 1, f"acts_{i}"
        prob += v["grads", i, "gpu"] <= v["optimizer", i, "gpu"], f"grads_with_update_{i}"
        prob += stream >= 1 - v["weights", i, "gpu"], f"streams_{i}"
    fb, opt, moved = _time_rows(pr, prob, v, a)
    _capacity_rows(pr, prob, var)
    # Transfers and recompute hidden under the bottleneck cost nothing in fb + opt; a
    # small price on them keeps state on the GPU when moving it gains nothing.
    prob += (pulp.lpSum(var["over"].values()) if elastic else fb + opt + TIE_BREAK * moved)
    return prob, var


def _time_rows(pr: OffloadProblem, prob: pulp.LpProblem, v: dict, a: dict) -> tuple:
    """The two phases' time bounds (`costmodels.offload.phase_times`); returns their
    variables and the seconds of transfers and recompute."""
    m, u = pr.micro_batches, list(enumerate(pr.units))
    fb, opt = prob.add_variable("fb_s", 0), prob.add_variable("optimizer_s", 0)
    recompute = m * pulp.lpSum(x.fwd_s * a[i, "recompute"] for i, x in u)
    up = pulp.lpSum(2 * m * x.weight_bytes * (v["weights", i, "cpu"] + v["weights", i, "nvme"])
                    + m * x.act_bytes * a[i, "host"] for i, x in u)
    down = pulp.lpSum(m * x.act_bytes * a[i, "host"]
                      + m * x.grad_bytes * (v["grads", i, "cpu"] + v["grads", i, "nvme"])
                      for i, x in u)
    prob += fb >= m * sum(x.fwd_s + x.bwd_s for _, x in u) + recompute, "fb_compute"
    prob += fb >= up * (1 / pr.pcie_bytes_per_s), "fb_pcie_to_gpu"
    prob += fb >= down * (1 / pr.pcie_bytes_per_s), "fb_pcie_to_host"
    if pr.nvme_bytes_per_s:
        prob += fb >= (1 / pr.nvme_bytes_per_s) * pulp.lpSum(
            2 * m * (x.weight_bytes * v["weights", i, "nvme"]
                     + x.grad_bytes * v["grads", i, "nvme"]) for i, x in u), "fb_nvme"
        prob += opt >= (1 / pr.nvme_bytes_per_s) * pulp.lpSum(
            2 * x.optimizer_bytes * v["optimizer", i, "nvme"]
            + x.weight_bytes * v["weights", i, "nvme"] for i, x in u), "opt_nvme"
    off = {i: v["optimizer", i, "cpu"] + v["optimizer", i, "nvme"] for i, _ in u}
    prob += opt >= pr.gpu_update_s_per_param * pulp.lpSum(
        x.params * v["optimizer", i, "gpu"] for i, x in u), "opt_gpu_update"
    prob += opt >= pr.cpu_update_s_per_param * pulp.lpSum(
        x.params * off[i] for i, x in u), "opt_cpu_update"
    prob += opt >= (1 / pr.pcie_bytes_per_s) * pulp.lpSum(
        x.weight_bytes * off[i] for i, x in u), "opt_pcie_upload"
    return fb, opt, (up + down) * (1 / pr.pcie_bytes_per_s) + recompute


def _capacity_rows(pr: OffloadProblem, prob: pulp.LpProblem, var: dict) -> None:
    """Every tier in every phase (`costmodels.offload.tier_bytes`), in GB (the solver's
    tolerances suit them)."""
    v, a, u = var["v"], var["a"], list(enumerate(pr.units))
    for ph in PHASES:
        for t in TIERS:
            held = pulp.lpSum(x.weight_bytes * v["weights", i, t] + x.grad_bytes * v["grads", i, t]
                              + x.optimizer_bytes * v["optimizer", i, t] for i, x in u)
            if t == "gpu" and ph == "forward/backward":
                held += pulp.lpSum(pr.inflight * (x.act_bytes * a[i, "keep"]
                                                  + x.ckpt_bytes * a[i, "recompute"])
                                   for i, x in u) + pr.stream_buffer_bytes * var["stream"]
            if t == "cpu" and ph == "forward/backward":
                held += pulp.lpSum(pr.inflight * x.act_bytes * a[i, "host"] for i, x in u)
            slack = var["over"][ph, t] if var["over"] else 0
            prob += held * GB <= capacity(pr, t) * GB + slack, f"capacity_{ph[:3]}_{t}"


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
    acts = np.array([[var["a"][i, k].value() or 0.0 for k in ACTS] for i in range(n)])
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
        fixed = runtime_solution(pr, q)
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


# ---- from a plan ---------------------------------------------------------------------

def offload_problem(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
                    cache: CostCache | None = None, rank: int = 0) -> OffloadProblem:
    """One GPU of pipeline rank `rank` under `plan` (its ZeRO sharding, micro-batches and
    schedule), whatever the plan's own offload and recompute settings: the LP chooses
    those (`PlanCosts.offload_problem`)."""
    base = replace(plan, offload="none", recompute="none", host_layers=None)
    return prepare(model, cluster, work, base, cache).offload_problem(rank)


def offload_plan(plan: Plan, q: Quantised) -> Plan:
    """The plan that runs a quantised choice: `offload=layers` with the host's units."""
    return replace(plan, offload="layers", recompute="full" if any(q.recompute) else "none",
                   host_layers=tuple(i for i, h in enumerate(q.host) if h))
