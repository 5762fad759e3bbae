"""What-if sweeps: change cluster, model or workload knobs and search again.

A knob is `gpus`, `seq_len`, `global_batch`, `dtype`, or a dotted field of the specs:
`cluster.node.nic_bw_bytes_per_s`, `cluster.device.hbm_bytes`, `model.n_layers`,
`workload.optimizer`. Values are literals ("400e9", "fp8") or factors of the current value
("x2", "x0.5"). Several knobs sweep their Cartesian product.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError, require
from meshplan.core.model import ModelSpec
from meshplan.core.workload import TrainWorkload

from .search import Objective, SearchResult, search, search_fewest_gpus
from .space import SearchSpace

ALIASES = {"gpus": "cluster.n_gpus", "seq_len": "workload.seq_len",
           "global_batch": "workload.global_batch", "dtype": "workload.dtype"}


@dataclass(frozen=True, kw_only=True)
class Inputs:
    model: ModelSpec
    cluster: ClusterSpec
    work: TrainWorkload


@dataclass(frozen=True, kw_only=True)
class WhatIfRow:
    knobs: dict[str, str]
    result: SearchResult | None
    error: str = ""  # why this variant has no plan


def _convert(old: Any, text: str, key: str) -> Any:
    if text.startswith("x"):
        require(isinstance(old, int | float) and not isinstance(old, bool), key,
                f"factor {text!r} needs a numeric field, {key} is {old!r}")
        try:
            value = old * float(text[1:])
        except ValueError:
            raise SpecError(key, f"bad factor {text!r}") from None
        return round(value) if isinstance(old, int) else value
    if isinstance(old, bool):
        require(text.lower() in ("true", "false", "on", "off"), key,
                f"expected a bool, got {text!r}")
        return text.lower() in ("true", "on")
    if isinstance(old, int | float):
        try:
            number = float(text)
        except ValueError:
            raise SpecError(key, f"expected a number, got {text!r}") from None
        if isinstance(old, int):
            require(number == int(number), key, f"expected an integer, got {text!r}")
            return int(number)
        return number
    return text


def _set(obj: Any, path: list[str], text: str, key: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    require(path[0] in names, key, f"{type(obj).__name__} has no field {path[0]!r}; "
            f"fields: {sorted(names)}")
    old = getattr(obj, path[0])
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: _convert(old, text, key)})
    require(dataclasses.is_dataclass(old), key, f"{path[0]} has no sub-fields")
    return dataclasses.replace(obj, **{path[0]: _set(old, path[1:], text, key)})


def apply_knob(inputs: Inputs, key: str, text: str) -> Inputs:
    full = ALIASES.get(key, key)
    head, *rest = full.split(".")
    target = {"model": "model", "cluster": "cluster", "workload": "work"}.get(head)
    require(target is not None and bool(rest), f"vary.{key}",
            f"knobs are {sorted(ALIASES)} or model./cluster./workload.<field>")
    if full == "cluster.n_gpus":
        return dataclasses.replace(inputs, cluster=inputs.cluster.with_gpus(
            _convert(inputs.cluster.n_gpus, text, key)))
    changed = _set(getattr(inputs, target), rest, text, f"vary.{key}")
    if target == "cluster":
        changed.check()
    return dataclasses.replace(inputs, **{target: changed})


def whatif(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload,
           vary: dict[str, list[str]], space: SearchSpace | None = None,
           objective: Objective | None = None, top: int = 1) -> list[WhatIfRow]:
    """Search every combination of the knobs' values; a variant with no plan keeps why."""
    require(bool(vary), "vary", "give at least one knob, e.g. gpus=1024,2048")
    objective = objective or Objective()
    rows = []
    base = Inputs(model=model, cluster=cluster, work=work)
    keys = list(vary)
    for values in itertools.product(*(vary[k] for k in keys)):
        knobs = dict(zip(keys, values, strict=True))
        inputs = base
        for k, v in knobs.items():  # a bad knob or value is bad input: raise
            inputs = apply_knob(inputs, k, v)
        try:
            if objective.kind == "gpus":
                found = search_fewest_gpus(inputs.model, inputs.cluster, inputs.work,
                                           objective, space, top)
            else:
                found = search(inputs.model, inputs.cluster, inputs.work, space, objective, top)
            rows.append(WhatIfRow(knobs=knobs, result=found))
        except SpecError as err:  # this variant has no plan (memory, divisibility)
            rows.append(WhatIfRow(knobs=knobs, result=None, error=str(err)))
    return rows
