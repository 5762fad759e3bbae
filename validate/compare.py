"""Predicted against measured: per-plan errors and the summary `meshplan validate` holds.

Error is (predicted − measured) / measured, so positive means the simulator says slower
(or more memory) than what ran. Rank agreement is Kendall's τ-b (Kendall 1945) between
predicted and measured step times: 1 when the simulator orders the plans as the machine
does.
"""

from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import kendalltau


@dataclass(frozen=True, kw_only=True)
class Row:
    name: str
    predicted_step_s: float
    measured_step_s: float
    predicted_memory_bytes: float
    measured_memory_bytes: float | None  # None where the device offers no measure
    predicted_des_step_s: float | None = None  # the event engine's prediction
    # share of the host's CPU time the hypervisor stole while the timed steps ran
    measured_steal: float | None = None

    @property
    def unstolen_step_s(self) -> float:
        """The measured step less its stolen share: what the step would take if the
        virtual CPUs had run whenever they were ready (first order: the stolen time is
        spread over the step as over the CPUs)."""
        return self.measured_step_s * (1.0 - (self.measured_steal or 0.0))

    @property
    def step_error(self) -> float:
        return (self.predicted_step_s - self.measured_step_s) / self.measured_step_s

    @property
    def des_step_error(self) -> float | None:
        if self.predicted_des_step_s is None:
            return None
        return (self.predicted_des_step_s - self.measured_step_s) / self.measured_step_s

    @property
    def memory_error(self) -> float | None:
        if not self.measured_memory_bytes:
            return None
        return (self.predicted_memory_bytes - self.measured_memory_bytes) / \
            self.measured_memory_bytes


NO_OVERLAP = "-no-overlap"  # a case's twin with `dp_overlap=off` (`suite.OVERLAP_SUITE`)


@dataclass(frozen=True, kw_only=True)
class Saving:
    """What overlap saved on a plan run beside its twin without overlap: the twin's step
    less the plan's, measured and predicted. Base costs that both share cancel, so its
    error is the overlap model's own."""

    name: str
    measured_s: float
    predicted_s: float
    predicted_des_s: float | None
    step_s: float  # the measured step with overlap, what the errors are fractions of


def overlap_savings(rows: list[Row]) -> list[Saving]:
    """One per row whose `NO_OVERLAP` twin ran too."""
    by_name = {r.name: r for r in rows}
    out = []
    for r in rows:
        twin = by_name.get(r.name + NO_OVERLAP)
        if twin is None:
            continue
        des = None
        if r.predicted_des_step_s is not None and twin.predicted_des_step_s is not None:
            des = twin.predicted_des_step_s - r.predicted_des_step_s
        out.append(Saving(name=r.name, measured_s=twin.measured_step_s - r.measured_step_s,
                          predicted_s=twin.predicted_step_s - r.predicted_step_s,
                          predicted_des_s=des, step_s=r.measured_step_s))
    return out


def summary(rows: list[Row]) -> dict[str, float | str | None]:
    """Mean and max absolute errors (fractions), Kendall τ, and how much slower the plan
    predicted fastest measured than the measured fastest."""
    steps = [abs(r.step_error) for r in rows]
    mems = [abs(e) for r in rows if (e := r.memory_error) is not None]
    tau = kendalltau([r.predicted_step_s for r in rows],
                     [r.measured_step_s for r in rows]).statistic if len(rows) > 1 else None
    picked = min(rows, key=lambda r: r.predicted_step_s)
    best = min(rows, key=lambda r: r.measured_step_s)
    return _des_summary(rows) | _steal_summary(rows) | _saving_summary(rows) | {
        "step_time_mape": sum(steps) / len(steps),
        "step_time_max_ape": max(steps),
        "memory_mape": sum(mems) / len(mems) if mems else None,
        "memory_max_ape": max(mems) if mems else None,
        "kendall_tau": None if tau is None else float(tau),
        "predicted_fastest": picked.name,
        "measured_fastest": best.name,
        "fastest_gap": picked.measured_step_s / best.measured_step_s - 1,
    }


def _des_summary(rows: list[Row]) -> dict[str, float | None]:
    """The event engine's errors, beside the analytical engine's (None without them)."""
    des = [r for r in rows if r.predicted_des_step_s is not None]
    if not des:
        return {}
    errors = [abs(r.des_step_error or 0.0) for r in des]
    tau = kendalltau([r.predicted_des_step_s for r in des],
                     [r.measured_step_s for r in des]).statistic if len(des) > 1 else None
    return {"step_time_mape_des": sum(errors) / len(errors),
            "step_time_max_ape_des": max(errors),
            "kendall_tau_des": None if tau is None else float(tau)}


def _steal_summary(rows: list[Row]) -> dict[str, float]:
    """Where the runs recorded host steal: its mean, and the step errors against the
    measured steps less their stolen share (beside the raw errors, not instead of them)."""
    if not any(r.measured_steal for r in rows):
        return {}
    errors = [abs(r.predicted_step_s / r.unstolen_step_s - 1) for r in rows]
    return {"host_steal_mean": sum(r.measured_steal or 0.0 for r in rows) / len(rows),
            "step_time_mape_unstolen": sum(errors) / len(errors),
            "step_time_max_ape_unstolen": max(errors)}


def _saving_summary(rows: list[Row]) -> dict[str, float]:
    """Mean |predicted − measured| overlap saving over the plans with a twin, as a
    fraction of their measured steps, per engine."""
    savings = overlap_savings(rows)
    if not savings:
        return {}
    out = {"overlap_saving_mae": sum(abs(s.predicted_s - s.measured_s) / s.step_s
                                     for s in savings) / len(savings)}
    if all(s.predicted_des_s is not None for s in savings):
        out["overlap_saving_mae_des"] = sum(abs((s.predicted_des_s or 0.0) - s.measured_s)
                                            / s.step_s for s in savings) / len(savings)
    return out
