"""Offloading LP: solve time and what it chooses.

Run: python benchmarks/bench_offload.py. Two cases, ZeRO-3 over 8 GPUs, seq 4096, batch 64:
llama3-405b on one H100 node (126 layers: the LP's size target, under 1 s) and
llama3-70b on one A100-40GB node (does not fit without offloading). Prints the solve time,
the predicted step (forward/backward and optimizer phases), where each state went, the
bytes on each tier in each phase against its capacity, and the per-layer form the runtime
can execute.
"""

from __future__ import annotations

import time

import meshplan as mp
from meshplan.core.errors import SpecError
from meshplan.planner.offload import (
    PHASES,
    STATES,
    TIERS,
    capacity,
    offload_problem,
    quantise,
    solve_offload,
    tier_bytes,
)


def main() -> None:
    for model, cluster in (("llama3-405b", "h100-sxm"), ("llama3-70b", "a100-40gb")):
        m, c = mp.load_model(model), mp.load_cluster(cluster, 8)
        work = mp.TrainWorkload(seq_len=4096, global_batch=64)
        plan = mp.Plan.parse("dp=8,zero=3,mbs=1")
        fits = mp.simulate(m, c, work, plan).fits
        t0 = time.perf_counter()
        pr = offload_problem(m, c, work, plan)
        t_build = time.perf_counter() - t0
        sol = solve_offload(pr)
        print(f"{model} on 8x {cluster} ({len(pr.units)} units; fits without offload: {fits})")
        print(f"  build {t_build:.2f} s, solve {sol.solve_s:.2f} s; step {sol.step_s:.1f} s "
              f"(forward/backward {sol.fb_s:.1f} s, optimizer {sol.optimizer_s:.1f} s)")
        for s in STATES:
            share = sol.states[s].mean(axis=0)
            print(f"  {s:9s} " + ", ".join(f"{t} {x:.0%}" for t, x in zip(TIERS, share,
                                                                          strict=True)))
        acts = sol.acts.mean(axis=0)
        print(f"  activations kept {acts[0]:.0%}, to host {acts[1]:.0%}, recomputed {acts[2]:.0%}")
        used = tier_bytes(pr, sol)
        for ph in PHASES:
            print(f"  {ph:16s} " + ", ".join(
                f"{t} {used[ph, t] / 1e9:.1f}/{capacity(pr, t) / 1e9:.0f} GB" for t in TIERS))
        try:
            q, fixed = quantise(pr, sol)
            print(f"  runtime form: {sum(q.host)} of {len(q.host)} units on the host, "
                  f"{sum(q.recompute)} recomputed; step {fixed.step_s:.1f} s")
        except SpecError as err:
            print(f"  runtime form: {err}")


if __name__ == "__main__":
    main()
