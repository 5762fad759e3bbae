"""Python entry points; the CLI is a thin shell around these."""

from __future__ import annotations

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.results import SimResult
from meshplan.core.workload import TrainWorkload
from meshplan.simulator.analytical import simulate_analytical

ENGINES = ("analytical",)


def simulate(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, plan: Plan | str,
             engine: str = "analytical") -> SimResult:
    """Predict one training step of `plan` (a Plan or its text form).

    Raises SpecError for a plan that cannot run at all (degrees, divisibility); a plan that
    runs out of memory returns `fits=False` with the reason in `violations`.
    """
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    if engine not in ENGINES:
        raise SpecError("engine", f"{engine!r} is not available yet; engines: {list(ENGINES)}")
    return simulate_analytical(model, cluster, work, plan)
