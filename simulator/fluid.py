"""Work that progresses at a rate set by what else runs: the event engine's timing core.

A job is compute (seconds at full speed on one rank) or a flow (a collective or send as
long as it would take alone, loading a set of links at given rates when at full speed).
Flows share every link max-min fairly (progressive filling, Bertsekas & Gallager, "Data
Networks", §6.5.2): all unfrozen flows rise to a common fraction of full speed until some
link is full, then the flows through that link freeze. A flow never exceeds full speed.
Compute on a rank runs `1 + interference` times slower while a flow of that rank moves
(kernels of both share the device). Rates are recomputed whenever a job starts or ends,
so the schedule of completions is exact for piecewise-constant rates.

Deterministic: jobs are kept in start order and ties are broken by that order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

Link = tuple[str, int, str]  # (tier, simulated rank, "out" | "in")
_EPS = 1e-12


@dataclass(eq=False, kw_only=True)
class Job:
    work_s: float  # seconds at full speed
    rank: int
    demands: dict[Link, float] = field(default_factory=dict)  # bytes/s at full speed
    ranks: tuple[int, ...] = ()  # ranks whose compute this flow slows
    name: str = ""
    stream: str = "compute"
    done: simpy.Event | None = None
    remaining: float = 0.0
    speed: float = 1.0
    start_s: float = 0.0

    @property
    def is_flow(self) -> bool:
        return bool(self.demands)


class Fluid:
    def __init__(self, env: simpy.Environment, capacity: dict[Link, float],
                 interference: float):
        self.env, self.capacity, self.interference = env, capacity, interference
        self.jobs: list[Job] = []
        self.flows_changed = False
        self.busy: set[int] = set()  # ranks with a flow moving
        self.version = 0
        self.last = 0.0
        self.link_bytes: dict[Link, float] = defaultdict(float)
        self.on_end: Callable[[Job], None] | None = None
        self.events = 0  # job starts and ends, and wake-ups

    def run(self, job: Job) -> simpy.Event:
        """Start a job now; the returned event fires when it ends."""
        job.done = self.env.event()
        self.events += 1
        job.remaining, job.start_s = job.work_s, self.env.now
        if job.work_s <= 0:
            job.done.succeed()
            return job.done
        self._advance()
        self.jobs.append(job)
        if job.is_flow:
            self.flows_changed = True
        else:
            job.speed = self._compute_speed(job.rank)
        self._reschedule()
        return job.done

    # ---- internals ----------------------------------------------------------------
    def _advance(self) -> None:
        dt = self.env.now - self.last
        if dt > 0:
            for j in self.jobs:
                j.remaining -= j.speed * dt
                for link, rate in j.demands.items():
                    self.link_bytes[link] += rate * j.speed * dt
        self.last = self.env.now

    def _reschedule(self) -> None:
        self._rates()
        self.version += 1
        if not self.jobs:
            return
        dt = min(max(0.0, j.remaining) / j.speed for j in self.jobs)
        wake = self.env.timeout(dt)
        v = self.version
        wake.callbacks.append(lambda _e: self._wake(v))

    def _wake(self, version: int) -> None:
        if version != self.version:
            return
        self.events += 1
        self._advance()
        finished = [j for j in self.jobs if j.remaining <= _EPS + 1e-9 * j.work_s]
        self.jobs = [j for j in self.jobs if j.remaining > _EPS + 1e-9 * j.work_s]
        self.flows_changed = self.flows_changed or any(j.is_flow for j in finished)
        for j in finished:
            if self.on_end is not None:
                self.on_end(j)
            assert j.done is not None
            j.done.succeed()
        self._reschedule()

    def _rates(self) -> None:
        """New speeds when the set of moving flows changed (compute alone changes none)."""
        if not self.flows_changed:
            return
        self.flows_changed = False
        flows = [j for j in self.jobs if j.is_flow]
        for j, s in zip(flows, max_min_speeds(flows, self.capacity), strict=True):
            j.speed = s
        busy = {r for f in flows for r in f.ranks}
        if self.interference and busy != self.busy:
            self.busy = busy
            for j in self.jobs:
                if not j.is_flow:
                    j.speed = self._compute_speed(j.rank)
        self.busy = busy

    def _compute_speed(self, rank: int) -> float:
        return 1.0 / (1.0 + self.interference) if rank in self.busy else 1.0


def max_min_speeds(flows: list[Job], capacity: dict[Link, float]) -> list[float]:
    """Each flow's fraction of full speed under max-min fair sharing of the links."""
    total: dict[Link, float] = defaultdict(float)
    for f in flows:
        for link, rate in f.demands.items():
            total[link] += rate
    if all(d <= capacity[link] * (1 + 1e-12) for link, d in total.items()):
        return [1.0] * len(flows)  # no link is oversubscribed
    speed = [0.0] * len(flows)
    free = set(range(len(flows)))
    used: dict[Link, float] = defaultdict(float)
    while free:
        demand: dict[Link, float] = defaultdict(float)
        for i in free:
            for link, rate in flows[i].demands.items():
                demand[link] += rate
        level, tight = 1.0, set()
        for link, d in demand.items():
            room = (capacity[link] - used[link]) / d
            if room < level - 1e-12:
                level, tight = room, {link}
            elif room <= level + 1e-12:
                tight.add(link)
        level = max(level, 0.0)
        if level >= 1.0 - 1e-12:
            frozen = set(free)
            level = 1.0
        else:
            frozen = {i for i in free if tight.intersection(flows[i].demands)}
        for i in frozen:
            speed[i] = level
            for link, rate in flows[i].demands.items():
                used[link] += rate * level
        free -= frozen
    return [max(s, 1e-9) for s in speed]
