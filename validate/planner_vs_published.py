"""Is the planner's best plan predicted at least as fast as each published plan?

For every training row of shared/validation/published.json that `published.py` turns into
meshplan inputs, search the default space on the same model, cluster and workload (the
software-stack fields, attention kernel, fused/eager kernels and overlap switches, are
carried from the published plan) and compare predicted tokens/s of the planner's best plan
with the published plan's (the fastest fitting plan of its sweep over unstated fields).
Prints how the two plans differ.

Usage: python -m meshplan.validate.planner_vs_published [PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from meshplan.core.errors import SpecError
from meshplan.planner.explain import plan_differences
from meshplan.planner.search import search
from meshplan.planner.space import SearchSpace
from meshplan.simulator.analytical import simulate_analytical

from .published import DEFAULT_PATH, Case, cases


def published_best(case: Case):
    results = []
    for plan in case.plans:
        try:
            results.append(simulate_analytical(case.model, case.cluster, case.work, plan))
        except SpecError:
            continue
    fitting = [r for r in results if r.fits] or results
    return max(fitting, key=lambda r: r.tokens_per_s)


def compare(case: Case) -> dict:
    pub = published_best(case)
    stack = case.plans[0]
    base = replace(stack, dp=0, tp=1, pp=1, cp=1, ep=1, etp=0, vpp=1, mbs=1,
                   schedule="1f1b", recompute="none", zero=0, sp=False, offload="none",
                   stage_layers=None)
    start = time.perf_counter()
    found = search(case.model, case.cluster, case.work, SearchSpace(base=base), top=1)
    wall = time.perf_counter() - start
    best = found.best
    diffs = [f"{k} {a} vs {b}" for k, a, b in plan_differences(best.plan, pub.plan)]
    return {"id": case.id, "published_plan": pub.plan.to_text(), "published_fits": pub.fits,
            "published_tokens_per_s": pub.tokens_per_s, "planner_plan": best.plan.to_text(),
            "planner_tokens_per_s": best.tokens_per_s,
            "speedup": best.tokens_per_s / pub.tokens_per_s, "differs_in": diffs,
            "candidates": found.stats.enumerated, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default=str(DEFAULT_PATH))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [compare(c) for c in cases(json.loads(Path(args.path).read_text()))]
    at_least = sum(r["speedup"] >= 1 - 1e-9 for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "at_least_as_fast": at_least}, indent=1))
        return 0
    for r in rows:
        print(f"{r['id']}: planner x{r['speedup']:.3f} ({r['planner_tokens_per_s']:,.0f} vs "
              f"{r['published_tokens_per_s']:,.0f} tokens/s"
              f"{'' if r['published_fits'] else ', published plan does not fit here'}; "
              f"{r['candidates']:,} candidates in {r['wall_s']:.1f} s)\n"
              f"  published {r['published_plan']}\n  planner   {r['planner_plan']}\n"
              f"  differs in: {', '.join(r['differs_in']) or 'nothing'}")
    print(f"\n{at_least} of {len(rows)} rows: planner's best predicted at least as fast")
    return 0 if at_least == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
