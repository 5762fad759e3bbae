"""What each parallel mechanism of the runtime costs per layer beyond its ops and messages.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m meshplan.validate.mechbench OUT.json

Tensor parallelism through DTensor, ring attention, FSDP2's per-layer hooks and expert
dispatch all spend host time per layer that neither the ops nor the collectives they
issue account for (sharding propagation, Python, waits). Each is measured the way
`opbench.overheads` measures the plain layer: the runtime's own model under one plan,
with 1 and 3 layers, on a sequence so short that compute costs next to nothing, their
calls alternating so that the machine's drift cancels; half the difference is one
layer's forward and backward. `profile.py` subtracts what the cost
model already prices for that layer (ops, messages, the plain layer's overhead) and keeps
the rest. Pipelining is measured per model-chunk call instead: whole pipeline steps with
2 and 6 micro-batches, whose difference over 4 is one micro-batch's share. Rank 0 writes
{mechanism: {"1": [fwd s, bwd s], "3": [...]}, "pp": {"2": step s, "6": step s}}.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from meshplan.core.plan import Plan
from meshplan.core.planfile import PlanFile
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import load_cluster, load_model

# mechanism -> (catalog model, plan for 2 processes). In this order each residual is
# taken after the ones before it are priced ("ep" runs MoE layers, so "moe" comes first).
MECHANISMS = {"tp": ("tiny-dense", "tp=2,sp=on"), "cp": ("tiny-dense", "cp=2"),
              "fsdp": ("tiny-dense", "dp=2,zero=3"), "zero2": ("tiny-dense", "dp=2,zero=2"),
              "moe": ("tiny-moe", "dp=2"), "ep": ("tiny-moe", "dp=2,ep=2")}
SEQ = 16
REPS = 40
PP_PLAN, PP_MICRO_BATCHES = "pp=2", (2, 6)


def plan_file(mechanism: str, layers: int, processes: int) -> PlanFile:
    """The mechanism's model cut to `layers` layers (all MoE for tiny-moe) and its plan."""
    name, text = MECHANISMS[mechanism]
    model = load_model(name)
    model = replace(model, n_layers=layers)
    if model.moe:
        model = replace(model, moe=replace(model.moe, first_k_dense=0))
    plan = Plan.parse(f"{text},mbs=1,kernels=eager").resolve(processes)
    work = TrainWorkload(seq_len=SEQ, global_batch=plan.dp, dtype="fp32")
    return PlanFile(model=model, cluster=load_cluster("cpu", gpus=processes), work=work,
                    plan=plan)


def time_layers(pfs: list[PlanFile], device) -> list[list[float]]:
    """Per plan file, [forward s, backward s] of one micro-batch: the slowest rank's
    median. The plan files' calls alternate, so a drift of the machine falls on each
    alike and cancels in their difference."""
    return _alternating([_layer_runner(pf, device) for pf in pfs], REPS, device)


def _alternating(runs: list, reps: int, device) -> list[list[float]]:
    """Per call of `runs` (each returns a tuple of seconds), the slowest rank's median of
    each of its seconds over `reps` turns after two warm-up turns; the calls take turns,
    each after a scrub of the private cache and a barrier."""
    import torch.distributed as dist

    from .microbench import Scrub

    samples: list[list[list[float]]] = [[] for _ in runs]
    scrub = Scrub(device)
    for rep in range(reps + 2):
        for run, out in zip(runs, samples, strict=True):
            scrub()  # operands outside the private cache, as the profile's tables time them
            dist.barrier()
            seconds = run()
            if rep >= 2:
                out.append(list(seconds))
    return [_slowest_median(*map(list, zip(*out, strict=True))) for out in samples]


def _layer_runner(pf: PlanFile, device):
    """A call that runs one micro-batch's forward and backward; returns their seconds."""
    import torch

    from meshplan.runtime.data import rank_micro_batches
    from meshplan.runtime.mesh import build_mesh
    from meshplan.runtime.train import build, loss_fn

    plan = pf.plan
    mesh = build_mesh(plan, device.type)
    (model,) = build(pf, mesh, 0, device).values()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: as between micro-batches
        model.set_requires_gradient_sync(False)  # reductions are priced once per step
        model.set_reshard_after_backward(plan.zero == 3)
    batch = torch.randint(0, pf.model.vocab_size, (plan.dp, SEQ + 1))
    (mb,) = rank_micro_batches(batch, dp=plan.dp, dp_rank=mesh.coord("dp"), cp=plan.cp,
                               cp_rank=mesh.coord("cp"), mbs=1, device=device)

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = loss_fn(model(mb.tokens, mb.positions), mb.labels)
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1

    return run


def _slowest_median(*samples: list[float]) -> list[float]:
    """Per list of timings, the median on the slowest rank (the same on every rank)."""
    import torch
    import torch.distributed as dist

    med = torch.tensor([sorted(t)[len(t) // 2] for t in samples], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.tolist()


def pp_plan_file(micro_batches: int, processes: int) -> PlanFile:
    """tiny-dense with one layer per pipeline stage, `micro_batches` micro-batches of 1."""
    model = replace(load_model("tiny-dense"), n_layers=2)
    plan = Plan.parse(f"{PP_PLAN},mbs=1,kernels=eager").resolve(processes)
    work = TrainWorkload(seq_len=SEQ, global_batch=micro_batches * plan.dp, dtype="fp32")
    return PlanFile(model=model, cluster=load_cluster("cpu", gpus=processes), work=work,
                    plan=plan)


def time_pipeline_steps(pfs: list[PlanFile], device) -> list[float]:
    """Per plan file, seconds of one pipeline step (forward and backward of every
    micro-batch, no optimizer): the slowest rank's median, the plan files alternating."""
    import torch

    from meshplan.runtime.data import rank_micro_batches
    from meshplan.runtime.mesh import build_mesh
    from meshplan.runtime.train import build, pipeline_rank

    def runner(pf: PlanFile):
        plan = pf.plan
        mesh = build_mesh(plan, device.type)
        rank = pipeline_rank(pf, mesh, build(pf, mesh, 0, device), device)
        batch = torch.randint(0, pf.model.vocab_size, (pf.work.global_batch, SEQ + 1))
        micro = rank_micro_batches(batch, dp=plan.dp, dp_rank=mesh.coord("dp"), cp=1,
                                   cp_rank=0, mbs=plan.mbs, device=device)

        def run() -> tuple[float]:
            t0 = time.perf_counter()
            rank.step(micro)
            return (time.perf_counter() - t0,)

        return run

    return [t for (t,) in _alternating([runner(pf) for pf in pfs], REPS // 2, device)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="meshplan.validate.mechbench")
    p.add_argument("out")
    a = p.parse_args(argv)
    import torch  # the worker needs torch; `plan_file` (used by the fit) does not
    import torch.distributed as dist

    from .commbench import run_worker

    torch.set_num_threads(1)
    device = torch.device("cpu")

    def record() -> dict:
        n = dist.get_world_size()
        out: dict = {}
        for mech in MECHANISMS:
            one, three = time_layers([plan_file(mech, 1, n), plan_file(mech, 3, n)], device)
            out[mech] = {"1": one, "3": three}
        pp = time_pipeline_steps([pp_plan_file(m, n) for m in PP_MICRO_BATCHES], device)
        out["pp"] = {str(m): t for m, t in zip(PP_MICRO_BATCHES, pp, strict=True)}
        return out

    run_worker(a.out, "gloo", record)


if __name__ == "__main__":
    main()
