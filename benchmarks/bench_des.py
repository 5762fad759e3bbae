"""Event-engine speed: one training step of llama3-405b on 16,384 H100s.

Run: python benchmarks/bench_des.py [--plan P] [--repeat N]. Default plan tp=8, pp=16,
interleaved with 2 chunks per rank, global batch 2048, seq 8192 (dp=128, 16 micro-batches
per replica). Prints wall time, events (fluid job starts, ends and wake-ups) and events/s
on one core, and the simulated step beside the analytical one. Target: under 10 s.
"""

from __future__ import annotations

import argparse
import time

import meshplan as mp
from meshplan.simulator.des import simulate_des


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="tp=8,pp=16,vpp=2,sp=on,mbs=1")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = mp.load_model("llama3-405b")
    cluster = mp.load_cluster("h100-sxm", 16384)
    work = mp.TrainWorkload(seq_len=8192, global_batch=2048)
    plan = mp.Plan.parse(args.plan)
    analytical = mp.simulate(model, cluster, work, plan)
    times, run = [], None
    for _ in range(args.repeat):
        start = time.perf_counter()
        run = simulate_des(model, cluster, work, plan)
        times.append(time.perf_counter() - start)
    assert run is not None
    best = min(times)
    r = run.result
    print(f"llama3-405b on 16384x h100-sxm, seq 8192, batch 2048, plan {r.plan.to_text()}")
    print(f"simulated ranks: {len(run.ranks)} (one per class of identical ranks), "
          f"spans: {len(run.spans):,}")
    print(f"wall: best {best:.2f} s of {args.repeat} (first {times[0]:.2f} s), "
          f"{run.events:,} events -> {run.events / best:,.0f} events/s (one core)")
    print(f"step: des {r.step_time_s:.3f} s (bubble {r.time.bubble:.3f}, exposed comm "
          f"{r.time.exposed_comm:.3f}); analytical {analytical.step_time_s:.3f} s "
          f"(bubble {analytical.time.bubble:.3f}, exposed comm "
          f"{analytical.time.exposed_comm:.3f})")


if __name__ == "__main__":
    main()
