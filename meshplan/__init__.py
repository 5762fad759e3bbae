"""meshplan: predict, search and execute parallelism plans for LLM training.

Public names (keep stable): load_model, load_cluster, TrainWorkload, Plan, simulate,
check_plan, SimResult, ModelSpec, ClusterSpec, SpecError.
"""

from meshplan.api import simulate
from meshplan.core.check import Violation, check_plan
from meshplan.core.cluster import ClusterSpec, DeviceSpec
from meshplan.core.errors import SpecError
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan
from meshplan.core.results import SimResult
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import cluster_names, load_cluster, load_model, model_names

__all__ = [
    "ClusterSpec", "DeviceSpec", "ModelSpec", "Plan", "SimResult", "SpecError",
    "TrainWorkload", "Violation", "check_plan", "cluster_names", "load_cluster",
    "load_model", "model_names", "simulate",
]
__version__ = "0.1.0"
