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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

from .errors import require

Kind = Literal["F", "B", "W", "SF", "RF", "SB", "RB", "RG", "OPT"]
COMPUTE: frozenset[str] = frozenset({"F", "B", "W"})
_TOKEN = re.compile(r"^(\+?)(\d+)(F|B|W|SF|RF|SB|RB)(\d+)$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Action:
    kind: Kind
    stage: int = -1  # virtual stage; -1 for RG/OPT
    microbatch: int = -1
    paired: bool = False  # a B that runs overlapped with the F just before it (text "+")

    def __str__(self) -> str:
        if self.kind in ("RG", "OPT"):
            return self.kind
        return f"{'+' if self.paired else ''}{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, token: str) -> Action:
        if token in ("RG", "OPT"):
            return cls(kind=token)  # type: ignore[arg-type]
        m = _TOKEN.match(token)
        require(m is not None, "schedule", f"cannot parse action {token!r}")
        assert m is not None
        return cls(kind=m.group(3), stage=int(m.group(2)), microbatch=int(m.group(4)),  # type: ignore[arg-type]
                   paired=m.group(1) == "+")


Done = tuple[str, int, int]  # (kind, stage, micro-batch) of a finished compute action


@dataclass(frozen=True, kw_only=True)
class PipelineSchedule:
    """`n_pipes` > 1 splits the virtual stages into that many pipelines of equal length,
    each a full copy of the model that its own micro-batches traverse (DualPipe's two
    directions); `stage_ranks` places the stages when the placement is not `s % n_ranks`."""

    name: str
    n_ranks: int  # pipeline ranks (pp)
    n_chunks: int  # model chunks per rank (vpp)
    n_microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # per rank, in execution order
    n_pipes: int = 1
    stage_ranks: tuple[int, ...] = ()

    @property
    def n_stages(self) -> int:
        return self.n_ranks * self.n_chunks

    @property
    def pipe_len(self) -> int:
        """Stages a micro-batch passes through."""
        return self.n_stages // self.n_pipes

    def rank_of(self, stage: int) -> int:
        return self.stage_ranks[stage] if self.stage_ranks else stage % self.n_ranks

    def block(self, stage: int) -> int:
        """The model block (index into the plan's layer split) a virtual stage runs."""
        return stage % self.pipe_len

    def is_first(self, stage: int) -> bool:
        return stage % self.pipe_len == 0

    def is_last(self, stage: int) -> bool:
        return stage % self.pipe_len == self.pipe_len - 1

    @cached_property
    def compute_steps(self) -> tuple[tuple[tuple[Action, int, tuple[int, ...]], ...], ...]:
        """Per rank, its F/B/W actions as (action, its id, ids of what it waits for):
        `execute`'s input, numbered once per schedule."""
        ids: dict[Done, int] = {}
        for acts in self.actions:
            for a in acts:
                if a.kind in COMPUTE:
                    ids[(a.kind, a.stage, a.microbatch)] = len(ids)
        out = []
        for acts in self.actions:
            steps = []
            for i, a in enumerate(acts):
                if a.kind in COMPUTE:
                    deps = _deps(a, self) + _pair_deps(acts, i, self)
                    steps.append((a, ids[(a.kind, a.stage, a.microbatch)],
                                  tuple(ids[d] for d in deps)))
            out.append(tuple(steps))
        return tuple(out)

    def text(self, rank: int, compute_only: bool = False) -> str:
        acts = self.actions[rank]
        if compute_only:
            acts = tuple(a for a in acts if a.kind in COMPUTE)
        return " ".join(str(a) for a in acts)

    @classmethod
    def from_text(cls, name: str, n_chunks: int, n_microbatches: int, lines: Sequence[str],
                  n_pipes: int = 1, stage_ranks: tuple[int, ...] = ()) -> PipelineSchedule:
        actions = tuple(tuple(Action.parse(t) for t in line.split()) for line in lines)
        return cls(name=name, n_ranks=len(lines), n_chunks=n_chunks,
                   n_microbatches=n_microbatches, actions=actions, n_pipes=n_pipes,
                   stage_ranks=stage_ranks)


# ---- generators -----------------------------------------------------------------

@lru_cache(maxsize=64)
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
    elif name == "dualpipe":
        return _dualpipe(pp, n_microbatches)
    else:
        raise ValueError(f"schedule {name!r} is not in the IR (gpipe, 1f1b, interleaved, zb, "
                         "dualpipe)")
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


def _dualpipe(p: int, m: int) -> PipelineSchedule:
    """DualPipe (DeepSeek-AI 2024, DeepSeek-V3 technical report §3.2.1, Fig. 5; the step
    structure of deepseek-ai/DualPipe): two pipelines over the same p model blocks run in
    opposite directions, m/2 micro-batches each. The downward pipeline's stage j (virtual
    stage j) runs on rank j, the upward one's (virtual stage p + j) on rank p − 1 − j, so
    every rank holds two blocks (2x parameters). In the steady state each rank pairs a
    forward of one direction with a backward of the other; those pairs are where the
    report overlaps one chunk's all-to-all with the other's compute. Backward is split into
    B and W where W can fill a bubble (zero-bubble, Qi et al. 2023); elsewhere W follows
    its B at once. Bubble with equal stages: (p/2 − 1)(F&B + B − 3W), the report's Table 2.
    """
    require(p >= 2 and p % 2 == 0, "plan.pp", f"dualpipe needs an even pp >= 2, got {p}")
    require(m % 2 == 0 and m >= 2 * p, "plan.mbs",
            f"dualpipe needs an even number of micro-batches >= 2*pp = {2 * p}, got {m}")
    actions = tuple(_dualpipe_rank(p, m // 2, r) for r in range(p))
    ranks = tuple(list(range(p)) + [p - 1 - j for j in range(p)])
    return PipelineSchedule(name="dualpipe", n_ranks=p, n_chunks=2, n_microbatches=m,
                            actions=actions, n_pipes=2, stage_ranks=ranks)


def _dualpipe_rank(p: int, n: int, r: int) -> tuple[Action, ...]:
    """One rank's actions. Phase 0 is the direction whose micro-batches reach this rank
    first (downward on the first half of the ranks, upward on the second), phase 1 the
    other; the eight steps are named after what they repeat."""
    half, h = p // 2, min(r, p - 1 - r)
    down, up = r, p + (p - 1 - r)  # this rank's virtual stage in each pipeline
    stage = (down, up) if r < half else (up, down)
    first_mb = {down: 0, up: n}  # upward micro-batches are numbered n .. 2n-1
    nxt = {"F": [0, 0], "B": [0, 0]}
    deferred: list[tuple[int, int]] = []  # (stage, micro-batch) whose W waits, oldest first
    out: list[Action] = []

    def take(kind: str, phase: int) -> tuple[int, int]:
        st = stage[phase]
        mb = first_mb[st] + nxt[kind][phase]
        nxt[kind][phase] += 1
        return st, mb

    def fwd(phase: int) -> None:
        st, mb = take("F", phase)
        out.append(Action(kind="F", stage=st, microbatch=mb))

    def bwd(phase: int, split: bool, paired: bool = False) -> None:
        st, mb = take("B", phase)
        out.append(Action(kind="B", stage=st, microbatch=mb, paired=paired))
        if split:
            deferred.append((st, mb))
        else:
            out.append(Action(kind="W", stage=st, microbatch=mb))

    def wgt() -> None:
        st, mb = deferred.pop(0)
        out.append(Action(kind="W", stage=st, microbatch=mb))

    def fwd_bwd(f_phase: int, b_phase: int) -> None:  # a forward overlapped with a backward
        fwd(f_phase)
        bwd(b_phase, split=False, paired=True)

    for _ in range(2 * (half - h - 1)):  # 1: nF0
        fwd(0)
    for _ in range(h + 1):  # 2: nF0F1
        fwd(0)
        fwd(1)
    for _ in range(half - h - 1):  # 3: nB1W1F1
        bwd(1, split=True)
        wgt()
        fwd(1)
    for i in range(n - p + h + 1):  # 4 (steady state): nF0B1F1B0
        if i == 0 and h == half - 1:  # the middle ranks do not pair the first two
            fwd(0)
            bwd(1, split=False)
        else:
            fwd_bwd(0, 1)
        fwd_bwd(1, 0)
    for _ in range(half - h - 1):  # 5: nB1F1B0
        bwd(1, split=False)
        fwd_bwd(1, 0)
    split = False
    for i in range(h + 1):  # 6: nB1B0, the second half of them split
        split |= i == (h + 1) // 2 and h % 2 == 1
        bwd(1, split)
        split |= i == (h + 1) // 2 and h % 2 == 0
        bwd(0, split)
    for _ in range(half - h - 1):  # 7: nWB0
        wgt()
        bwd(0, split=True)
    for _ in range(h + 1):  # 8: nW
        wgt()
    assert not deferred
    return _comm_around(out, p)


def _comm_around(compute: list[Action], p: int) -> tuple[Action, ...]:
    """DualPipe's receives and sends: a pipeline's first stage receives nothing forward,
    its last nothing backward (pipelines of p stages); a paired F and B receive both
    inputs before either runs and send both results after."""
    out: list[Action] = []
    i = 0
    while i < len(compute):
        a = compute[i]
        group = [a]
        if i + 1 < len(compute) and compute[i + 1].paired:
            group.append(compute[i + 1])
        for b in group:
            out += _recv(b, p)
        out += group
        for b in group:
            out += _send(b, p)
        i += len(group)
    out += [Action(kind="RG"), Action(kind="OPT")]
    return tuple(out)


def _recv(a: Action, pipe_len: int) -> list[Action]:
    if a.kind == "F" and a.stage % pipe_len:
        return [Action(kind="RF", stage=a.stage, microbatch=a.microbatch)]
    if a.kind == "B" and a.stage % pipe_len != pipe_len - 1:
        return [Action(kind="RB", stage=a.stage, microbatch=a.microbatch)]
    return []


def _send(a: Action, pipe_len: int) -> list[Action]:
    if a.kind == "F" and a.stage % pipe_len != pipe_len - 1:
        return [Action(kind="SF", stage=a.stage, microbatch=a.microbatch)]
    if a.kind == "B" and a.stage % pipe_len:
        return [Action(kind="SB", stage=a.stage, microbatch=a.microbatch)]
    return []


def _with_comm(order: list[Step], p: int, v: int, rank: int) -> tuple[Action, ...]:
    out: list[Action] = []
    for kind, chunk, mb in order:
        a = Action(kind=kind, stage=chunk * p + rank, microbatch=mb)  # type: ignore[arg-type]
        out += [*_recv(a, p * v), a, *_send(a, p * v)]
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
            wgt_s: Sequence[float] | None = None,
            pair_saving_s: Callable[[int, int], float] | None = None,
            ) -> list[list[tuple[Action, float, float]]]:
    """Run the IR with per-stage compute times and free communication.

    Each rank runs its actions in order; F(s, i) waits for F(s-1, i), B(s, i) for B(s+1, i)
    and F(s, i), W(s, i) for B(s, i); an F paired with the B after it (DualPipe) also
    waits for that B's inputs, since the pair runs as one. `wgt_s` prices W where the
    schedule splits backward (then `bwd_s` is the input-gradient part only);
    `pair_saving_s(f_stage, b_stage)` is what a pair saves over running its F and B one
    after the other (taken off the B). Returns per rank the (action, start, end) of its
    compute actions. Raises on deadlock, so it also checks that a schedule is
    well formed.
    """
    if wgt_s is None:
        require(not splits_backward(schedule), "schedule",
                f"{schedule.name} has W passes: give their times (wgt_s)")
    times = {"F": fwd_s, "B": bwd_s, "W": wgt_s or ()}
    steps = schedule.compute_steps
    remaining = sum(len(a) for a in steps)
    done: list[float] = [-1.0] * remaining  # end time by action id; -1: not yet
    pos = [0] * schedule.n_ranks
    clock = [0.0] * schedule.n_ranks
    spans: list[list[tuple[Action, float, float]]] = [[] for _ in range(schedule.n_ranks)]
    while remaining:
        progressed = False
        for r, acts in enumerate(steps):
            span, t, i = spans[r], clock[r], pos[r]
            while i < len(acts):
                a, own, deps = acts[i]
                start = t
                for d in deps:
                    if done[d] < 0:
                        break
                    start = max(start, done[d])
                else:
                    cost = times[a.kind][a.stage]
                    if a.paired and pair_saving_s is not None:
                        cost = max(0.0, cost - pair_saving_s(span[-1][0].stage, a.stage))
                    t = done[own] = start + cost
                    span.append((a, start, t))
                    i += 1
                    continue
                break
            progressed |= i > pos[r]
            remaining -= i - pos[r]
            clock[r], pos[r] = t, i
        if not progressed and remaining:
            stuck = {r: str(steps[r][pos[r]][0]) for r in range(schedule.n_ranks)
                     if pos[r] < len(steps[r])}
            raise ValueError(f"schedule {schedule.name} deadlocks at {stuck}")
    return spans


def _pair_deps(acts: Sequence[Action], i: int,
               schedule: PipelineSchedule) -> list[tuple[str, int, int]]:
    """What the B paired with the F at `acts[i]` waits for, when there is one."""
    if acts[i].kind != "F":
        return []
    j = i + 1
    while j < len(acts) and acts[j].kind not in COMPUTE:
        j += 1
    return _deps(acts[j], schedule) if j < len(acts) and acts[j].paired else []


def _deps(a: Action, schedule: PipelineSchedule) -> list[tuple[str, int, int]]:
    if a.kind == "W":
        return [("B", a.stage, a.microbatch)]
    if a.kind == "F":
        return [] if schedule.is_first(a.stage) else [("F", a.stage - 1, a.microbatch)]
    deps = [("F", a.stage, a.microbatch)]
    if not schedule.is_last(a.stage):
        deps.append(("B", a.stage + 1, a.microbatch))
    return deps


def makespan(schedule: PipelineSchedule, fwd_s: Sequence[float], bwd_s: Sequence[float],
             wgt_s: Sequence[float] | None = None,
             pair_saving_s: Callable[[int, int], float] | None = None) -> float:
    spans = execute(schedule, fwd_s, bwd_s, wgt_s, pair_saving_s)
    return max((s[-1][2] for s in spans if s), default=0.0)


# The schedules whose backward runs as B (input gradients) and W (weight gradients): what
# `splits_backward` finds in their IR, known from the name where no IR is built.
SPLIT_SCHEDULES = frozenset({"zb", "dualpipe"})


def late_receives(schedule: PipelineSchedule, rank: int) -> int:
    """Receives of `rank` after its first compute action: on the slowest rank these find
    their message sent already (its neighbours have time to spare), so each waits for
    the sender to hand it over (`CostModel.late_receive_s`); those before it wait for the
    pipeline to fill."""
    acts = schedule.actions[rank]
    first = next((i for i, a in enumerate(acts) if a.kind in ("F", "B", "W")), len(acts))
    return sum(a.kind in ("RF", "RB") for a in acts[first:])


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
