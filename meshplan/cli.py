"""`meshplan` command line. Bad input prints one line naming the field and exits 2; a plan
or search with nothing that fits in memory exits 3."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from meshplan.api import ENGINES, search, simulate, simulate_run, whatif
from meshplan.core.errors import SpecError, require
from meshplan.core.plan import Plan, parse_value
from meshplan.core.planfile import PlanFile
from meshplan.core.routing import synthetic_routing
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import (
    cluster_names,
    load_cluster,
    load_model,
    load_plan_file,
    load_profile,
    load_routing,
    model_names,
    read_json,
    save_plan_file,
)
from meshplan.planner.explain import explain
from meshplan.planner.export import TARGETS, export
from meshplan.planner.search import NoFeasiblePlan
from meshplan.planner.space import SearchSpace
from meshplan.report import (
    cluster_table,
    des_table,
    measured_table,
    model_table,
    placement_json,
    placement_table,
    search_table,
    sim_table,
    whatif_table,
)
from meshplan.simulator.des import DesOptions, DesRun
from meshplan.simulator.failures import (
    FailureModel,
    best_interval_steps,
    expected_goodput,
    simulate_goodput,
    young_daly_interval_s,
)
from meshplan.simulator.trace import chrome_trace

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3
EXIT_OVER_BUDGET = 4


def _inputs(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="catalog name, config.json or TOML")
    p.add_argument("--cluster", required=required, help="catalog name or cluster TOML")
    p.add_argument("--gpus", type=int, required=required)
    p.add_argument("--seq-len", type=int, required=required)
    p.add_argument("--global-batch", type=int, required=required)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8", "fp32"])
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--price-per-gpu-hour", type=float, help="overrides the cluster's price")


def _search_args(p: argparse.ArgumentParser) -> None:
    _inputs(p)
    p.add_argument("--objective", default="throughput", choices=["throughput", "cost", "gpus"])
    p.add_argument("--token-budget", type=float, help="tokens to train (objective gpus)")
    p.add_argument("--target-days", type=float, help="time-to-train target (objective gpus)")
    p.add_argument("--space", default="", help='options per key, e.g. "tp=4|8,zero=1|3"')
    p.add_argument("--base", default="", help='fixed plan fields, e.g. "attn=unfused,'
                   'kernels=eager" (the software stack the search does not choose)')
    p.add_argument("--tp-across-nodes", action="store_true")
    p.add_argument("--routing", metavar="TRACE|zipf[:SKEW]",
                   help="MoE routing to place experts for (a trace file, or seeded Zipf); "
                   "each plan is timed on its busiest EP rank under EPLB's placement")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meshplan", description="LLM parallelism planner")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list catalog models").add_argument("--json", action="store_true")
    sub.add_parser("clusters", help="list catalog clusters").add_argument("--json",
                                                                         action="store_true")
    sim = sub.add_parser("simulate", help="predict one plan")
    _inputs(sim, required=False)
    sim.add_argument("--plan", help='e.g. "tp=8,pp=2,mbs=1,recompute=selective"')
    sim.add_argument("--plan-file", help="a plan file from search --out (needs nothing else)")
    sim.add_argument("--engine", default="analytical", choices=list(ENGINES))
    sim.add_argument("--trace", help="write a Chrome/Perfetto trace (engine des)")
    sim.add_argument("--timeline", help="write a timeline PNG (engine des)")
    sim.add_argument("--straggler", action="append", default=[], metavar="RANK:FRACTION",
                     help="what-if: global rank computes FRACTION slower, e.g. 17:0.2 "
                     "(engine des; repeatable)")
    sim.add_argument("--mtbf-hours", type=float,
                     help="what-if: mean time between failures of the whole job; prints the "
                     "expected goodput with checkpoints (needs --checkpoint-s)")
    sim.add_argument("--checkpoint-s", type=float, help="seconds one checkpoint blocks")
    sim.add_argument("--restart-s", type=float, default=0.0,
                     help="seconds from a failure to training again")
    sim.add_argument("--checkpoint-every", type=int,
                     help="steps between checkpoints (default: the Young/Daly optimum)")
    sim.add_argument("--link-scale", action="append", default=[], metavar="TIER=FACTOR",
                     help="what-if: nvlink, nic or pcie bandwidth times FACTOR, e.g. nic=0.5 "
                     "(engine des; repeatable)")
    sim.add_argument("--replica-cluster", action="append", default=[],
                     metavar="REPLICA:CLUSTER",
                     help="what-if, mixed GPU types: data-parallel replica REPLICA runs on "
                     "catalog cluster CLUSTER, e.g. 1:a100-80gb (engine des; repeatable)")
    sim.add_argument("--profile", help="hardware profile from `meshplan profile` (calibrated "
                     "cost model)")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    se = sub.add_parser("search", help="find the best plans")
    _search_args(se)
    se.add_argument("--top", type=int, default=5)
    se.add_argument("--refine", type=int, default=0, metavar="K",
                    help="re-time the best K plans with the event engine and re-rank them")
    se.add_argument("--profile", help="hardware profile from `meshplan profile`")
    se.add_argument("--out", help="write the best plan as a plan file")
    se.add_argument("--json", action="store_true")
    wi = sub.add_parser("whatif", help="sweep knobs and search again")
    _search_args(wi)
    wi.add_argument("--vary", action="append", required=True,
                    help="knob=v1,v2 (gpus, seq_len, global_batch, dtype, model.*, cluster.*, "
                    "workload.*; xK scales), repeatable")
    wi.add_argument("--plot", default="whatif.png", help="bar chart path ('' for none)")
    wi.add_argument("--json", action="store_true")
    _add_profile(sub)
    _add_validate(sub)
    _add_run(sub)
    _add_place(sub)
    ex = sub.add_parser("export", help="write a plan file as another engine's config")
    ex.add_argument("plan_file")
    ex.add_argument("--to", required=True, choices=list(TARGETS))
    ex.add_argument("--out", help="file to write (default: stdout)")
    return ap


def _add_profile(sub) -> None:
    pr = sub.add_parser("profile", help="measure this machine into a hardware profile")
    pr.add_argument("--out", default="hw.json")
    pr.add_argument("--processes", default="2,4", help="process counts for collectives")
    pr.add_argument("--dtypes", default="fp32,bf16")
    pr.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    pr.add_argument("--quick", action="store_true",
                    help="smaller GEMM and message grids, no per-mechanism layer timings "
                         "(about a third of the time; the mechanisms' overheads go unpriced); "
                         "one sweep of the compute tables unless --sweeps says otherwise")
    pr.add_argument("--sweeps", type=int,
                    help="measure the compute tables this many times, the median per row "
                         "(default 3; a shared machine drifts between sweeps)")
    pr.add_argument("--kernel-table", metavar="KERNELS.json",
                    help="merge benchmarks/bench_kernels.py's measured Triton kernels in as "
                    "the elementwise ops")
    pr.add_argument("--links-only", metavar="BASE.json",
                    help="measure only the collectives (and how compute slows beside them), "
                    "taking every other table from BASE.json: the same machine on changed "
                    "or throttled links")


def _add_place(sub) -> None:
    pl = sub.add_parser("place-experts", help="place MoE experts on GPUs (MILP vs EPLB)")
    pl.add_argument("--model", required=True)
    pl.add_argument("--cluster", required=True)
    pl.add_argument("--gpus", type=int, required=True, help="GPUs of one expert-parallel group")
    pl.add_argument("--redundant", type=int, default=0, help="extra expert slots per layer")
    pl.add_argument("--slots-per-gpu", type=int, default=0,
                    help="most experts one GPU holds (default: ceil((experts+redundant)/gpus))")
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="routing trace: .npz or JSON with topk_ids "
                     "[layers, tokens, k], or JSON with expert_tokens [layers, experts]")
    src.add_argument("--synthetic", metavar="zipf[:SKEW]", help="seeded Zipf-skewed routing")
    pl.add_argument("--affinity", type=float, default=0.0,
                    help="synthetic: share of tokens that keep their experts' partners")
    pl.add_argument("--tokens", type=int, default=4096, help="synthetic: tokens per layer")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--time-limit", type=float, default=60.0, help="seconds for the MILPs")
    pl.add_argument("--current", metavar="MAPS.json",
                    help="the placement now in use (an --out file): moves from it cost "
                    "--migration-s each")
    pl.add_argument("--migration-s", type=float, default=0.0,
                    help="seconds one moved expert replica costs (with --current)")
    pl.add_argument("--out", help="write the EPLB-style maps as JSON")
    pl.add_argument("--json", action="store_true")


def _add_validate(sub) -> None:
    va = sub.add_parser("validate", help="run a suite of plans, predict them, report the error")
    va.add_argument("--profile", help="hardware profile (calibrated cost model)")
    va.add_argument("--suite", choices=["full", "short", "overlap"], default="full",
                    help="overlap: plans where overlap decides the step, each DP/FSDP one "
                    "beside itself without overlap (for slow links)")
    va.add_argument("--cases", help="comma-separated case names: run only these")
    va.add_argument("--steps", type=int, default=8)
    va.add_argument("--rounds", type=int, default=1, help="passes over the suite, taking "
                    "turns; each plan keeps its fastest round")
    va.add_argument("--warmup-steps", type=int, default=2)
    va.add_argument("--report", default="validate.md", help="markdown report path")
    va.add_argument("--plot", default="validate.png", help="scatter plot path")
    va.add_argument("--json", action="store_true")
    va.add_argument("--budget", type=float, help="exit 4 when the mean step-time error "
                    "exceeds this fraction")
    va.add_argument("--published", nargs="?", const="", help="compare with published "
                    "records instead (default: shared/validation/published.json)")


def _add_run(sub) -> None:
    rn = sub.add_parser("run", help="execute a plan file with the torch runtime")
    rn.add_argument("plan_file")
    rn.add_argument("--steps", type=int, default=10)
    rn.add_argument("--warmup-steps", type=int, default=2, help="steps left out of timing")
    rn.add_argument("--out", default="measured.json")
    rn.add_argument("--data", help="token file (1-D integer .npy); synthetic when omitted")
    rn.add_argument("--seed", type=int, default=0)
    rn.add_argument("--lr", type=float, default=1e-3)
    rn.add_argument("--seq-len", type=int, help="override the plan file's workload")
    rn.add_argument("--global-batch", type=int, help="override the plan file's workload")
    rn.add_argument("--dtype", choices=["bf16", "fp16", "fp8", "fp32"],
                    help="override the plan file's workload")
    rn.add_argument("--checkpoint-dir")
    rn.add_argument("--checkpoint-every", type=int, default=0)
    rn.add_argument("--resume", action="store_true", help="continue from the newest "
                    "complete checkpoint in --checkpoint-dir (any plan)")
    rn.add_argument("--record-routing", metavar="TRACE.npz",
                    help="write the routers' top-k expert ids (MoE models, pp=1, no "
                    "recompute) for place-experts --trace")
    rn.add_argument("--kernels", choices=["plan", "triton", "torch"], default="plan",
                    help="our Triton kernels (triton) or eager ops (torch); default: the "
                    "plan's kernels=fused runs Triton on CUDA, eager elsewhere")
    rn.add_argument("--kill-during-save", type=int, default=0, help=argparse.SUPPRESS)


def _load(args: argparse.Namespace) -> tuple:
    for name in ("model", "cluster", "gpus", "seq_len", "global_batch"):
        require(getattr(args, name) is not None, name.replace("_", "-"),
                "is required unless --plan-file is given")
    model = load_model(args.model)
    cluster = load_cluster(args.cluster, args.gpus)
    if args.price_per_gpu_hour is not None:
        require(args.price_per_gpu_hour > 0, "price-per-gpu-hour",
                f"must be positive, got {args.price_per_gpu_hour}")
        cluster = dataclasses.replace(cluster, device=dataclasses.replace(
            cluster.device, price_per_gpu_hour=args.price_per_gpu_hour))
    work = TrainWorkload(seq_len=args.seq_len, global_batch=args.global_batch,
                         dtype=args.dtype, optimizer=args.optimizer)
    return model, cluster, work


def _simulate(args: argparse.Namespace) -> int:
    if args.plan_file:
        require(not args.plan, "plan", "give --plan or --plan-file, not both")
        pf = load_plan_file(args.plan_file)
        model, cluster, work, plan = pf.model, pf.cluster, pf.work, pf.plan
    else:
        require(bool(args.plan), "plan", "give --plan or --plan-file")
        model, cluster, work = _load(args)
        plan = Plan.parse(args.plan)
    profile = load_profile(args.profile)
    des_args = bool(args.trace or args.timeline or args.straggler or args.link_scale
                    or args.replica_cluster)
    require(args.engine == "des" or not des_args, "engine", "--trace, --timeline, "
            "--straggler, --link-scale and --replica-cluster need --engine des")
    run = None
    if args.engine == "des":
        run = simulate_run(model, cluster, work, plan, profile, _des_options(args, cluster))
        result = run.result
        _write_des_outputs(args, run)
    else:
        result = simulate(model, cluster, work, plan, profile=profile)
    good = _goodput(args, result.step_time_s)
    if args.json:
        print(json.dumps(result.to_dict() | ({"goodput": good} if good else {}), indent=1))
    else:
        print(sim_table(model, cluster, work, result))
        if run is not None:
            print(des_table(run))
        if good:
            print(f"\ngoodput {good['goodput']:.1%} with a checkpoint every "
                  f"{good['interval_steps']} steps ({good['failures']} failures in "
                  f"{good['horizon_s'] / 3600:,.0f} simulated hours; Young/Daly interval "
                  f"{good['young_daly_interval_s']:.0f} s, first-order expectation "
                  f"{good['expected_goodput']:.1%})")
    if not result.fits:
        print(f"meshplan: error: {'; '.join(result.violations)}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


def _goodput(args: argparse.Namespace, step_s: float) -> dict | None:
    """Expected goodput under failures and checkpoints (simulator/failures.py)."""
    if args.mtbf_hours is None:
        require(args.checkpoint_s is None and args.checkpoint_every is None, "mtbf-hours",
                "--checkpoint-s and --checkpoint-every need --mtbf-hours")
        return None
    require(args.checkpoint_s is not None, "checkpoint-s", "--mtbf-hours needs --checkpoint-s")
    fm = FailureModel(mtbf_s=args.mtbf_hours * 3600, checkpoint_s=args.checkpoint_s,
                      restart_s=args.restart_s)
    every = args.checkpoint_every or best_interval_steps(step_s, fm)
    g = simulate_goodput(step_s, every, fm)
    return dataclasses.asdict(g) | {
        "young_daly_interval_s": young_daly_interval_s(fm),
        "expected_goodput": expected_goodput(fm, every * step_s)}


def _des_options(args: argparse.Namespace, cluster) -> DesOptions:
    stragglers, scale, where = [], [], []
    for item in args.straggler:
        rank, sep, frac = item.partition(":")
        require(bool(sep) and rank.strip().isdigit(), "straggler",
                f"{item!r} is not RANK:FRACTION (e.g. 17:0.2)")
        stragglers.append((int(rank), _number("straggler", frac)))
    for item in args.link_scale:
        tier, sep, factor = item.partition("=")
        require(bool(sep), "link-scale", f"{item!r} is not TIER=FACTOR (e.g. nic=0.5)")
        scale.append((tier.strip(), _number("link-scale", factor)))
    for item in args.replica_cluster:
        idx, sep, name = item.partition(":")
        require(bool(sep) and idx.strip().isdigit() and bool(name.strip()), "replica-cluster",
                f"{item!r} is not REPLICA:CLUSTER (e.g. 1:a100-80gb)")
        where.append((int(idx), load_cluster(name.strip(), cluster.n_gpus)))
    return DesOptions(stragglers=tuple(stragglers), link_scale=tuple(scale),
                      replica_clusters=tuple(where))


def _number(field: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpecError(field, f"{text!r} is not a number") from None


def _write_des_outputs(args: argparse.Namespace, run: DesRun) -> None:
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(chrome_trace(run), f)
        print(f"meshplan: wrote {args.trace} ({len(run.spans)} spans)", file=sys.stderr)
    if args.timeline:
        from meshplan.plots import timeline_plot

        timeline_plot(run, args.timeline)
        print(f"meshplan: wrote {args.timeline}", file=sys.stderr)


_SPACE_INT = ("tp", "pp", "cp", "ep", "etp", "vpp", "mbs", "zero")


def parse_space(text: str, base: str, tp_across_nodes: bool) -> SearchSpace:
    """ "tp=4|8,recompute=none|full" -> SearchSpace(tp=(4, 8), recompute=("none", "full"))."""
    fields: dict[str, object] = {"tp_across_nodes": tp_across_nodes}
    allowed = set(_SPACE_INT) | {"schedule", "recompute", "sp", "offload"}
    for item in filter(None, (s.strip() for s in text.split(","))):
        require("=" in item, "space", f"item {item!r} is not key=v1|v2")
        key, values = (s.strip() for s in item.split("=", 1))
        require(key in allowed, "space", f"unknown key {key!r}; keys: {sorted(allowed)}")
        parsed = tuple(parse_value(key, v) for v in values.split("|"))
        fields[key] = parsed
    if base:
        fields["base"] = Plan.parse(base)
    return SearchSpace(**fields)  # type: ignore[arg-type]


def _progress():
    from tqdm import tqdm

    bar = tqdm(desc="plans", unit=" plans", file=sys.stderr, disable=None, leave=False)
    return bar, bar.update


def _search(args: argparse.Namespace) -> int:
    require(args.top >= 1, "top", f"must be >= 1, got {args.top}")
    model, cluster, work = _load(args)
    space = parse_space(args.space, args.base, args.tp_across_nodes)
    bar, update = _progress()
    start = time.perf_counter()
    try:
        found = search(model, cluster, work, top=args.top, objective=args.objective,
                       space=space, token_budget=args.token_budget,
                       target_days=args.target_days, progress=update,
                       profile=load_profile(args.profile), refine=args.refine,
                       routing=_routing(args.routing, model) if args.routing else None)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    best = found.best
    if args.out:
        used = cluster.with_gpus(best.plan.world_size)
        save_plan_file(args.out, PlanFile(model=model, cluster=used, work=work, plan=best.plan,
                                          predicted=best.to_dict()))
    if args.json:
        print(json.dumps({"plans": [{"plan": r.plan.to_dict(), "predicted": r.to_dict()}
                                    for r in found.ranked],
                          "stats": dataclasses.asdict(found.stats), "wall_s": wall},
                         indent=1))
        return 0
    print(f"{model.name} on {best.plan.world_size}x {cluster.device.name}, seq {work.seq_len}, "
          f"batch {work.global_batch}, {work.dtype}; objective {args.objective}; "
          f"{wall:.1f} s ({found.stats.enumerated / wall:,.0f} plans/s)")
    print(search_table(found, cluster))
    if len(found.ranked) > 1:
        print("\n" + explain(best, found.ranked[1]))
    if args.out:
        print(f"\nbest plan written to {args.out}")
    return 0


def _whatif(args: argparse.Namespace) -> int:
    model, cluster, work = _load(args)
    space = parse_space(args.space, args.base, args.tp_across_nodes)
    vary: dict[str, list[str]] = {}
    for item in args.vary:
        require("=" in item, "vary", f"{item!r} is not knob=v1,v2")
        key, values = item.split("=", 1)
        vary[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    rows = whatif(model, cluster, work, vary, objective=args.objective, space=space,
                  token_budget=args.token_budget, target_days=args.target_days)
    if args.plot:
        from meshplan.plots import whatif_plot

        whatif_plot(rows, args.plot)
    if args.json:
        print(json.dumps([{"knobs": r.knobs, "error": r.error,
                           "best": r.result.best.to_dict() if r.result else None}
                          for r in rows], indent=1))
    else:
        print(whatif_table(rows))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def _export(args: argparse.Namespace) -> int:
    pf = load_plan_file(args.plan_file)
    text = export(pf.model, pf.work, pf.plan.resolve(pf.cluster.n_gpus), args.to)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


def _place(args: argparse.Namespace) -> int:
    from meshplan.planner.placement import (
        Placement,
        PlacementProblem,
        optimise_placement,
        token_costs_s,
    )

    model, cluster = load_model(args.model), load_cluster(args.cluster, args.gpus)
    require(model.moe is not None, "model", f"{model.name} has no experts to place")
    assert model.moe is not None
    routing = _routing(args.trace or args.synthetic, model, args.tokens, args.affinity,
                       args.seed)
    compute_s, nic_s = token_costs_s(model, cluster)
    current = None
    if args.current:
        maps = read_json(args.current, "current")
        require("physical_to_logical" in maps, "current", f"{args.current} has no "
                "physical_to_logical map")
        current = Placement.from_maps(maps["physical_to_logical"], cluster.n_gpus)
    problem = PlacementProblem(routing=routing, n_gpus=cluster.n_gpus,
                               gpus_per_node=min(cluster.node.gpus_per_node, cluster.n_gpus),
                               redundant=args.redundant, slots_per_gpu=args.slots_per_gpu,
                               compute_s_per_token=compute_s, nic_s_per_token=nic_s,
                               current=current, migration_s_per_expert=args.migration_s)
    result = optimise_placement(problem, args.time_limit)
    maps = result.placement.maps(routing.n_experts)
    if args.out:
        Path(args.out).write_text(json.dumps(maps) + "\n")
    if args.json:
        print(json.dumps(placement_json(result) | {"maps": maps}))
    else:
        print(f"{model.name}: {routing.n_layers} MoE layers of {routing.n_experts} experts on "
              f"{cluster.n_gpus} GPUs, {args.redundant} redundant slots ({routing.source})")
        print(placement_table(result))
    return 0


def _routing(source: str, model, tokens: int = 4096, affinity: float = 0.0, seed: int = 0):
    """A routing trace file, or `zipf[:SKEW]` for a seeded synthetic one."""
    require(model.moe is not None, "model", f"{model.name} has no experts to place")
    kind, _, skew = source.partition(":")
    if kind != "zipf":
        return load_routing(source, model.moe.n_experts)
    return synthetic_routing(n_layers=model.n_moe_layers, n_experts=model.moe.n_experts,
                             top_k=model.moe.top_k, tokens=tokens,
                             skew=_float(skew or "1", "routing"), affinity=affinity, seed=seed)


def _float(text: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpecError(field, f"{text!r} is not a number") from None


def _need_torch(command: str) -> None:
    import importlib.util

    require(importlib.util.find_spec("torch") is not None, command,
            f"`meshplan {command}` needs torch: pip install -e '.[runtime]' "
            "(or torch==2.13.0)")


def _int_list(text: str, field: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SpecError(field, f"expected integers separated by commas, got {text!r}") from None


def _profile(args: argparse.Namespace) -> int:
    _need_torch("profile")
    import torch

    from meshplan.validate import profile as bench

    procs = _int_list(args.processes, "processes")
    require(all(p >= 2 for p in procs), "processes", f"need >= 2 processes, got {procs}")
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    bad = [d for d in dtypes if d not in ("fp32", "bf16", "fp16")]
    require(not bad, "dtypes", f"{bad} not in fp32, bf16, fp16")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    require(device == "cpu" or torch.cuda.is_available(), "device", "no CUDA device here")
    table = read_json(args.kernel_table, "kernel_table") if args.kernel_table else None
    start = time.perf_counter()
    options = dict(bench.QUICK) if args.quick else {}
    if args.sweeps is not None:
        require(args.sweeps >= 1, "sweeps", f"must be at least 1, got {args.sweeps}")
        options["sweeps"] = args.sweeps
    opts = bench.ProfileOptions(device=device, processes=procs, dtypes=dtypes, **options)

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    if args.links_only:
        base = read_json(args.links_only, "links_only")
        found = base.get("device") if isinstance(base, dict) else None
        require(found == device, "links_only",
                f"{args.links_only} profiles device {found!r}, this run measures {device!r}")
        prof = bench.relink(base, opts, say)
    else:
        prof = bench.measure(opts, say=say)
    if table is not None:
        prof = bench.merge_kernel_table(prof, table)
    Path(args.out).write_text(json.dumps(prof, indent=1))
    for key, value in prof["peaks"].items():
        print(f"{key:32s} {value:.4g}")
    for n, fits in prof["collectives"].items():
        for op, (alpha, beta) in fits.items():
            print(f"{op:14s} x{n}: alpha {alpha * 1e6:8.1f} us, bus bandwidth "
                  f"{1 / beta / 1e9 if beta else float('inf'):.3g} GB/s")
    print(f"shared compute slowdown: {prof['concurrency']}")
    shares = {n: round(v, 3) for n, v in prof.get("comm_core_share", {}).items()}
    print(f"cores a communicating process keeps busy: {shares}")
    if prof.get("scheduler_slice_s"):
        print(f"scheduler time slice: {prof['scheduler_slice_s'] * 1e3:.2f} ms")
    print(f"profile written to {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def _validate(args: argparse.Namespace) -> int:
    if args.published is not None:
        from meshplan.validate import published
        return published.main(([args.published] if args.published else [])
                              + (["--json"] if args.json else []))
    require(args.steps > args.warmup_steps >= 0, "warmup_steps",
            f"need 0 <= warmup ({args.warmup_steps}) < steps ({args.steps})")
    _need_torch("validate")
    from meshplan.validate import compare, report, suite

    cases = suite.select(suite.SUITES[args.suite], args.cases)
    profile = load_profile(args.profile)
    results = suite.validate(cases, profile, steps=args.steps, warmup=args.warmup_steps,
                             rounds=args.rounds)
    rows = [row for _, row, _ in results]
    summ = compare.summary(rows)
    plans = [c.plan for c, _, _ in results]
    title = f"meshplan validate ({'calibrated' if profile else 'nominal'} cost model)"
    Path(args.report).write_text(report.markdown(rows, plans, summ, title))
    report.scatter(rows, args.plot)
    if args.json:
        print(json.dumps({"plans": [dataclasses.asdict(r) | {
            "plan": c.plan, "step_error": r.step_error, "memory_error": r.memory_error,
            "round_step_times_s": m["round_step_times_s"]} for c, r, m in results], **summ},
            indent=1))
    else:
        print(report.markdown(rows, plans, summ, title))
        print(f"report: {args.report}, plot: {args.plot}")
    if args.budget is not None and summ["step_time_mape"] > args.budget:
        print(f"meshplan: error: mean step-time error {summ['step_time_mape']:.1%} exceeds "
              f"the budget {args.budget:.1%}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    return 0


def _run(args: argparse.Namespace) -> int:
    import tempfile

    from meshplan.runtime import launch
    from meshplan.runtime.support import kernels_on

    _need_torch("run")
    for name in ("steps", "checkpoint_every"):
        require(getattr(args, name) >= 0, name, f"must be >= 0, got {getattr(args, name)}")
    require(args.steps > args.warmup_steps >= 0, "warmup_steps",
            f"need 0 <= warmup ({args.warmup_steps}) < steps ({args.steps})")
    pf = launch.override(load_plan_file(args.plan_file), args.seq_len, args.global_batch,
                         args.dtype)
    import torch

    launch.check_runnable(pf, torch.cuda.device_count())
    kernels_on(pf.plan, launch.device_of(pf), args.kernels)  # refuses an impossible --kernels
    if args.record_routing:
        plan = pf.plan
        require(pf.model.moe is not None, "record_routing", f"{pf.model.name} has no router")
        require(plan.pp == 1 and plan.recompute == "none", "record_routing",
                f"needs pp=1 and recompute=none (got pp={plan.pp}, recompute="
                f"{plan.recompute}): every rank must route the same tokens through every "
                "MoE layer once")
    worker = ["--out", args.out, "--steps", str(args.steps),
              "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed),
              "--lr", str(args.lr), "--checkpoint-every", str(args.checkpoint_every),
              "--kernels", args.kernels]
    worker += ["--kill-during-save", str(args.kill_during_save)] if args.kill_during_save else []
    worker += ["--data", args.data] if args.data else []
    worker += ["--checkpoint-dir", args.checkpoint_dir] if args.checkpoint_dir else []
    worker += ["--resume"] if args.resume else []
    worker += ["--record-routing", str(Path(args.record_routing).resolve())] \
        if args.record_routing else []
    if pf.cluster.n_nodes > 1:
        path = str(Path(args.out).with_suffix(".plan.json"))
        save_plan_file(path, pf)
        job = launch.plan_launch(pf, ["--plan-file", path, *worker])
        print(f"{job.nnodes} nodes: copy {path} to every node and start on each "
              "(MASTER_HOST: the address of node 0):")
        for node in range(job.nnodes):
            print(" ".join(job.command(node, "MASTER_HOST:29500")))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/plan.json"
        save_plan_file(path, pf)
        code = launch.start(launch.plan_launch(pf, ["--plan-file", path, *worker]))
    if code:
        print(f"meshplan: error: the run failed (torchrun exit {code})", file=sys.stderr)
        return code
    print(measured_table(json.loads(Path(args.out).read_text())))
    print(f"\nmeasured JSON written to {args.out}")
    return 0


def _list(kind: str, as_json: bool) -> int:
    if kind == "models":
        specs = [load_model(n) for n in model_names()]
        print(json.dumps([s.name for s in specs]) if as_json else model_table(specs))
    else:
        specs = [load_cluster(n) for n in cluster_names()]
        print(json.dumps([s.name for s in specs]) if as_json else cluster_table(specs))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"simulate": _simulate, "search": _search, "whatif": _whatif,
                "export": _export, "run": _run, "profile": _profile,
                "validate": _validate, "place-experts": _place}
    try:
        if args.command in ("models", "clusters"):
            return _list(args.command, args.json)
        return commands[args.command](args)
    except NoFeasiblePlan as err:
        print(f"meshplan: error: {err}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except SpecError as err:
        print(f"meshplan: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
