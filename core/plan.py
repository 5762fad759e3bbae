"""How training is parallelised: the one object every stage of meshplan passes on.

`Plan.parse("tp=8,pp=4,mbs=1,recompute=selective,zero=1")` reads the compact form; omitted
degrees are 1 and `dp` is whatever is left of the GPUs (`resolve`). `to_json`/`from_json`
round-trip the complete plan, including the per-stage layer split.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import SpecError, require

if TYPE_CHECKING:
    from .model import ModelSpec

Schedule = Literal["gpipe", "1f1b", "interleaved", "zb", "dualpipe"]
Recompute = Literal["none", "selective", "op", "full"]
Offload = Literal["none", "optimizer", "layers"]
Attention = Literal["flash", "unfused"]
Kernels = Literal["fused", "eager"]

PLAN_VERSION = 1
_INT_KEYS = ("dp", "tp", "pp", "cp", "ep", "etp", "vpp", "mbs", "zero")
_FLOAT_KEYS = ("bucket_mb",)
_ON_OFF = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
_CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": ("gpipe", "1f1b", "interleaved", "zb", "dualpipe"),
    "recompute": ("none", "selective", "op", "full"),
    "offload": ("none", "optimizer", "layers"),
    "attn": ("flash", "unfused"),
    "kernels": ("fused", "eager"),
}
_BOOL_KEYS = ("sp", "tp_overlap", "dp_overlap")


@dataclass(frozen=True, kw_only=True)
class Plan:
    dp: int = 0  # 0: derive from the GPU count
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 0  # expert tensor parallelism; 0: same as tp
    vpp: int = 1  # virtual pipeline stages (model chunks) per rank
    mbs: int = 1  # micro-batch size, sequences
    schedule: Schedule = "1f1b"
    recompute: Recompute = "none"
    zero: int = 0  # 0: DDP, 1: optimizer states, 2: + gradients, 3: + parameters (FSDP)
    sp: bool = False  # Megatron sequence parallelism inside the TP group
    tp_overlap: bool = False  # TP collectives overlapped with GEMMs (Megatron/async TP)
    dp_overlap: bool = True  # DP/FSDP collectives overlapped with backward/forward
    bucket_mb: float = 25.0  # MiB per gradient all-reduce bucket without ZeRO (DDP's bucket_cap_mb)
    offload: Offload = "none"
    attn: Attention = "flash"
    kernels: Kernels = "fused"  # fused elementwise kernels (Megatron/TE, torch.compile) or eager
    stage_layers: tuple[int, ...] | None = None  # transformer layers per virtual stage
    # Physical expert slot -> logical expert, one row for every MoE layer or one row per MoE
    # layer (EPLB's phy2log map). Slot j lives on EP rank j // (slots / ep). None: expert e
    # in slot e.
    expert_placement: tuple[tuple[int, ...], ...] | None = None
    # Tokens routed to each logical expert, one row for all MoE layers or one per MoE
    # layer (any scale: only shares matter), from the routing the placement was made for.
    # With it the simulators time each layer's busiest EP rank. None: even routing.
    expert_load: tuple[tuple[float, ...], ...] | None = None
    # offload=layers: the units (transformer layers in order, then the embedding/head)
    # whose weights, gradients and optimizer states live on the host, updated there
    # (FSDP2's CPU offload of those blocks); from the offloading LP (`planner.offload`).
    host_layers: tuple[int, ...] | None = None
    version: int = PLAN_VERSION

    # ---- compact text form ----------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Plan:
        fields: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            require("=" in item, "plan", f"item {item!r} is not key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            fields[key] = parse_value(key, value)
        if fields.get("vpp", 1) > 1 and "schedule" not in fields:
            fields["schedule"] = "interleaved"
        return cls(**fields)

    def to_text(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in _INT_KEYS if k == "dp" or
                 getattr(self, k) != getattr(Plan, k)]
        for key in ("schedule", "recompute", "offload", "attn", "kernels"):
            if getattr(self, key) != getattr(Plan, key):
                parts.append(f"{key}={getattr(self, key)}")
        for key in _BOOL_KEYS:
            if getattr(self, key) != getattr(Plan, key):
                parts.append(f"{key}={'on' if getattr(self, key) else 'off'}")
        for key in _FLOAT_KEYS:
            if getattr(self, key) != getattr(Plan, key):
                parts.append(f"{key}={getattr(self, key):g}")
        if self.stage_layers:
            parts.append("stage_layers=" + ":".join(str(n) for n in self.stage_layers))
        return ",".join(parts)

    # ---- JSON -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stage_layers"] = list(self.stage_layers) if self.stage_layers else None
        d["host_layers"] = list(self.host_layers) if self.host_layers is not None else None
        if self.expert_placement is not None:
            d["expert_placement"] = [list(row) for row in self.expert_placement]
        if self.expert_load is not None:
            d["expert_load"] = [list(row) for row in self.expert_load]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        require(not unknown, "plan", f"unknown keys {unknown}")
        require(data.get("version", PLAN_VERSION) == PLAN_VERSION, "plan.version",
                f"this meshplan reads plan version {PLAN_VERSION}, got {data.get('version')}")
        data = dict(data)
        for key in ("stage_layers", "host_layers"):
            if data.get(key) is not None:
                data[key] = tuple(int(x) for x in data[key])
        if data.get("expert_placement") is not None:
            data["expert_placement"] = _placement(data["expert_placement"])
        if data.get("expert_load") is not None:
            data["expert_load"] = _rows(data["expert_load"], "plan.expert_load", float)
        for key in _INT_KEYS + _FLOAT_KEYS:
            if key in data:
                data[key] = parse_value(key, str(data[key]))
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # ---- derived ------------------------------------------------------------
    @property
    def bucket_bytes(self) -> int:
        """`bucket_mb` in bytes."""
        return round(self.bucket_mb * 2**20)

    def resolve(self, n_gpus: int) -> Plan:
        """Fill in dp from the GPU count, and the expert TP default."""
        other = self.tp * self.pp * self.cp
        if self.dp == 0:
            require(n_gpus % other == 0, "plan",
                    f"tp({self.tp}) * pp({self.pp}) * cp({self.cp}) = {other} "
                    f"does not divide {n_gpus} GPUs")
            dp = n_gpus // other
        else:
            dp = self.dp
        return dataclasses.replace(self, dp=dp, etp=self.etp or self.tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def n_stages(self) -> int:
        return self.pp * self.vpp

    def micro_batches(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.mbs)


def _placement(rows: Any) -> tuple[tuple[int, ...], ...]:
    return _rows(rows, "plan.expert_placement", int)


def _rows(rows: Any, field: str, kind: type) -> tuple[tuple[Any, ...], ...]:
    ok = isinstance(rows, list | tuple) and all(isinstance(r, list | tuple) for r in rows)
    require(ok and len(rows) > 0, field, "expected a list of rows, one for all MoE layers "
            f"or one per MoE layer; got {str(rows)[:60]}")
    try:
        return tuple(tuple(kind(x) for x in row) for row in rows)
    except (TypeError, ValueError):
        raise SpecError(field, f"entries must be {kind.__name__}s") from None


def parse_value(key: str, value: str) -> Any:
    if key in _INT_KEYS:
        try:
            n = int(value)
        except ValueError:
            raise SpecError(f"plan.{key}", f"expected an integer, got {value!r}") from None
        low = 0 if key in ("dp", "zero", "etp") else 1
        require(n >= low, f"plan.{key}", f"must be >= {low}, got {n}")
        if key == "zero":
            require(n <= 3, "plan.zero", f"ZeRO stage must be 0..3, got {n}")
        return n
    if key in _FLOAT_KEYS:
        try:
            x = float(value)
        except ValueError:
            raise SpecError(f"plan.{key}", f"expected a number, got {value!r}") from None
        require(math.isfinite(x) and x > 0, f"plan.{key}", f"must be > 0, got {value}")
        return x
    if key in _CHOICES:
        require(value in _CHOICES[key], f"plan.{key}",
                f"{value!r} is not one of {list(_CHOICES[key])}")
        return value
    if key in _BOOL_KEYS:
        require(value.lower() in _ON_OFF, f"plan.{key}", f"expected on/off, got {value!r}")
        return _ON_OFF[value.lower()]
    if key == "stage_layers":
        return tuple(int(x) for x in value.split(":"))
    known = [*_INT_KEYS, *_FLOAT_KEYS, *_CHOICES, *_BOOL_KEYS, "stage_layers"]
    raise SpecError("plan", f"unknown key {key!r}; known keys: {', '.join(known)}")


def default_stage_layers(n_layers: int, n_stages: int) -> tuple[int, ...]:
    """As even as possible; spare layers go to the middle stages, away from the
    embedding (first stage) and the LM head (last stage)."""
    base, extra = divmod(n_layers, n_stages)
    counts = [base] * n_stages
    middle = list(range(1, n_stages - 1)) or list(range(n_stages))
    for i in range(extra):
        counts[middle[i % len(middle)]] += 1
    return tuple(counts)


def layer_split(model: ModelSpec, plan: Plan) -> tuple[int, ...]:
    """Transformer layers per virtual stage: the plan's own split, else the default."""
    return plan.stage_layers or default_stage_layers(model.n_layers, plan.n_stages)


def rank_blocks(plan: Plan, rank: int, n_blocks: int) -> tuple[int, ...]:
    """Indices into the layer split that a pipeline rank holds: every pp-th from its own
    (Megatron's interleaved placement, Narayanan et al. 2021 §2.2.2), or under DualPipe the
    blocks of both directions, `rank` and `pp − 1 − rank` (DeepSeek-V3 report §3.2.1)."""
    if plan.schedule == "dualpipe":
        return (rank, plan.pp - 1 - rank)
    return tuple(range(rank, n_blocks, plan.pp))


def ep_rank_imbalance(plan: Plan, n_experts: int, n_moe_layers: int) -> tuple[float, ...]:
    """Per MoE layer, the busiest EP rank's routed tokens over the mean rank's, from the
    plan's expert loads and placement (slot j on EP rank j // (slots / ep); an expert's
    tokens split evenly over its replicas, as EPLB routes them). 1.0 everywhere without
    loads."""
    if plan.expert_load is None or plan.ep == 1:
        return (1.0,) * n_moe_layers
    return _imbalance(plan.expert_load, plan.expert_placement, plan.ep, n_experts,
                      n_moe_layers)


@functools.lru_cache(maxsize=64)  # a search asks again for every plan of the same ep
def _imbalance(loads: tuple[tuple[float, ...], ...],
               placement: tuple[tuple[int, ...], ...] | None, ep: int, n_experts: int,
               n_moe_layers: int) -> tuple[float, ...]:
    out = []
    for layer in range(n_moe_layers):
        load = loads[layer if len(loads) > 1 else 0]
        slots = (placement[layer if len(placement) > 1 else 0]
                 if placement is not None else tuple(range(n_experts)))
        replicas = [0] * n_experts
        for e in slots:
            replicas[e] += 1
        per_rank = len(slots) // ep
        ranks = [sum(load[e] / replicas[e] for e in slots[r * per_rank:(r + 1) * per_rank])
                 for r in range(ep)]
        mean = sum(ranks) / ep
        out.append(max(ranks) / mean if mean > 0 else 1.0)
    return tuple(out)
