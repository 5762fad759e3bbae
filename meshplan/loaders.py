"""I/O edge: read models and clusters from the packaged catalog or from files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from meshplan.core import planfile
from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError
from meshplan.core.loaders import cluster_from_toml, model_from_hf_config, model_from_toml
from meshplan.core.model import ModelSpec
from meshplan.core.planfile import PlanFile
from meshplan.core.routing import RoutingStats, routing_from_topk
from meshplan.costmodels.calibrated import HardwareProfile, profile_from_dict

_CATALOG = resources.files("meshplan.core") / "catalog"


def _names(kind: str) -> list[str]:
    return sorted(p.name[:-5] for p in (_CATALOG / kind).iterdir() if p.name.endswith(".toml"))


def model_names() -> list[str]:
    return _names("models")


def cluster_names() -> list[str]:
    return _names("clusters")


def load_model(ref: str) -> ModelSpec:
    """A catalog name, a Hugging Face config.json, or a model TOML file."""
    if ref in model_names():
        return model_from_toml((_CATALOG / "models" / f"{ref}.toml").read_text(), ref)
    path = Path(ref)
    if not path.is_file():
        raise SpecError("model", f"{ref!r} is neither a catalog model ({', '.join(model_names())})"
                        " nor a file")
    if path.suffix == ".json":
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError("model", f"{path} is not valid JSON: {err}") from None
        name = path.parent.name if path.name == "config.json" else path.stem
        return model_from_hf_config(cfg, name)
    return model_from_toml(path.read_text(), path.stem)


def load_cluster(ref: str, gpus: int | None = None) -> ClusterSpec:
    """A catalog GPU/system name or a cluster TOML file, sized to `gpus` GPUs."""
    if ref in cluster_names():
        cluster = cluster_from_toml((_CATALOG / "clusters" / f"{ref}.toml").read_text(), ref)
    else:
        path = Path(ref)
        if not path.is_file():
            raise SpecError("cluster", f"{ref!r} is neither a catalog cluster "
                            f"({', '.join(cluster_names())}) nor a file")
        cluster = cluster_from_toml(path.read_text(), path.stem)
    return cluster.with_gpus(gpus) if gpus else cluster


def load_plan_file(path: str) -> PlanFile:
    p = Path(path)
    if not p.is_file():
        raise SpecError("plan_file", f"{path!r} is not a file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise SpecError("plan_file", f"{path} is not valid JSON: {err}") from None
    return planfile.from_dict(data)


def save_plan_file(path: str, pf: PlanFile) -> None:
    Path(path).write_text(json.dumps(planfile.to_dict(pf), indent=1) + "\n")


def read_json(path: str, field: str):
    """A JSON file's content; an unreadable file is a SpecError naming `field`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(field, f"cannot read {path}: {err}") from None


def load_profile(path: str | None) -> HardwareProfile | None:
    """A hardware profile written by `meshplan profile` (None passes through)."""
    if path is None:
        return None
    return profile_from_dict(read_json(path, "profile"))


def load_routing(path: str, n_experts: int) -> RoutingStats:
    """A routing trace: `.npz` with `topk_ids` [MoE layers, tokens, top_k] (what the
    runtime's router records), or JSON with `topk_ids`, or with `expert_tokens`
    [layers, experts] and optionally `pair_tokens` [layers - 1, experts, experts]."""
    p = Path(path)
    if not p.is_file():
        raise SpecError("routing", f"{path!r} is not a file")
    try:
        if p.suffix == ".npz":
            with np.load(p) as f:
                data = {k: f[k] for k in f.files}
        else:
            data = {k: np.asarray(v) for k, v in json.loads(p.read_text()).items()}
    except (OSError, ValueError) as err:
        raise SpecError("routing", f"cannot read {path}: {err}") from None
    if "topk_ids" in data:
        return routing_from_topk(data["topk_ids"], n_experts, source=str(path))
    if "expert_tokens" not in data:
        raise SpecError("routing", f"{path} has neither topk_ids nor expert_tokens "
                        f"(keys: {sorted(data)})")
    loads = np.asarray(data["expert_tokens"], dtype=float)
    if loads.ndim != 2 or loads.shape[1] != n_experts:
        raise SpecError("routing.expert_tokens", f"needs shape [layers, {n_experts}], got "
                        f"{list(loads.shape)}")
    pairs = data.get("pair_tokens")
    return RoutingStats(expert_tokens=loads, source=str(path),
                        pair_tokens=None if pairs is None else np.asarray(pairs, dtype=float))
