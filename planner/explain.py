"""Why the winner won: the plan keys and breakdown terms that differ from the runner-up."""

from __future__ import annotations

from dataclasses import asdict, fields

from meshplan.core.plan import Plan
from meshplan.core.results import SimResult

_SKIP = ("version",)


def plan_differences(a: Plan, b: Plan) -> list[tuple[str, object, object]]:
    return [(f.name, getattr(a, f.name), getattr(b, f.name)) for f in fields(Plan)
            if f.name not in _SKIP and getattr(a, f.name) != getattr(b, f.name)]


def explain(best: SimResult, runner_up: SimResult) -> str:
    """One paragraph: how much faster, which time terms move most, which keys differ."""
    gap = runner_up.step_time_s / best.step_time_s - 1
    terms = []
    tb, tr = asdict(best.time), asdict(runner_up.time)
    for name in sorted(tb, key=lambda k: -abs(tb[k] - tr[k])):
        delta = tb[name] - tr[name]
        if abs(delta) < 1e-4 * best.step_time_s:
            continue
        terms.append(f"{name} {tb[name]:.3f} s vs {tr[name]:.3f} s ({delta:+.3f} s)")
    keys = ", ".join(f"{k} {x} vs {y}" for k, x, y in plan_differences(best.plan,
                                                                       runner_up.plan))
    memory = (f"peak memory {best.peak_memory_bytes / 2**30:.1f} GiB vs "
              f"{runner_up.peak_memory_bytes / 2**30:.1f} GiB")
    if gap < 1e-6:
        head = (f"{best.plan.to_text()} ties with the runner-up {runner_up.plan.to_text()} "
                f"at {best.step_time_s:.3f} s per step (ties go to more memory headroom)")
    else:
        head = (f"{best.plan.to_text()} beats the runner-up {runner_up.plan.to_text()} by "
                f"{gap * 100:.2f}% in step time ({best.step_time_s:.3f} s vs "
                f"{runner_up.step_time_s:.3f} s)")
    body = "; ".join(terms[:3]) or "no breakdown term differs"
    return f"{head}: {body}; {memory}. Plans differ in: {keys or 'nothing'}."
