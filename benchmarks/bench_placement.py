"""Expert-placement solve time on a DeepSeek-V3-shaped instance.

Run: python benchmarks/bench_placement.py [--skew S] [--affinity A] [--time-limit T].
deepseek-v3 (58 MoE layers, 256 experts, top-8) on 64 H100s in 8 nodes with 32 redundant
slots (288 slots: 4 or 5 a GPU), a seeded synthetic trace of 4096 tokens a layer. Prints
the solve time, the optimiser's objective against round-robin and EPLB (global and
hierarchical), the busiest GPU over the mean, the tokens changing node between layers, and
the gap to the lower bound. Target: under 60 s.
"""

from __future__ import annotations

import argparse
import time

import meshplan as mp
from meshplan.core.routing import synthetic_routing
from meshplan.planner.placement import PlacementProblem, optimise_placement, token_costs_s
from meshplan.report import placement_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skew", type=float, default=0.5)
    ap.add_argument("--affinity", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--time-limit", type=float, default=55.0)
    args = ap.parse_args()
    model, cluster = mp.load_model("deepseek-v3"), mp.load_cluster("h100-sxm", 64)
    assert model.moe is not None
    t0 = time.perf_counter()
    routing = synthetic_routing(n_layers=model.n_moe_layers, n_experts=model.moe.n_experts,
                                top_k=model.moe.top_k, tokens=args.tokens, skew=args.skew,
                                affinity=args.affinity, seed=0)
    t_trace = time.perf_counter() - t0
    compute_s, nic_s = token_costs_s(model, cluster)
    problem = PlacementProblem(routing=routing, n_gpus=64, gpus_per_node=8, redundant=32,
                               compute_s_per_token=compute_s, nic_s_per_token=nic_s)
    result = optimise_placement(problem, args.time_limit)
    print(f"deepseek-v3: {routing.n_layers} MoE layers x {routing.n_experts} experts, 64 GPUs "
          f"in 8 nodes, 32 redundant slots; {routing.source}, {args.tokens} tokens/layer "
          f"(trace {t_trace:.1f} s)")
    print(f"per routed token: expert compute {compute_s * 1e9:.0f} ns, a node crossing "
          f"{nic_s * 1e9:.0f} ns of one GPU's NIC share")
    print(placement_table(result))
    print(f"solve: {result.solve_s:.1f} s (target < 60 s)")


if __name__ == "__main__":
    main()
