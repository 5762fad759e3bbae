"""`meshplan run`: check a plan file, then start torchrun for it (or print the commands).

Everything that can be refused is refused here, before any process starts: the plan's
validity (`check_plan`), the degrees against the world size, and what this runtime
builds (`support.py`). One node: torchrun starts the local processes (gloo on CPU, NCCL on
CUDA). Several nodes: the per-node torchrun commands are printed for the user to start.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass

from meshplan.core.check import check_plan
from meshplan.core.errors import SpecError
from meshplan.core.planfile import PlanFile

from .support import refuse_unsupported_plan


@dataclass(frozen=True, kw_only=True)
class Launch:
    nnodes: int
    nproc_per_node: int
    worker_args: tuple[str, ...]

    def command(self, node_rank: int = 0, master: str = "127.0.0.1:29500") -> list[str]:
        if self.nnodes == 1:  # run here, with this interpreter
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={self.nproc_per_node}"]
        else:  # printed for the user to start on each node
            head = ["torchrun", f"--nproc-per-node={self.nproc_per_node}",
                    f"--nnodes={self.nnodes}", f"--node-rank={node_rank}",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={master}"]
        return head + ["-m", "meshplan.runtime.train", *self.worker_args]


def override(pf: PlanFile, seq_len: int | None = None, global_batch: int | None = None,
             dtype: str | None = None) -> PlanFile:
    """The plan file with workload fields replaced by the command line's."""
    changes = {k: v for k, v in (("seq_len", seq_len), ("global_batch", global_batch),
                                 ("dtype", dtype)) if v is not None}
    if not changes:
        return pf
    return dataclasses.replace(pf, work=dataclasses.replace(pf.work, **changes))


def check_runnable(pf: PlanFile, cuda_devices: int) -> None:
    """Raise SpecError with every reason the plan file cannot run on this machine, which
    has `cuda_devices` CUDA devices."""
    if pf.cluster.n_nodes == 1:  # several nodes: the commands are printed, not run here
        _check_devices(pf, cuda_devices)
    cuda = pf.cluster.device.kind == "gpu"
    plan = pf.plan.resolve(pf.cluster.n_gpus)
    problems = [str(v) for v in check_plan(pf.model, pf.cluster, pf.work, plan)]
    if problems:
        raise SpecError("plan_file", "the plan cannot run: " + "; ".join(problems))
    refuse_unsupported_plan(pf.model, plan, cuda)
    m = plan.micro_batches(pf.work.global_batch)
    if plan.pp > 1 and m < 1:
        raise SpecError("plan.mbs", f"no micro-batches: global batch {pf.work.global_batch} "
                        f"< dp({plan.dp}) * mbs({plan.mbs})")


def _check_devices(pf: PlanFile, cuda_devices: int) -> None:
    c = pf.cluster
    if c.device.kind == "cpu":
        return
    if cuda_devices == 0:
        raise SpecError("cluster", f"the plan is for {c.n_gpus} x {c.device.name} and this "
                        "machine has no CUDA device: run it where the GPUs are, or plan for "
                        "the `cpu` cluster")
    local = min(c.n_gpus, c.node.gpus_per_node)
    if cuda_devices < local:
        raise SpecError("cluster", f"the plan needs {local} GPUs per node and this machine "
                        f"has {cuda_devices} CUDA devices")


def device_of(pf: PlanFile) -> str:
    """The torch device type the plan file's ranks run on."""
    return "cpu" if pf.cluster.device.kind == "cpu" else "cuda"


def plan_launch(pf: PlanFile, worker_args: list[str]) -> Launch:
    per_node = pf.cluster.node.gpus_per_node
    world = pf.cluster.n_gpus
    return Launch(nnodes=pf.cluster.n_nodes, nproc_per_node=min(world, per_node),
                  worker_args=(*worker_args, "--device", device_of(pf)))


def worker_env() -> dict[str, str]:
    """The environment of the workers: one intra-op thread each (the runtime's processes
    are the parallelism; more threads would oversubscribe the cores)."""
    return dict(os.environ, OMP_NUM_THREADS="1")


def start(launch: Launch) -> int:
    """Run torchrun for a one-node launch; returns its exit status."""
    return subprocess.run(launch.command(), env=worker_env()).returncode
