"""Python entry points; the CLI is a thin shell around these."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from collections.abc import Callable

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.results import SimResult
from meshplan.core.routing import RoutingStats
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels.calibrated import HardwareProfile, costs_for
from meshplan.planner.search import Objective, SearchResult, search_fewest_gpus
from meshplan.planner.search import search as _search
from meshplan.planner.space import SearchSpace
from meshplan.planner.whatif import WhatIfRow
from meshplan.planner.whatif import whatif as _whatif
from meshplan.simulator.analytical import CostCache, simulate_analytical
from meshplan.simulator.des import DesOptions, DesRun, simulate_des

ENGINES = ("analytical", "des")


def simulate(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan | str,
             engine: str = "analytical", profile: HardwareProfile | None = None,
             options: DesOptions | None = None) -> SimResult:
    """Predict one training step of `plan` (a Plan or its text form), with the calibrated
    cost model when a hardware `profile` (from `meshplan profile`) is given. `engine`:
    "analytical" (closed forms, microseconds) or "des" (the event engine: overlap, link
    sharing, what-ifs in `options`; `simulate_run` also returns its timeline).

    Raises SpecError for a plan that cannot run at all (degrees, divisibility); a plan that
    runs out of memory returns `fits=False` with the reason in `violations`.
    """
    if engine not in ENGINES:
        raise SpecError("engine", f"{engine!r} is not an engine; engines: {list(ENGINES)}")
    if engine == "des":
        return simulate_run(model, cluster, work, plan, profile, options).result
    if options is not None:
        raise SpecError("options", "what-if options need engine='des'")
    return simulate_analytical(model, cluster, work, _plan(plan),
                               CostCache(costs=costs_for(cluster, profile)))


def simulate_run(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
                 plan: Plan | str, profile: HardwareProfile | None = None,
                 options: DesOptions | None = None) -> DesRun:
    """The event engine's whole answer: result, per-rank per-stream spans (for a Chrome
    trace, `simulator.trace.chrome_trace`), per-rank breakdown and link utilisation."""
    return simulate_des(model, cluster, work, _plan(plan),
                        CostCache(costs=costs_for(cluster, profile)), options)


def _plan(plan: Plan | str) -> Plan:
    return Plan.parse(plan) if isinstance(plan, str) else plan


def _objective(objective: str | Objective, token_budget: float | None,
               target_days: float | None) -> Objective:
    if isinstance(objective, Objective):
        return objective
    return Objective(kind=objective, token_budget=token_budget,  # type: ignore[arg-type]
                     target_days=target_days)


def search(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, top: int = 5,
           objective: str | Objective = "throughput", space: SearchSpace | None = None,
           token_budget: float | None = None, target_days: float | None = None,
           progress: Callable[[int], None] | None = None,
           profile: HardwareProfile | None = None, refine: int = 0,
           routing: RoutingStats | None = None) -> SearchResult:
    """The `top` best plans, best first (`.ranked`, `.best`, `.stats`); with `refine` = K
    the best K are re-timed by the event engine and re-ranked. With `routing` (MoE
    models) each plan carries its loads and EPLB's placement for the plan's ep.

    objective: "throughput" (tokens/s), "cost" ($ per million tokens; needs the device's
    price_per_gpu_hour) or "gpus" (fewest GPUs that train `token_budget` tokens within
    `target_days`). Raises NoFeasiblePlan (a SpecError) naming the tightest plan when
    nothing fits.
    """
    obj = _objective(objective, token_budget, target_days)
    with _pool(refine) as pool:
        mapper = pool.map if pool is not None else None
        if obj.kind == "gpus":
            return search_fewest_gpus(model, cluster, work, obj, space, top, progress,
                                      profile, refine_des=refine, mapper=mapper,
                                      routing=routing)
        return _search(model, cluster, work, space, obj, top, progress=progress,
                       profile=profile, refine_des=refine, mapper=mapper, routing=routing)


@contextlib.contextmanager
def _pool(jobs: int):
    """Processes for the event-engine refinement, one per core (at most `jobs`)."""
    workers = min(jobs, os.cpu_count() or 1)
    if workers < 2:
        yield None
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        yield pool


def whatif(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
           vary: dict[str, list[str]], objective: str | Objective = "throughput",
           space: SearchSpace | None = None, token_budget: float | None = None,
           target_days: float | None = None) -> list[WhatIfRow]:
    """Re-search for every combination of knob values, e.g. {"gpus": ["1024", "2048"],
    "cluster.node.nic_bw_bytes_per_s": ["x1", "x2"]}."""
    return _whatif(model, cluster, work, vary, space,
                   _objective(objective, token_budget, target_days))
