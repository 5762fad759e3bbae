"""Pipeline schedule IR: per-rank ordered action lists that the simulator and runtime execute.

A stage is a *virtual* stage: with `p` ranks and `v` model chunks per rank there are `p·v`
stages and stage `s` lives on rank `s % p` (Megatron's interleaved placement, Narayanan et al.
2021 §2.2.2). Text form of one action: `{stage}{KIND}{microbatch}`, e.g. `0F3` (forward of
micro-batch 3 on stage 0), `5B0`, `2SF1` (stage 2 sends micro-batch 1's activation on),
`3RB1` (stage 3 receives a gradient); `RG` and `OPT` close a step (gradient reduction and
optimizer step). Nothing here is engine-specific.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import require

Kind = Literal["F", "B", "W", "SF", "RF", "SB", "RB", "RG", "OPT"]
COMPUTE: frozenset[str] = frozenset({"F", "B", "W"})
_TOKEN = re.compile(r"^(\d+)(F|B|W|SF|RF|SB|RB)(\d+)$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Action:
    kind: Kind
    stage: int = -1  # virtual stage; -1 for RG/OPT
    microbatch: int = -1

    def __str__(self) -> str:
        if self.kind in ("RG", "OPT"):
            return self.kind
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, token: str) -> Action:
        if token in ("RG", "OPT"):
            return cls(kind=token)  # type: ignore[arg-type]
        m = _TOKEN.match(token)
        require(m is not None, "schedule", f"cannot parse action {token!r}")
        assert m is not None
        return cls(kind=m.group(2), stage=int(m.group(1)), microbatch=int(m.group(3)))  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class PipelineSchedule:
    name: str
    n_ranks: int  # pipeline ranks (pp)
    n_chunks: int  # model chunks per rank (vpp)
    n_microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # per rank, in execution order

    @property
    def n_stages(self) -> int:
        return self.n_ranks * self.n_chunks

    def rank_of(self, stage: int) -> int:
        return stage % self.n_ranks

    def text(self, rank: int, compute_only: bool = False) -> str:
        acts = self.actions[rank]
        if compute_only:
            acts = tuple(a for a in acts if a.kind in COMPUTE)
        return " ".join(str(a) for a in acts)

    @classmethod
    def from_text(cls, name: str, n_chunks: int, n_microbatches: int,
                  lines: Sequence[str]) -> PipelineSchedule:
        actions = tuple(tuple(Action.parse(t) for t in line.split()) for line in lines)
        return cls(name=name, n_ranks=len(lines), n_chunks=n_chunks,
                   n_microbatches=n_microbatches, actions=actions)


# ---- generators -----------------------------------------------------------------

def build_schedule(name: str, pp: int, n_microbatches: int, vpp: int = 1) -> PipelineSchedule:
    require(pp >= 1 and n_microbatches >= 1, "plan", f"pp={pp}, microbatches={n_microbatches}")
    if name == "gpipe":
        order = [_gpipe_order(n_microbatches) for _ in range(pp)]
        vpp = 1
    elif name == "1f1b" or (name == "interleaved" and vpp == 1):
        order = [_one_f_one_b_order(pp, r, n_microbatches) for r in range(pp)]
        vpp = 1
    elif name == "interleaved":
        require(n_microbatches % pp == 0, "plan.mbs",
                f"the interleaved schedule needs micro-batches ({n_microbatches}) "
                f"divisible by pp ({pp})")
        order = [_interleaved_order(pp, vpp, r, n_microbatches) for r in range(pp)]
    elif name == "zb":
        order = _zb_h1_orders(pp, n_microbatches)
        vpp = 1
    else:
        raise ValueError(f"schedule {name!r} is not in the IR yet (gpipe, 1f1b, interleaved, zb)")
    actions = tuple(_with_comm(rank_order, pp, vpp, r) for r, rank_order in enumerate(order))
    return PipelineSchedule(name=name, n_ranks=pp, n_chunks=vpp,
                            n_microbatches=n_microbatches, actions=actions)


# Compute order per rank as (kind, chunk, microbatch).
Step = tuple[str, int, int]


def _gpipe_order(m: int) -> list[Step]:
    return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]


def _one_f_one_b_order(p: int, rank: int, m: int) -> list[Step]:
    """PipeDream-Flush 1F1B (Narayanan et al. 2021 §2.2.1)."""
    warmup = min(p - rank - 1, m)
    out: list[Step] = [("F", 0, i) for i in range(warmup)]
    f, b = warmup, 0
    while f < m:
        out += [("F", 0, f), ("B", 0, b)]
        f, b = f + 1, b + 1
    out += [("B", 0, i) for i in range(b, m)]
    return out


def _interleaved_order(p: int, v: int, rank: int, m: int) -> list[Step]:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021 §2.2.2, schedules.py)."""
    total = m * v

    def fwd(k: int) -> Step:
        group, pos = divmod(k, p * v)
        return ("F", (pos // p), group * p + pos % p)

    def bwd(k: int) -> Step:
        group, pos = divmod(k, p * v)
        return ("B", v - 1 - pos // p, group * p + pos % p)

    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    out = [fwd(k) for k in range(warmup)]
    f, b = warmup, 0
    while f < total:
        out += [fwd(f), bwd(b)]
        f, b = f + 1, b + 1
    out += [bwd(k) for k in range(b, total)]
    return out


def _zb_h1_orders(p: int, m: int) -> list[list[Step]]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §3.1, Fig. 3): backward
    split into B (input gradient, on the critical path) and W (weight gradient, free to
    move). Rank i warms up as 1F1B does (p − i − 1 forwards), then runs F, B and a W
    deferred by i micro-batches, so the later ranks' Ws fill the 1F1B drain; every rank
    then holds at most p micro-batches (1F1B's first-rank peak). With equal F, B and W
    the bubble is (p−1)(T_F + T_B − T_W), a third of 1F1B's (p−1)(T_F + T_B + T_W)."""
    orders = []
    for i in range(p):
        warm = min(p - i - 1, m)
        out: list[Step] = [("F", 0, j) for j in range(warm)]
        f, w = warm, 0
        for b in range(m):
            if f < m:
                out.append(("F", 0, f))
                f += 1
            out.append(("B", 0, b))
            if b >= i:
                out.append(("W", 0, w))
                w += 1
        out += [("W", 0, j) for j in range(w, m)]
        orders.append(out)
    return orders


def _with_comm(order: list[Step], p: int, v: int, rank: int) -> tuple[Action, ...]:
    last = p * v - 1
    out: list[Action] = []
    for kind, chunk, mb in order:
        stage = chunk * p + rank
        if kind == "W":
            out.append(Action(kind="W", stage=stage, microbatch=mb))
        elif kind == "F":
            if stage > 0:
                out.append(Action(kind="RF", stage=stage, microbatch=mb))
            out.append(Action(kind="F", stage=stage, microbatch=mb))
            if stage < last:
                out.append(Action(kind="SF", stage=stage, microbatch=mb))
        else:
            if stage < last:
                out.append(Action(kind="RB", stage=stage, microbatch=mb))
            out.append(Action(kind="B", stage=stage, microbatch=mb))
            if stage > 0:
                out.append(Action(kind="SB", stage=stage, microbatch=mb))
    out += [Action(kind="RG"), Action(kind="OPT")]
    return tuple(out)


# ---- analysis --------------------------------------------------------------------

def peak_inflight(schedule: PipelineSchedule, rank: int) -> dict[int, int]:
    """Most micro-batches whose activations a rank holds at once, per stage it owns.

    Forward stores a micro-batch's activations; its backward frees them (its W pass, when
    the schedule splits backward: the weight gradients need the layers' inputs). The total over
    stages at the worst moment is `peak_inflight_total`.
    """
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    frees = "W" if splits_backward(schedule) else "B"
    for a in schedule.actions[rank]:
        if a.kind == "F":
            live[a.stage] = live.get(a.stage, 0) + 1
            peak[a.stage] = max(peak.get(a.stage, 0), live[a.stage])
        elif a.kind == frees:
            live[a.stage] -= 1
    return peak


def peak_inflight_weighted(schedule: PipelineSchedule, rank: int,
                           weight: dict[int, float]) -> float:
    """Largest sum over live micro-batches of `weight[stage]` (activation bytes, say)."""
    live = best = 0.0
    frees = "W" if splits_backward(schedule) else "B"
    for a in schedule.actions[rank]:
        if a.kind == "F":
            live += weight[a.stage]
            best = max(best, live)
        elif a.kind == frees:
            live -= weight[a.stage]
    return best


def execute(schedule: PipelineSchedule, fwd_s: Sequence[float], bwd_s: Sequence[float],
            wgt_s: Sequence[float] | None = None) -> list[list[tuple[Action, float, float]]]:
    """Run the IR with per-stage compute times and free communication.

    Each rank runs its actions in order; F(s, i) waits for F(s-1, i), B(s, i) for B(s+1, i)
    and F(s, i), W(s, i) for B(s, i). `wgt_s` prices W where the schedule splits backward
    (then `bwd_s` is the input-gradient part only). Returns per rank the (action, start,
    end) of its compute actions. Raises on deadlock, so it also checks that a schedule is
    well formed.
    """
    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * schedule.n_ranks
    clock = [0.0] * schedule.n_ranks
    spans: list[list[tuple[Action, float, float]]] = [[] for _ in range(schedule.n_ranks)]
    last = schedule.n_stages - 1
    remaining = sum(len(a) for a in schedule.actions)
    while remaining:
        progressed = False
        for r, acts in enumerate(schedule.actions):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                if a.kind not in COMPUTE:
                    pos[r] += 1
                    remaining -= 1
                    continue
                deps = _deps(a, last)
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] for d in deps])
                if a.kind == "W":
                    require(wgt_s is not None, "schedule",
                            f"{schedule.name} has W passes: give their times (wgt_s)")
                    assert wgt_s is not None
                    cost = wgt_s[a.stage]
                else:
                    cost = fwd_s[a.stage] if a.kind == "F" else bwd_s[a.stage]
                clock[r] = start + cost
                done[(a.kind, a.stage, a.microbatch)] = clock[r]
                spans[r].append((a, start, clock[r]))
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed and remaining:
            stuck = {r: str(schedule.actions[r][pos[r]]) for r in range(schedule.n_ranks)
                     if pos[r] < len(schedule.actions[r])}
            raise ValueError(f"schedule {schedule.name} deadlocks at {stuck}")
    return spans


def _deps(a: Action, last: int) -> list[tuple[str, int, int]]:
    if a.kind == "W":
        return [("B", a.stage, a.microbatch)]
    if a.kind == "F":
        return [("F", a.stage - 1, a.microbatch)] if a.stage > 0 else []
    deps = [("F", a.stage, a.microbatch)]
    if a.stage < last:
        deps.append(("B", a.stage + 1, a.microbatch))
    return deps


def makespan(schedule: PipelineSchedule, fwd_s: Sequence[float], bwd_s: Sequence[float],
             wgt_s: Sequence[float] | None = None) -> float:
    return max((s[-1][2] for s in execute(schedule, fwd_s, bwd_s, wgt_s) if s), default=0.0)


def splits_backward(schedule: PipelineSchedule) -> bool:
    """Whether backward runs as B (input gradients) and W (weight gradients) passes."""
    return any(a.kind == "W" for a in schedule.actions[0])


def grid(schedule: PipelineSchedule, fwd_units: int = 1, bwd_units: int = 2) -> str:
    """Text chart: one row per rank, one column per time unit (F=1, B=2 by default; split
    backward passes take half of B's units each)."""
    n = schedule.n_stages
    if splits_backward(schedule):  # B and W share the backward's units
        half = [bwd_units / 2] * n
        spans = execute(schedule, [float(fwd_units)] * n, half, half)
    else:
        spans = execute(schedule, [float(fwd_units)] * n, [float(bwd_units)] * n)
    width = int(max(s[-1][2] for s in spans if s))
    cell = max(len(str(a)) for rank in spans for a, _, _ in rank) + 1
    rows = []
    for r, rank in enumerate(spans):
        cells = ["." * (cell - 1)] * width
        for a, start, end in rank:
            for t in range(int(start), int(end)):
                cells[t] = str(a)
        rows.append(f"rank {r:>2} | " + " ".join(c.ljust(cell - 1) for c in cells))
    return "\n".join(rows)
