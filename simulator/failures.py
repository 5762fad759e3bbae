"""Failures and checkpoints: the expected goodput of a training job (SimPy).

The job trains in steps of `step_s`, writes a checkpoint (blocking, `checkpoint_s`) every
`interval_steps` steps, and fails as a Poisson process of mean time between failures
`mtbf_s` (the whole job: one GPU's MTBF over the GPU count). A failure loses the steps
since the last completed checkpoint and costs `restart_s` before training resumes (a
failure during the restart or a checkpoint also counts). Goodput is the share of wall time
spent on steps that a checkpoint kept.

References: Young 1974, "A first order approximation to the optimum checkpoint interval"
(τ = √(2·C·M)); Daly 2006, "A higher order estimate of the optimum checkpoint interval
for restart dumps" (τ = √(2·C·M) − C for C < 2M, and the expected waste behind it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import simpy

from meshplan.core.errors import require


@dataclass(frozen=True, kw_only=True)
class FailureModel:
    mtbf_s: float  # mean time between failures of the whole job
    checkpoint_s: float  # one blocking checkpoint write
    restart_s: float  # from a failure to training again (reschedule, reload)

    def __post_init__(self) -> None:
        for name in ("mtbf_s", "checkpoint_s", "restart_s"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), f"failures.{name}",
                    f"must be a finite number >= 0, got {value}")
        require(self.mtbf_s > 0, "failures.mtbf_s", f"must be > 0, got {self.mtbf_s}")


@dataclass(frozen=True, kw_only=True)
class Goodput:
    goodput: float  # useful share of wall time
    interval_steps: int
    failures: int
    checkpoints: int
    horizon_s: float


def young_daly_interval_s(fm: FailureModel) -> float:
    """Daly 2006 eq. 37's first terms: √(2CM) − C while C < 2M, else M (Young 1974 without
    the correction: √(2CM))."""
    c, m = fm.checkpoint_s, fm.mtbf_s
    return math.sqrt(2 * c * m) - c if c < 2 * m else m


def expected_goodput(fm: FailureModel, interval_s: float) -> float:
    """First-order expected useful share (Young 1974; Daly 2006 §3): a segment of τ seconds
    of work plus C of checkpoint fails with rate 1/M; a failure wastes half a segment on
    average plus the restart."""
    tau, c, m, r = interval_s, fm.checkpoint_s, fm.mtbf_s, fm.restart_s
    waste = c / (tau + c) + (tau + c) / (2 * m) + r / m
    return max(0.0, 1.0 - waste)


def simulate_goodput(step_s: float, interval_steps: int, fm: FailureModel,
                     horizon_s: float | None = None, seed: int = 0) -> Goodput:
    """Monte Carlo over `horizon_s` of wall time (default 2,000 MTBFs), seeded."""
    require(step_s > 0, "failures.step_s", f"must be > 0, got {step_s}")
    require(interval_steps >= 1, "failures.interval_steps", f"must be >= 1, got {interval_steps}")
    horizon = horizon_s if horizon_s is not None else 2000 * fm.mtbf_s
    env = simpy.Environment()
    rng = np.random.default_rng(seed)
    state = {"kept_steps": 0, "failures": 0, "checkpoints": 0}

    def trainer():
        while True:
            try:
                yield env.timeout(interval_steps * step_s + fm.checkpoint_s)
                state["kept_steps"] += interval_steps
                state["checkpoints"] += 1
            except simpy.Interrupt:
                state["failures"] += 1
                while True:  # a failure during the restart starts it again
                    try:
                        yield env.timeout(fm.restart_s)
                        break
                    except simpy.Interrupt:
                        state["failures"] += 1

    def failures(proc):
        while True:
            yield env.timeout(rng.exponential(fm.mtbf_s))
            proc.interrupt()

    proc = env.process(trainer())
    env.process(failures(proc))
    env.run(until=horizon)
    return Goodput(goodput=state["kept_steps"] * step_s / horizon, interval_steps=interval_steps,
                   failures=state["failures"], checkpoints=state["checkpoints"],
                   horizon_s=horizon)


def best_interval_steps(step_s: float, fm: FailureModel) -> int:
    """The Young/Daly interval in whole steps (at least one)."""
    return max(1, round(young_daly_interval_s(fm) / step_s))
