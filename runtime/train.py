"""The training worker that `meshplan run` starts under torchrun, one per device.

    python -m torch.distributed.run --nproc-per-node N -m meshplan.runtime.train \
        --plan-file plan.json --steps 10 --out measured.json

Every rank builds the whole model from one seed, keeps its pipeline chunks, parallelizes
them, and runs the plan's schedule; rank 0 writes the measured JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshplan.core.errors import SpecError
from meshplan.core.planfile import PlanFile, from_dict
from meshplan.core.schedule import build_schedule
from meshplan.kernels.cross_entropy import cross_entropy

from . import checkpoint as ckpt
from .data import SyntheticData, TokenFile, rank_micro_batches
from .grads import GradReducer, reduce_partial_grads
from .measure import MemoryMeter, host_cpu_ticks, steal_fraction, sync
from .mesh import Mesh, build_mesh
from .model import Transformer, init_weights
from .parallelize import expert_params, parallelize, split_stages, stage_blocks, stage_ids
from .pipeline import PipelineRank
from .routing import RoutingRecorder
from .support import execution_notes, kernels_on


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    steps: int = 10
    warmup_steps: int = 2
    seed: int = 0
    lr: float = 1e-3
    data: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    kill_during_save: int = 0  # fault injection for tests: die while saving this step
    device: str = "cpu"  # "cuda": one GPU per process, NCCL
    measure_memory: bool = True  # CPU: one extra, profiled step measures live tensors
    record_routing: str | None = None  # rank 0 writes its routers' top-k ids here (.npz)
    kernels: str = "plan"  # "plan" | "triton" | "torch" (`support.kernels_on`)

    def saves_after(self, step: int) -> bool:
        every = self.checkpoint_every
        return bool(self.checkpoint_dir and every and (step + 1) % every == 0)


def load_plan_file(path: str) -> PlanFile:
    try:
        return from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError("plan_file", f"cannot read {path}: {err}") from None


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The workload's optimizer: Adam (Kingma & Ba 2015) or SGD with momentum 0.9."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def fused_loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Triton cross-entropy where it can run (else `loss_fn`'s eager op): no fp32 copy
    of the logits; the gradient overwrites them (the output layer's backward needs its
    input and weight, not its output)."""
    return cross_entropy(logits.flatten(0, 1), labels.flatten(), inplace_backward=True)


def build(pf: PlanFile, mesh: Mesh, seed: int, device: torch.device, fused: bool = False
          ) -> dict[int, Transformer]:
    full = Transformer(pf.model, fused=fused)
    init_weights(full, seed)
    full.to(device)
    plan = mesh.plan
    chunks = split_stages(full, plan, mesh.coord("pp"))
    return {s: parallelize(c, plan, mesh)
            for s, c in zip(stage_ids(plan, mesh.coord("pp")), chunks, strict=True)}


def grad_reducer(chunks, mesh: Mesh) -> GradReducer:
    """Data-parallel means outside FSDP. Under DualPipe a rank and its twin hold copies of
    the same blocks, each trained on half the micro-batches: summing the copies' gradients
    (one reduction over both ranks' dp·cp groups, the parameters taken in block order so
    the two lay out their buffers alike) gives each copy the whole batch's gradient."""
    plan = mesh.plan
    experts = set().union(*(expert_params(c) for c in chunks.values()))
    blocks = stage_blocks(plan, mesh.coord("pp"))
    order = sorted(chunks, key=blocks.__getitem__)
    params = [p for s in order for p in chunks[s].parameters()]
    jobs = []
    if plan.zero == 0 or mesh.size("dp_cp") == 1:
        jobs.append(([p for p in params if p not in experts], mesh.twin_group("dp_cp")))
    if experts:
        jobs.append(([p for p in params if p in experts], mesh.twin_group("edp")))
    return GradReducer(chunks, jobs, divisor=plan.dp * plan.cp, overlap=plan.dp_overlap,
                       bucket_bytes=plan.bucket_bytes,
                       keep_gathered=plan.zero in (1, 2))


def pipeline_rank(pf: PlanFile, mesh: Mesh, chunks: dict[int, Transformer],
                  device: torch.device, fused: bool = False) -> PipelineRank:
    """This rank's executor of the plan's schedule over its model chunks."""
    plan = mesh.plan
    m = plan.micro_batches(pf.work.global_batch)
    return PipelineRank(
        chunks=chunks, schedule=build_schedule(plan.schedule, plan.pp, m, plan.vpp),
        pp_rank=mesh.coord("pp"), peer=mesh.pp_peer,
        act_shape=_act_shape(pf, plan), act_dtype=torch.float32, device=device,
        loss_fn=fused_loss_fn if fused else loss_fn, grads=grad_reducer(chunks, mesh))


def run(pf: PlanFile, opts: RunOptions) -> dict | None:
    """Train for `opts.steps` steps; rank 0 returns the measured record."""
    device = _device(opts.device)
    meter = MemoryMeter(device)
    plan = pf.plan.resolve(dist.get_world_size())
    mesh = build_mesh(plan, device.type)
    fused = kernels_on(plan, device.type, opts.kernels)
    chunks = build(pf, mesh, opts.seed, device, fused)
    params = [p for c in chunks.values() for p in c.parameters()]
    work = pf.work
    optim = make_optimizer(work.optimizer, params, opts.lr)
    m = plan.micro_batches(work.global_batch)
    rank = pipeline_rank(pf, mesh, chunks, device, fused)
    recorder = RoutingRecorder(chunks) if opts.record_routing else None
    data = _data(pf, opts)
    start = 0
    if opts.resume and opts.checkpoint_dir:
        start = ckpt.load_latest(opts.checkpoint_dir, chunks, optim)

    def train_step(step: int) -> float:
        micro = rank_micro_batches(data.global_batch(step), dp=plan.dp,
                                   dp_rank=mesh.coord("dp"), cp=plan.cp,
                                   cp_rank=mesh.coord("cp"), mbs=plan.mbs, device=device)
        with _autocast(work.dtype, device):
            local = rank.step(micro)
        reduce_partial_grads(params)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return local

    losses, times = [], []
    ticks = None
    for step in range(start, opts.steps):
        if step - start == opts.warmup_steps:
            ticks = host_cpu_ticks()  # the timed steps start
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        local = train_step(step)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(_global_loss(local, mesh, m))
        if opts.saves_after(step):
            ckpt.save(opts.checkpoint_dir, step + 1, chunks, optim,
                      kill=opts.kill_during_save == step + 1)
    steal = steal_fraction(ticks, host_cpu_ticks())
    if meter.needs_extra_step and opts.measure_memory:
        meter.measure_step(lambda: train_step(opts.steps))  # after the timed (and saved) steps
    peaks = _gather_peaks(meter.peak_bytes())
    if dist.get_rank() != 0:
        return None
    if recorder is not None and opts.record_routing:
        recorder.save(opts.record_routing)
    return _record(pf, plan, opts, device, start=start, times=times, losses=losses,
                   peaks=peaks, memory_method=meter.method, fused=fused, steal=steal)


def _record(pf: PlanFile, plan, opts: RunOptions, device: torch.device, *, start: int,
            times: list[float], losses: list[float], peaks: list[int],
            memory_method: str, fused: bool, steal: float | None = None) -> dict:
    """The measured JSON of a run (rank 0). `host_steal_fraction` is the share of the
    host CPUs' time stolen by the hypervisor while the timed steps ran (None off Linux)."""
    work = pf.work
    timed = times[opts.warmup_steps:] or times
    # The median resists the interference of a shared machine; the mean is kept beside it.
    median = statistics.median(timed) if timed else float("nan")
    mean = sum(timed) / len(timed) if timed else float("nan")
    return {
        "format": "meshplan-measured", "version": 1,
        "plan": plan.to_dict(), "model": pf.model.name, "world_size": dist.get_world_size(),
        "device": device.type, "backend": dist.get_backend(),
        "seq_len": work.seq_len, "global_batch": work.global_batch, "dtype": work.dtype,
        "first_step": start, "steps": len(times), "warmup_steps": opts.warmup_steps,
        "step_times_s": timed, "step_time_s": median, "step_time_mean_s": mean,
        "tokens_per_s": work.tokens_per_step / median if timed else float("nan"),
        "host_steal_fraction": steal,
        "losses": losses,
        "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_rank": peaks,
        "memory_method": memory_method,
        "runtime_reserved_bytes": pf.cluster.device.runtime_reserved_bytes,
        "kernels": "triton" if fused else "torch",
        "notes": execution_notes(pf.model, plan, device.type, fused),
        "predicted": pf.predicted,
    }


def _act_shape(pf: PlanFile, plan) -> tuple[int, ...]:
    seq = pf.work.seq_len // plan.cp // (plan.tp if plan.sp and plan.tp > 1 else 1)
    return (plan.mbs, seq, pf.model.hidden_size)


def _global_loss(local: float, mesh: Mesh, m: int) -> float:
    """Mean loss over the global batch. `local` sums this rank's m micro-batch means
    (zero but on the ranks holding a pipeline's last stage: under DualPipe two per
    replica); the tp-rank-0 ranks hold the dp·cp disjoint parts."""
    plan = mesh.plan
    owner = mesh.coord("tp") == 0
    device = "cuda" if mesh.device_type == "cuda" else "cpu"  # NCCL reduces CUDA tensors only
    t = torch.tensor([local if owner else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / (plan.dp * plan.cp * m)


def _gather_peaks(peak: int) -> list[int]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, peak)
    return out


def _data(pf: PlanFile, opts: RunOptions):
    args = (pf.model.vocab_size, pf.work.seq_len, pf.work.global_batch, opts.seed)
    return TokenFile(opts.data, *args) if opts.data else SyntheticData(*args)


def _device(kind: str) -> torch.device:
    if kind == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")



def _autocast(dtype: str, device: torch.device):
    lowp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(dtype)
    return torch.autocast(device.type, dtype=lowp, enabled=lowp is not None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="meshplan.runtime.train")
    p.add_argument("--plan-file", required=True)
    p.add_argument("--out")
    for f in ("steps", "warmup_steps", "seed", "checkpoint_every", "kill_during_save"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(RunOptions, f))
    p.add_argument("--lr", type=float, default=RunOptions.lr)
    p.add_argument("--data")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--record-routing")
    p.add_argument("--kernels", default="plan")
    a = p.parse_args(argv)
    opts = RunOptions(steps=a.steps, warmup_steps=a.warmup_steps, seed=a.seed, lr=a.lr,
                      data=a.data, checkpoint_dir=a.checkpoint_dir,
                      checkpoint_every=a.checkpoint_every, resume=a.resume,
                      kill_during_save=a.kill_during_save, device=a.device,
                      record_routing=a.record_routing, kernels=a.kernels)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    try:
        record = run(load_plan_file(a.plan_file), opts)
        if record is not None and a.out:
            Path(a.out).write_text(json.dumps(record, indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
