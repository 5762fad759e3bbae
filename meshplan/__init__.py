"""meshplan: predict, search and execute parallelism plans for LLM training.

Public names (keep stable): load_model, load_cluster, load_plan_file, TrainWorkload, Plan,
simulate, simulate_run, DesOptions, search, whatif, export, check_plan, SimResult,
SearchSpace, Objective, NoFeasiblePlan, ModelSpec, ClusterSpec, SpecError.
"""

from meshplan.api import search, simulate, simulate_run, whatif
from meshplan.core.check import Violation, check_plan
from meshplan.core.cluster import ClusterSpec, DeviceSpec
from meshplan.core.errors import SpecError
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.planfile import PlanFile
from meshplan.core.results import SimResult
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import (
    cluster_names,
    load_cluster,
    load_model,
    load_plan_file,
    model_names,
    save_plan_file,
)
from meshplan.planner.export import export
from meshplan.planner.search import NoFeasiblePlan, Objective, SearchResult
from meshplan.planner.space import SearchSpace
from meshplan.simulator.des import DesOptions

__all__ = [
    "ClusterSpec", "DesOptions", "DeviceSpec", "ModelSpec", "NoFeasiblePlan", "Objective", "Plan",
    "PlanFile", "SearchResult", "SearchSpace", "SimResult", "SpecError", "TrainWorkload",
    "Violation", "check_plan", "cluster_names", "export", "load_cluster", "load_model",
    "load_plan_file", "model_names", "save_plan_file", "search", "simulate", "simulate_run",
    "whatif",
]
__version__ = "0.1.0"
