"""`meshplan` command line. Bad input prints one line naming the field and exits 2."""

from __future__ import annotations

import argparse
import json
import sys

from meshplan.api import ENGINES, simulate
from meshplan.core.errors import SpecError
from meshplan.core.plan import Plan
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import cluster_names, load_cluster, load_model, model_names
from meshplan.report import cluster_table, model_table, sim_table

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meshplan", description="LLM parallelism planner")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list catalog models").add_argument("--json", action="store_true")
    sub.add_parser("clusters", help="list catalog clusters").add_argument("--json",
                                                                         action="store_true")
    sim = sub.add_parser("simulate", help="predict one plan")
    sim.add_argument("--model", required=True, help="catalog name, config.json or TOML")
    sim.add_argument("--cluster", required=True, help="catalog name or cluster TOML")
    sim.add_argument("--gpus", type=int, required=True)
    sim.add_argument("--seq-len", type=int, required=True)
    sim.add_argument("--global-batch", type=int, required=True)
    sim.add_argument("--plan", required=True, help='e.g. "tp=8,pp=2,mbs=1,recompute=selective"')
    sim.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8", "fp32"])
    sim.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    sim.add_argument("--engine", default="analytical", choices=list(ENGINES))
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def _simulate(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    cluster = load_cluster(args.cluster, args.gpus)
    work = TrainWorkload(seq_len=args.seq_len, global_batch=args.global_batch,
                         dtype=args.dtype, optimizer=args.optimizer)
    result = simulate(model, cluster, work, Plan.parse(args.plan), engine=args.engine)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(sim_table(model, cluster, work, result))
    if not result.fits:
        print(f"meshplan: error: {'; '.join(result.violations)}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
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
    try:
        if args.command in ("models", "clusters"):
            return _list(args.command, args.json)
        return _simulate(args)
    except SpecError as err:
        print(f"meshplan: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
