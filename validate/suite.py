"""`meshplan validate`: run a suite of plans for real, predict them, report the error.

Every case is a plan on `tiny-dense` or `tiny-moe` for the `cpu` cluster (2–4 gloo
processes) or, on a machine with CUDA, single-GPU plans. Each runs through the same path
as `meshplan run` (a plan file, torchrun, the runtime's measured JSON) and is predicted by
the analytical and the event engine with the calibrated cost model when a profile is given.

Memory: the runtime measures tensor bytes (CPU: live tensors at the step's start plus the
peak of the allocator's records, `runtime.measure`; CUDA: the allocator's peak), so the
prediction it is compared with leaves out the device's `runtime_reserved_bytes` (CUDA
context, torch and gloo start-up), which is in the simulator's peak. On a CPU device the
host and the device are one memory and offloading moves nothing (the runtime says so in
its notes), so an offloading plan's memory is compared with the prediction for the same
plan without offloading: every state in the one pool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from meshplan.api import simulate
from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import require
from meshplan.core.plan import Plan
from meshplan.core.planfile import PlanFile
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels.calibrated import HardwareProfile
from meshplan.loaders import load_cluster, load_model, save_plan_file

from .compare import NO_OVERLAP, Row

BASE = "kernels=eager"  # the runtime runs eager torch ops


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    model: str
    gpus: int
    plan: str
    seq_len: int = 256
    global_batch: int = 16


CPU_SUITE = (
    Case(name="dp2", model="tiny-dense", gpus=2, plan="dp=2,mbs=4"),
    Case(name="dp4", model="tiny-dense", gpus=4, plan="dp=4,mbs=2"),
    Case(name="fsdp2", model="tiny-dense", gpus=2, plan="dp=2,mbs=4,zero=3"),
    Case(name="zero2-offload", model="tiny-dense", gpus=2,
         plan="dp=2,mbs=4,zero=2,offload=optimizer"),
    Case(name="tp2-sp", model="tiny-dense", gpus=2, plan="tp=2,sp=on,mbs=4"),
    Case(name="dp2-tp2-sp", model="tiny-dense", gpus=4, plan="dp=2,tp=2,sp=on,mbs=4"),
    Case(name="pp2-1f1b", model="tiny-dense", gpus=2, plan="pp=2,mbs=2"),
    Case(name="pp2-interleaved", model="tiny-dense", gpus=2, plan="pp=2,vpp=2,mbs=2"),
    Case(name="pp2-gpipe", model="tiny-dense", gpus=2, plan="pp=2,mbs=2,schedule=gpipe"),
    Case(name="pp2-zb", model="tiny-dense", gpus=2, plan="pp=2,mbs=2,schedule=zb"),
    Case(name="pp2-dualpipe", model="tiny-dense", gpus=2, plan="pp=2,mbs=2,schedule=dualpipe"),
    Case(name="dp2-pp2", model="tiny-dense", gpus=4, plan="dp=2,pp=2,mbs=2"),
    Case(name="cp2", model="tiny-dense", gpus=2, plan="cp=2,mbs=4"),
    Case(name="dp2-full-recompute", model="tiny-dense", gpus=2,
         plan="dp=2,mbs=4,recompute=full"),
    Case(name="dp2-selective", model="tiny-dense", gpus=2,
         plan="dp=2,mbs=4,recompute=selective"),
    Case(name="moe-dp2", model="tiny-moe", gpus=2, plan="dp=2,mbs=4"),
    Case(name="moe-ep2", model="tiny-moe", gpus=2, plan="dp=2,ep=2,mbs=4"),
    Case(name="moe-ep4", model="tiny-moe", gpus=4, plan="dp=4,ep=4,mbs=2"),
)
SHORT_SUITE = tuple(c for c in CPU_SUITE
                    if c.name in ("dp2", "tp2-sp", "pp2-1f1b", "moe-ep2", "dp2-full-recompute"))


def _without_overlap(case: Case) -> Case:
    return replace(case, name=case.name + NO_OVERLAP, plan=f"{case.plan},dp_overlap=off")


# Where overlap decides the step, each DP/FSDP plan beside itself without overlap (its
# measured saving tests the overlap model alone, `compare.overlap_savings`): DDP in 1 MiB
# buckets (tiny-dense's gradients fill four; in one 25 MiB bucket nothing overlaps), alone
# and beside the CP ring's or EP's traffic, and FSDP; then the CP ring, EP and pipelines.
# Meant for slow links (a `tc`-throttled loopback), where the communication is as long as
# the compute it runs beside.
_WITH_TWINS = (
    Case(name="dp2-b1", model="tiny-dense", gpus=2, plan="dp=2,mbs=4,bucket_mb=1"),
    Case(name="dp4-b1", model="tiny-dense", gpus=4, plan="dp=4,mbs=2,bucket_mb=1"),
    *(c for c in CPU_SUITE if c.name == "fsdp2"),
    Case(name="dp2-cp2-b1", model="tiny-dense", gpus=4, plan="dp=2,cp=2,mbs=4,bucket_mb=1"),
    Case(name="moe-ep2-b1", model="tiny-moe", gpus=2, plan="dp=2,ep=2,mbs=4,bucket_mb=1"),
    Case(name="moe-dp4-ep2-b1", model="tiny-moe", gpus=4, plan="dp=4,ep=2,mbs=2,bucket_mb=1"),
)
OVERLAP_SUITE = tuple(
    [c for case in _WITH_TWINS for c in (case, _without_overlap(case))]
    + [c for c in CPU_SUITE if c.name in ("cp2", "moe-ep2", "pp2-1f1b", "pp2-interleaved",
                                          "dp2-pp2")])
SUITES = {"full": CPU_SUITE, "short": SHORT_SUITE, "overlap": OVERLAP_SUITE}


def plan_file(case: Case, cluster: ClusterSpec, profile: HardwareProfile | None,
              dtype: str) -> PlanFile:
    model = load_model(case.model)
    work = TrainWorkload(seq_len=case.seq_len, global_batch=case.global_batch, dtype=dtype)
    plan = Plan.parse(f"{BASE},{case.plan}")
    cluster = cluster.with_gpus(case.gpus)
    predicted = simulate(model, cluster, work, plan, profile=profile)
    des = simulate(model, cluster, work, plan, engine="des", profile=profile)
    pool = predicted
    if cluster.device.kind == "cpu" and plan.offload != "none":
        pool = simulate(model, cluster, work, replace(plan, offload="none", host_layers=None),
                        profile=profile)
    return PlanFile(model=model, cluster=cluster, work=work, plan=plan,
                    predicted=predicted.to_dict() | {
                        "des_step_time_s": des.step_time_s,
                        "compared_memory_bytes": pool.peak_memory_bytes})


def run_case(pf: PlanFile, steps: int, warmup: int) -> dict:
    """Run a plan file through `meshplan run`'s launcher; returns the measured JSON."""
    from meshplan.runtime import launch

    with tempfile.TemporaryDirectory() as tmp:
        path, out = f"{tmp}/plan.json", f"{tmp}/measured.json"
        save_plan_file(path, pf)
        job = launch.plan_launch(pf, ["--plan-file", path, "--out", out, "--steps", str(steps),
                                      "--warmup-steps", str(warmup)])
        proc = subprocess.run(job.command(), capture_output=True, text=True,
                              env=launch.worker_env())
        if proc.returncode:
            raise RuntimeError(f"the run failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())


def validate(cases: tuple[Case, ...], profile: HardwareProfile | None, steps: int = 6,
             warmup: int = 2, cluster: str = "cpu", dtype: str = "fp32", rounds: int = 1,
             say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
             ) -> list[tuple[Case, Row, dict]]:
    """Run every case `rounds` times, a whole pass over the suite after another, and keep
    per case its fastest round (with its memory and steal). A shared machine drifts
    over minutes and what it does to a step only adds time (the hypervisor's steal, a
    neighbour's cache and memory traffic), so the fastest of several medians of steps
    taken minutes apart is the closest to the machine undisturbed, the time the profile
    describes; Python's `timeit` takes the minimum of its repeats for the same reason."""
    require(rounds >= 1, "rounds", f"must be >= 1, got {rounds}")
    base = load_cluster(cluster)
    pfs = [plan_file(case, base, profile, dtype) for case in cases]
    runs: list[list[dict]] = [[] for _ in cases]
    for k in range(rounds):
        for i, (case, pf) in enumerate(zip(cases, pfs, strict=True), 1):
            turn = f" (round {k + 1}/{rounds})" if rounds > 1 else ""
            say(f"[{i}/{len(cases)}]{turn} {case.name}: {pf.plan.to_text()}")
            runs[i - 1].append(run_case(pf, steps, warmup))
    kept = [fastest_run(measured) for measured in runs]
    return [(case, _row(case, pf, m), m) for case, pf, m in zip(cases, pfs, kept, strict=True)]


def fastest_run(measured: list[dict]) -> dict:
    """The run of least step time, with every round's step time beside it."""
    return min(measured, key=lambda m: m["step_time_s"]) | {
        "round_step_times_s": [m["step_time_s"] for m in measured]}


def _row(case: Case, pf: PlanFile, measured: dict) -> Row:
    reserved = pf.cluster.device.runtime_reserved_bytes
    return Row(name=case.name, predicted_step_s=pf.predicted["step_time_s"],
               measured_step_s=measured["step_time_s"],
               predicted_memory_bytes=pf.predicted["compared_memory_bytes"] - reserved,
               measured_memory_bytes=measured.get("peak_memory_bytes"),
               predicted_des_step_s=pf.predicted.get("des_step_time_s"),
               measured_steal=measured.get("host_steal_fraction"))


def select(cases: tuple[Case, ...], names: str | None) -> tuple[Case, ...]:
    """The cases named in a comma-separated list, in suite order (all for None)."""
    if not names:
        return cases
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c.name for c in cases}
    unknown = [n for n in wanted if n not in known]
    require(not unknown, "cases", f"{', '.join(unknown)} not in the suite "
            f"({', '.join(c.name for c in cases)})")
    return tuple(c for c in cases if c.name in wanted)
