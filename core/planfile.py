"""The plan file: a plan with the model, cluster and workload it was made for.

`meshplan search --out plan.json` writes one; `meshplan simulate --plan-file`, `run` and
`export` read it and need nothing else. Pure: dicts in, dicts out (I/O in `meshplan`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .cluster import ClusterSpec
from .errors import SpecError, require
from .loaders import cluster_from_dict, model_from_dict
from .model import ModelSpec
from .plan import Plan
from .workload import TrainWorkload

FORMAT = "meshplan-plan"
VERSION = 1


@dataclass(frozen=True, kw_only=True)
class PlanFile:
    model: ModelSpec
    cluster: ClusterSpec
    work: TrainWorkload
    plan: Plan
    predicted: dict[str, Any] | None = None  # the simulator's result when written


def _plain(obj: Any) -> Any:
    """asdict without the None sub-tables the strict loaders reject."""
    d = dataclasses.asdict(obj)
    return {k: v for k, v in d.items() if v is not None}


def to_dict(pf: PlanFile) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION,
        "model": _plain(pf.model),
        "cluster": _plain(pf.cluster),
        "workload": dataclasses.asdict(pf.work),
        "plan": pf.plan.to_dict(),
        "predicted": pf.predicted,
    }


def from_dict(data: dict[str, Any]) -> PlanFile:
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    require(found == FORMAT, "plan_file", f"not a meshplan plan file (format {found!r})")
    require(data.get("version") == VERSION, "plan_file.version",
            f"this meshplan reads plan files of version {VERSION}, got {data.get('version')}")
    for key in ("model", "cluster", "workload", "plan"):
        require(key in data, "plan_file", f"missing {key!r}")
    try:
        work = TrainWorkload(**data["workload"])
    except TypeError as err:
        raise SpecError("plan_file.workload", str(err)) from None
    return PlanFile(model=model_from_dict(data["model"]),
                    cluster=cluster_from_dict(data["cluster"]), work=work,
                    plan=Plan.from_dict(data["plan"]),
                    predicted=data.get("predicted"))
