"""One validity check for a plan, used by simulate, search, run and export alike."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .cluster import ClusterSpec
from .model import ModelSpec
from .plan import Plan
from .workload import TrainWorkload


@dataclass(frozen=True, kw_only=True)
class Violation:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_plan(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan,
               peak_memory_bytes: float | None = None) -> list[Violation]:
    """Every reason `plan` cannot run `work` on `cluster`, each with its numbers.

    `plan` must be resolved (dp filled in). Pass the predicted `peak_memory_bytes` (from
    the simulator) to include the memory check.
    """
    out: list[Violation] = []

    def bad(field: str, message: str) -> None:
        out.append(Violation(field=field, message=message))

    _check_degrees(model, cluster, work, plan, bad)
    _check_pipeline(model, work, plan, bad)
    _check_experts(model, plan, bad)
    _check_offload(model, plan, bad)
    if work.dtype not in cluster.device.peak_flops_per_s:
        bad("workload.dtype", f"{cluster.device.name} has no {work.dtype} tensor cores "
            f"(supported: {sorted(cluster.device.peak_flops_per_s)})")
    if peak_memory_bytes is not None and peak_memory_bytes > cluster.device.hbm_bytes:
        bad("memory", f"peak {peak_memory_bytes / 1e9:.1f} GB per GPU exceeds the "
            f"{cluster.device.hbm_bytes / 1e9:.1f} GB of {cluster.device.name}")
    return out


def _check_degrees(model, cluster, work, plan, bad) -> None:
    world = plan.world_size
    if world != cluster.n_gpus:
        bad("plan", f"dp({plan.dp}) * tp({plan.tp}) * pp({plan.pp}) * cp({plan.cp}) = "
            f"{world} but the cluster has {cluster.n_gpus} GPUs")
    if model.n_heads % plan.tp:
        bad("plan.tp", f"{model.n_heads} attention heads are not divisible by tp={plan.tp}")
    kv = model.n_kv_heads
    if model.mla is None and kv % plan.tp and plan.tp % kv:
        bad("plan.tp", f"{kv} KV heads neither divide nor are divisible by tp={plan.tp}")
    if work.global_batch % (plan.dp * plan.mbs):
        bad("plan.mbs", f"global batch {work.global_batch} is not divisible by "
            f"dp({plan.dp}) * mbs({plan.mbs}) = {plan.dp * plan.mbs}")
    if plan.cp > 1 and work.seq_len % (2 * plan.cp):
        bad("plan.cp", f"seq_len {work.seq_len} is not divisible by 2*cp = {2 * plan.cp} "
            "(load-balanced causal context parallelism splits it into 2*cp chunks)")
    if plan.etp and plan.tp % plan.etp:
        bad("plan.etp", f"expert tp ({plan.etp}) does not divide tp ({plan.tp})")


def _check_pipeline(model, work, plan, bad) -> None:
    stages = plan.n_stages
    if stages > model.n_layers:
        bad("plan.pp", f"pp({plan.pp}) * vpp({plan.vpp}) = {stages} stages for "
            f"{model.n_layers} layers")
    if plan.stage_layers is not None:
        if len(plan.stage_layers) != stages:
            bad("plan.stage_layers", f"{len(plan.stage_layers)} entries for {stages} stages")
        elif sum(plan.stage_layers) != model.n_layers:
            bad("plan.stage_layers", f"sums to {sum(plan.stage_layers)}, model has "
                f"{model.n_layers} layers")
    if plan.vpp > 1 and plan.schedule != "interleaved":  # zb is ZB-H1: one chunk per rank
        bad("plan.schedule", f"vpp={plan.vpp} needs schedule=interleaved, got {plan.schedule}")
    m = plan.micro_batches(work.global_batch) if plan.dp * plan.mbs else 0
    if plan.schedule == "dualpipe":  # DeepSeek-V3 report §3.2.1; deepseek-ai/DualPipe
        if plan.pp < 2 or plan.pp % 2:
            bad("plan.pp", f"dualpipe needs an even pp >= 2, got {plan.pp}")
        if m % 2 or m < 2 * plan.pp:
            bad("plan.mbs", f"dualpipe needs an even number of micro-batches >= 2*pp = "
                f"{2 * plan.pp}, got {m}")
    if plan.vpp > 1 and m % plan.pp:
        bad("plan.vpp", f"interleaving needs micro-batches ({m}) divisible by pp ({plan.pp})")


def _check_offload(model, plan, bad) -> None:
    if plan.offload != "layers":
        if plan.host_layers is not None:
            bad("plan.host_layers", f"only with offload=layers, got offload={plan.offload}")
        return
    if plan.pp != 1:
        bad("plan.offload", f"offload=layers places units of one pipeline stage; pp={plan.pp}")
    units = model.n_layers + 1  # the layers, then the embedding/head
    outside = sorted(i for i in plan.host_layers or () if not 0 <= i < units)
    if outside:
        bad("plan.host_layers", f"units {outside[:8]} outside 0..{units - 1}")


def _check_experts(model, plan, bad) -> None:
    _check_expert_rows(model, plan, bad)
    if plan.ep == 1:
        return
    if model.moe is None:
        bad("plan.ep", f"ep={plan.ep} but {model.name} has no experts")
        return
    if model.moe.n_experts % plan.ep:
        bad("plan.ep", f"{model.moe.n_experts} experts are not divisible by ep={plan.ep}")
    room = plan.dp * plan.cp * plan.tp // max(plan.etp or plan.tp, 1)
    if room % plan.ep:
        bad("plan.ep", f"ep={plan.ep} does not divide dp*cp*tp/etp = {room}")


def _check_expert_rows(model, plan, bad) -> None:
    """`expert_placement` and `expert_load`: one row for every MoE layer or one per layer."""
    for field, rows in (("plan.expert_placement", plan.expert_placement),
                        ("plan.expert_load", plan.expert_load)):
        if rows is None:
            continue
        if model.moe is None:
            bad(field, f"{model.name} has no experts")
            continue
        for where, message in _row_problems(field, rows, plan.ep, model.moe.n_experts,
                                            model.n_moe_layers):
            bad(where, message)


@functools.lru_cache(maxsize=64)  # a search checks the same rows for every plan of an ep
def _row_problems(field: str, rows: tuple, ep: int, n: int,
                  layers: int) -> tuple[tuple[str, str], ...]:
    out = []
    if len(rows) not in (1, layers):
        out.append((field, f"{len(rows)} rows; expected 1 (all MoE layers) or {layers} (one "
                    "per MoE layer)"))
    check = _slot_problems if field == "plan.expert_placement" else _load_problems
    for i, row in enumerate(rows):
        out += [(f"{field}[{i}]", message) for message in check(row, ep, n)]
    return tuple(out)


def _slot_problems(row: tuple[int, ...], ep: int, n: int) -> list[str]:
    out = []
    if len(row) < n:
        out.append(f"{len(row)} slots for {n} experts")
    elif len(row) % ep:
        out.append(f"{len(row)} slots are not divisible by ep={ep}")
    outside = sorted({e for e in row if not 0 <= e < n})
    missing = sorted(set(range(n)) - set(row))
    if outside:
        out.append(f"expert ids {outside[:8]} outside 0..{n - 1}")
    if missing:
        out.append(f"experts {missing[:8]} have no slot")
    return out


def _load_problems(row: tuple[float, ...], _ep: int, n: int) -> list[str]:
    out = [f"{len(row)} entries for {n} experts"] if len(row) != n else []
    negative = [x for x in row if not x >= 0]
    if negative:
        out.append(f"token counts must be >= 0, got {negative[:4]}")
    return out
