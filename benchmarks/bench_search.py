"""Wall time of the analytical search and candidates evaluated per second.

Run: python benchmarks/bench_search.py. The case is the planner issue's: llama3-405b on
16,384 H100s, seq 8192, global batch 2048, default search space. Target: under 20 s on
a 2-core machine (the best peer takes 68 s for 8,112 candidates on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import meshplan as mp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-405b")
    ap.add_argument("--gpus", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--global-batch", type=int, default=2048)
    args = ap.parse_args()
    model = mp.load_model(args.model)
    cluster = mp.load_cluster("h100-sxm", args.gpus)
    work = mp.TrainWorkload(seq_len=args.seq_len, global_batch=args.global_batch)
    start = time.perf_counter()
    found = mp.search(model, cluster, work, top=5)
    wall = time.perf_counter() - start
    s = found.stats
    print(f"{args.model} on {args.gpus}x h100-sxm, seq {args.seq_len}, batch "
          f"{args.global_batch}")
    print(f"wall {wall:.2f} s; {s.enumerated:,} candidates ({s.over_memory:,} pruned by "
          f"memory, {s.timed:,} timed, {s.split_refined} splits improved) -> "
          f"{s.enumerated / wall:,.0f} candidates/s")
    print(f"best: {found.best.plan.to_text()} at {found.best.tokens_per_s:,.0f} tokens/s, "
          f"MFU {found.best.mfu * 100:.1f}%")


if __name__ == "__main__":
    main()
