"""Work that progresses at a rate set by what else runs: the event engine's timing core.

A job is compute (seconds at full speed on one rank) or a flow (a collective or send as
long as it would take alone, loading a set of links at given rates when at full speed).
Flows share every link max-min fairly (progressive filling, Bertsekas & Gallager, "Data
Networks", §6.5.2): all unfrozen flows rise to a common fraction of full speed until some
link is full, then the flows through that link freeze. A flow never exceeds full speed.
Compute on a rank runs `1 + interference` times slower while a flow of that rank moves
(kernels of both share the device). Where processes share a few cores (`shared_cores`:
a CPU host), compute is processor-shared: while processes weighing w in all compute,
each runs at min(1, cores / w) of its speed alone (a fair scheduler's equal share, one
core at most per single-threaded process), so a pipeline rank idle in its bubble frees
its core for the others. Given the scheduler's time slice (`slice_s`), the cores are
time-shared instead, as a kernel shares them: a rank computes at full speed on its cores
for a slice, then yields them if another waits. A rank that starts computing or ends a
slice joins the run queue at a seeded random place: the order in which the kernel picks
among processes with near-equal claims is not ours to know, and a random order matched
the measurement below better than a FIFO one. A rank whose flow moves while it does not
compute keeps `comm_share` of a core per process busy (the transport's threads copying
and polling; woken by I/O, they take a core before the computing ranks), so the ranks on
the cores compute on what is left. Independent groups then drift out of phase, one
communicating while another computes, where shared fluidly they stay in lockstep and
collide. Two pairs of processes on two cores, each pair alternating 10.7 ms of GEMMs
with an exchange over a 1 Gbit/s loopback, ran 10 rounds in 417 ms with 1 MB exchanges
(17 ms alone), 318 ms with 512 KB and 268 ms with 256 KB; shared fluidly they price at
554, 385 and 293 ms; time-shared in the measured 4 ms slices at 417, 271 and 240 ms with
a random queue order (the mean of 20 seeds) and 503, 334 and 247 ms with a FIFO one.
Rates are recomputed whenever a job starts or ends or a slice ends, so the schedule of
completions is exact for piecewise-constant rates.

Deterministic: jobs are kept in start order and ties are broken by that order; the run
queue's order comes from the seed.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

Link = tuple[str, int, str]  # (tier, simulated rank, "out" | "in")


@dataclass(eq=False, kw_only=True)
class Job:
    work_s: float  # seconds at full speed
    rank: int
    demands: dict[Link, float] = field(default_factory=dict)  # bytes/s at full speed
    ranks: tuple[int, ...] = ()  # ranks whose compute this flow slows
    name: str = ""
    stream: str = "compute"
    done: simpy.Event | None = None
    remaining: float = 0.0  # full-speed seconds left at time `since`
    since: float = 0.0
    speed: float = 1.0
    start_s: float = 0.0
    version: int = 0
    active: bool = False

    @property
    def is_flow(self) -> bool:
        return bool(self.demands)


class Fluid:
    """Jobs keep their finish times in a heap; a speed change re-files only that job, so
    compute that no flow touches costs O(log n) per start and end."""

    def __init__(self, env: simpy.Environment, capacity: dict[Link, float],
                 interference: float, shared_cores: float | None = None,
                 weight: dict[int, float] | None = None, slice_s: float | None = None,
                 comm_share: float = 0.0, seed: int = 0):
        """`weight`: processes a simulated rank stands for (1 where not given); `slice_s`
        with `shared_cores`: time-share the cores in slices (run queue order from `seed`),
        a communicating rank keeping `comm_share` of a core per process."""
        self.env, self.capacity, self.interference = env, capacity, interference
        self.cores, self.weight = shared_cores, weight or {}
        self.crowd = 0.0  # processes computing
        self.slice_s = slice_s if shared_cores is not None else None
        self.comm_share = comm_share if self.slice_s is not None else 0.0
        self.rng = random.Random(seed)
        self.queue: list[int] = []  # ranks waiting for cores, time-shared
        self.running: dict[int, float] = {}  # rank on cores -> when its slice began
        self.flows: list[Job] = []  # moving flows, in start order
        self.computing: dict[int, list[Job]] = defaultdict(list)
        self.busy: set[int] = set()  # ranks with a flow moving
        self.load: dict[Link, float] = defaultdict(float)  # full-speed demand of moving flows
        self.over: set[Link] = set()  # links whose load exceeds their capacity
        self.on_link: dict[Link, list[Job]] = defaultdict(list)  # moving flows per link
        self.heap: list[tuple[float, int, int, Job]] = []
        self.seq = 0
        self.armed: set[float] = set()
        self.link_bytes: dict[Link, float] = defaultdict(float)
        self.on_end: Callable[[Job], None] | None = None
        self.events = 0  # job starts and ends, and wake-ups

    def run(self, job: Job) -> simpy.Event:
        """Start a job now; the returned event fires when it ends."""
        job.done = self.env.event()
        self.events += 1
        job.remaining, job.since, job.start_s = job.work_s, self.env.now, self.env.now
        if job.work_s <= 0:
            job.done.succeed()
            return job.done
        job.active = True
        if job.is_flow:
            job.speed = 0.0  # filed by _reflow
            self.flows.append(job)
            self._reflow(job, +1)
        else:
            self.computing[job.rank].append(job)
            if len(self.computing[job.rank]) == 1:
                self._recrowd(job.rank, +1)
            job.speed = self._compute_speed(job.rank)
            self._file(job)
        self._arm()
        return job.done

    # ---- internals ----------------------------------------------------------------
    def _settle(self, job: Job) -> None:
        dt = self.env.now - job.since
        if dt > 0:
            job.remaining -= job.speed * dt
            for link, rate in job.demands.items():
                self.link_bytes[link] += rate * job.speed * dt
        job.since = self.env.now

    def _file(self, job: Job) -> None:
        job.version += 1
        if job.speed <= 0:
            return  # waiting for a core: no finish time until it gets one
        self.seq += 1
        finish = self.env.now + max(0.0, job.remaining) / job.speed
        heapq.heappush(self.heap, (finish, self.seq, job.version, job))

    def _set_speed(self, job: Job, speed: float) -> None:
        if speed == job.speed:
            return
        self._settle(job)
        job.speed = speed
        self._file(job)

    def _arm(self) -> None:
        while self.heap and not self._valid(self.heap[0]):
            heapq.heappop(self.heap)
        if not self.heap:
            return
        t = self.heap[0][0]
        if t in self.armed or (self.armed and min(self.armed) <= t):
            return
        self.armed.add(t)
        wake = self.env.timeout(max(0.0, t - self.env.now))
        wake.callbacks.append(lambda _e: self._wake(t))

    @staticmethod
    def _valid(entry: tuple[float, int, int, Job]) -> bool:
        return entry[3].active and entry[2] == entry[3].version

    def _wake(self, t: float) -> None:
        self.armed.discard(t)
        self.events += 1
        now = self.env.now
        finished = []
        while self.heap and self.heap[0][0] <= now + 1e-12 * max(1.0, now):
            entry = heapq.heappop(self.heap)
            if self._valid(entry):
                finished.append(entry[3])
        for j in finished:
            self._settle(j)
            j.active = False
            if j.is_flow:
                self.flows.remove(j)
                self._reflow(j, -1)
            else:
                self.computing[j.rank].remove(j)
                if not self.computing[j.rank]:
                    self._recrowd(j.rank, -1)
        for j in finished:
            if self.on_end is not None:
                self.on_end(j)
            assert j.done is not None
            j.done.succeed()
        self._arm()

    def _reflow(self, changed: Job, sign: int) -> None:
        """New flow speeds after `changed` started (+1) or ended (−1): all at full speed
        while no link is oversubscribed, else max-min over every moving flow; then compute
        speeds where a rank's traffic started or stopped."""
        was_over = bool(self.over)
        for link, rate in changed.demands.items():
            self.load[link] += sign * rate
            if sign > 0:
                self.on_link[link].append(changed)
            else:
                self.on_link[link].remove(changed)
            if self.load[link] > self.capacity[link] * (1 + 1e-12):
                self.over.add(link)
            else:
                self.over.discard(link)
        if not self.flows:
            self.load.clear()
            self.over.clear()
        if was_over or self.over:
            seeds = [f for f in self.flows if f.speed < 1.0 or f is changed]
            group = self._component(seeds)
            for j, s in zip(group, max_min_speeds(group, self.capacity), strict=True):
                self._set_speed(j, s)
        elif sign > 0:
            self._set_speed(changed, 1.0)
        if self.interference or self.comm_share:
            self._interfere(changed, sign)

    def _component(self, seeds: list[Job]) -> list[Job]:
        """Moving flows linked through shared links to the seeds, in start order; flows
        outside it move at full speed and keep it."""
        todo = [f for f in seeds if f.active]  # a full link's flows all run below full speed
        seen: set[int] = set()
        while todo:
            f = todo.pop()
            if id(f) in seen:
                continue
            seen.add(id(f))
            for link in f.demands:
                todo.extend(g for g in self.on_link[link] if id(g) not in seen)
        return [f for f in self.flows if id(f) in seen]

    def _interfere(self, changed: Job, sign: int) -> None:
        for r in changed.ranks:
            busy = any(r in f.ranks for f in self.flows) if sign < 0 else True
            if busy == (r in self.busy):
                continue
            if busy:
                self.busy.add(r)
            else:
                self.busy.discard(r)
            if self.comm_share:  # the cores left to the others changed too
                self._respeed()
            else:
                for j in self.computing.get(r, ()):
                    self._set_speed(j, self._compute_speed(r))

    def _recrowd(self, rank: int, sign: int) -> None:
        """A rank started (+1) or stopped (−1) computing: under shared cores every other
        computing job's share changes."""
        if self.cores is None:
            return
        self.crowd += sign * self.weight.get(rank, 1.0)
        if self.slice_s is not None:
            if sign > 0:
                self._enqueue(rank)
            elif self.running.pop(rank, None) is None:
                self.queue.remove(rank)
            self._grant()
        self._respeed(but=rank)

    def _enqueue(self, rank: int) -> None:
        self.queue.insert(self.rng.randrange(len(self.queue) + 1), rank)

    def _grant(self) -> None:
        """Time-shared: the run queue's head gets cores while its processes fit beside
        those running (alone, a rank of more processes than cores takes them all)."""
        used = self._on_cores()
        while self.queue and (not self.running or
                              used + self.weight.get(self.queue[0], 1.0) <= self.cores + 1e-9):
            rank = self.queue.pop(0)
            used += self.weight.get(rank, 1.0)
            self._start_slice(rank)

    def _start_slice(self, rank: int) -> None:
        began = self.running[rank] = self.env.now
        self.events += 1
        end = self.env.timeout(self.slice_s)
        end.callbacks.append(lambda _e: self._slice_end(rank, began))

    def _slice_end(self, rank: int, began: float) -> None:
        """A slice is over: the rank yields its cores if another waits, else goes on."""
        if self.running.get(rank) != began:
            return  # it stopped computing since
        if not self.queue:
            self._start_slice(rank)
            return
        del self.running[rank]
        self._enqueue(rank)
        self._grant()
        self._respeed()
        self._arm()

    def _respeed(self, but: int | None = None) -> None:
        """Every computing job's speed anew (but rank `but`'s)."""
        for r, jobs in self.computing.items():
            if r != but:
                for j in jobs:
                    self._set_speed(j, self._compute_speed(r))

    def _on_cores(self) -> float:
        """Processes of the ranks holding cores, time-shared."""
        return sum(self.weight.get(r, 1.0) for r in self.running)

    def _free_cores(self) -> float:
        """Cores left to the ranks holding them once communicating ranks took their share."""
        talking = sum(self.weight.get(r, 1.0) for r in self.busy if r not in self.running)
        return max(0.0, self.cores - self.comm_share * talking)

    def _compute_speed(self, rank: int) -> float:
        speed = 1.0 / (1.0 + self.interference) if rank in self.busy else 1.0
        if self.slice_s is not None:
            if rank not in self.running:
                return 0.0
            return speed * min(1.0, self._free_cores() / self._on_cores())
        if self.cores is not None and self.crowd > self.cores:
            speed *= self.cores / self.crowd
        return speed


def max_min_speeds(flows: list[Job], capacity: dict[Link, float]) -> list[float]:
    """Each flow's fraction of full speed under max-min fair sharing of the links."""
    demands = [list(f.demands.items()) for f in flows]
    speed = [0.0] * len(flows)
    free = list(range(len(flows)))
    used: dict[Link, float] = defaultdict(float)
    while free:
        demand: dict[Link, float] = defaultdict(float)
        for i in free:
            for link, rate in demands[i]:
                demand[link] += rate
        level, tight = 1.0, set()
        for link, d in demand.items():
            room = (capacity[link] - used[link]) / d
            if room < level - 1e-12:
                level, tight = room, {link}
            elif room <= level + 1e-12:
                tight.add(link)
        if level >= 1.0 - 1e-12:
            frozen, level = free, 1.0
        else:
            level = max(level, 0.0)
            frozen = [i for i in free if any(link in tight for link, _ in demands[i])]
        for i in frozen:
            speed[i] = level
            for link, rate in demands[i]:
                used[link] += rate * level
        free = [i for i in free if i not in frozen] if frozen is not free else []
    return [max(s, 1e-9) for s in speed]
