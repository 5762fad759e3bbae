"""What each parallel mechanism of the runtime costs per layer beyond its ops and messages.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m meshplan.validate.mechbench OUT.json

Tensor parallelism through DTensor, ring attention, FSDP2's per-layer hooks and expert
dispatch all spend time per layer that neither the ops nor the collectives they issue
account for (sharding propagation, Python, waits, and work that grows with the layer's:
copies into and out of the communication buffers, gloo's threads taking the core from
the compute). Each is measured the way `opbench.overheads` measures the plain layer: the
runtime's own model under one plan, with 1 and 3 layers, their calls alternating so that
the machine's drift cancels; half the difference is one layer's forward and backward.
That at two sizes (`MECH_POINTS`): 16 tokens, where compute costs next to nothing, and
4 x 512 tokens, more than any micro-batch of the validation suite, so that the line
between them interpolates the suite's layers rather than extrapolating. On this VM the
layers ran 1.2-4.5 ms each way over their priced time at 4 x 128 tokens, against at most
1.8 ms at 16 tokens, and the MoE layer's residual grew more slowly than its work past
that (0.60 of the bare layer at 4 x 128 tokens, 0.45 at 4 x 256, 0.33 at 4 x 512), so a
line through 16 and 4 x 128 tokens over-priced it at 4 x 256. `profile.py` subtracts what
the cost model already prices for the layer (ops, messages, the plain layer's overhead)
and fits the rest as a fixed part and a share of the layer's work.

Pipelining adds no host time to a chunk call worth pricing (a traced 1F1B step of
tiny-dense at 256 tokens ran each chunk's forward within 2% of its priced ops); what it
adds is the latency of its messages, which a sender that goes on computing delivers late
(a gloo send progresses on a thread that competes with the compute for the core). That
latency is read from traced pipeline steps (`PipelineRank.trace`): from a send's start
to the end of its receive, over the messages whose receiver was already waiting. The
other messages, whose receive was posted after the send, wait too: gloo hands a message
over only once the receiver asks, on a thread of the sender, which by then has gone on
computing, and that thread waits for the core. On this VM most of those receives took
0.2 ms and some 2-7 ms (the kernel's scheduler slice, where the woken thread lands on the
busy core), and in 1F1B steps of the validation suite's shape every forward receive of
the last stage after its first was one, 1.6 ms on average over 8 runs. Their mean is
recorded: on the slowest rank each one adds to the step. The pipeline runs 4 x 128
tokens a micro-batch, so that a chunk computes for longer than a scheduler slice.

ZB-H1 and DualPipe split a stage's backward into an input pass and a weight pass
(torch.distributed.pipelining's `stage_backward_input` and `stage_backward_weight`),
which costs more than one backward: it walks the autograd graph to find each weight's
intermediates and runs a gradient call per group. Timed here on a middle stage's chunk of
2 layers, whole and split, at two sequence lengths, so that the profile can fit a fixed
part per layer and a part that grows with the backward.

Each part is timed in a process of its own (`--parts`; `profile` starts one run per
part), since a process that has run the others times a layer slower than a fresh one, and
the runtime runs every plan in a fresh process. On this VM the MoE layer's backward at
4 x 256 and 4 x 512 tokens took 17.0-17.3 and 41.5-41.9 ms per layer in three fresh
processes and 18.6-19.8 and 47.4-47.6 ms in two runs after the TP, CP, FSDP and ZeRO-2
parts (the cause was not pinned down; with glibc's mmap threshold fixed, every layer ran
twice as slow and the gap stayed).

Rank 0 writes, of the parts asked for, {mechanism: {"<seq>x<mbs>": {"1": [fwd s, bwd s],
"3": [...]}}, "pp": {"message_s": s, "late_receive_s": s},
"split_w": {str(seq): [whole s, split s]}}.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from meshplan.core.plan import Plan
from meshplan.core.planfile import PlanFile
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import load_cluster, load_model

# mechanism -> (catalog model, plan for 2 processes). In this order each residual is
# taken after the ones before it are priced ("ep" runs MoE layers, so "moe" comes first).
MECHANISMS = {"tp": ("tiny-dense", "tp=2,sp=on"), "cp": ("tiny-dense", "cp=2"),
              "fsdp": ("tiny-dense", "dp=2,zero=3"), "zero2": ("tiny-dense", "dp=2,zero=2"),
              "moe": ("tiny-moe", "dp=2"), "ep": ("tiny-moe", "dp=2,ep=2")}
SEQ = 16
MECH_POINTS = ((SEQ, 1), (512, 4))  # (sequence, micro-batch size) each mechanism runs at
PP_POINT = (128, 4)  # (sequence, micro-batch size) of the traced pipeline
REPS = 40
PP_PLAN, PP_MICRO_BATCHES = "pp=2", 6
SPLIT_LAYERS, SPLIT_SEQS = 2, (16, 256)
PARTS = (*MECHANISMS, "pp", "split_w")  # what one run can be asked for (`--parts`)


def point_key(seq: int, mbs: int) -> str:
    return f"{seq}x{mbs}"


def plan_file(mechanism: str, layers: int, processes: int, seq: int = SEQ,
              mbs: int = 1) -> PlanFile:
    """The mechanism's model cut to `layers` layers (all MoE for tiny-moe) and its plan,
    one micro-batch of `mbs` sequences of `seq` tokens per data-parallel rank."""
    name, text = MECHANISMS[mechanism]
    model = load_model(name)
    model = replace(model, n_layers=layers)
    if model.moe:
        model = replace(model, moe=replace(model.moe, first_k_dense=0))
    plan = Plan.parse(f"{text},mbs={mbs},kernels=eager").resolve(processes)
    work = TrainWorkload(seq_len=seq, global_batch=plan.dp * mbs, dtype="fp32")
    return PlanFile(model=model, cluster=load_cluster("cpu", gpus=processes), work=work,
                    plan=plan)


def time_layers(pfs: list[PlanFile], device) -> list[list[float]]:
    """Per plan file, [forward s, backward s] of one micro-batch: the slowest rank's
    median. The plan files' calls alternate, so a drift of the machine falls on each
    alike and cancels in their difference."""
    return _alternating([_layer_runner(pf, device) for pf in pfs], REPS, device)


def _alternating(runs: list, reps: int, device) -> list[list[float]]:
    """Per call of `runs` (each returns a tuple of seconds), the slowest rank's median of
    each of its seconds over `reps` turns after two warm-up turns; the calls take turns,
    each after a scrub of the private cache and a barrier."""
    import torch.distributed as dist

    from .microbench import Scrub

    samples: list[list[list[float]]] = [[] for _ in runs]
    scrub = Scrub(device)
    for rep in range(reps + 2):
        for run, out in zip(runs, samples, strict=True):
            scrub()  # operands outside the private cache, as the profile's tables time them
            dist.barrier()
            seconds = run()
            if rep >= 2:
                out.append(list(seconds))
    return [_slowest_median(*map(list, zip(*out, strict=True))) for out in samples]


def _layer_runner(pf: PlanFile, device):
    """A call that runs one micro-batch's forward and backward; returns their seconds."""
    import torch

    from meshplan.runtime.data import rank_micro_batches
    from meshplan.runtime.mesh import build_mesh
    from meshplan.runtime.train import build, loss_fn

    plan = pf.plan
    mesh = build_mesh(plan, device.type)
    (model,) = build(pf, mesh, 0, device).values()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: as between micro-batches
        model.set_requires_gradient_sync(False)  # reductions are priced once per step
        model.set_reshard_after_backward(plan.zero == 3)
    batch = torch.randint(0, pf.model.vocab_size, (pf.work.global_batch, pf.work.seq_len + 1))
    (mb,) = rank_micro_batches(batch, dp=plan.dp, dp_rank=mesh.coord("dp"), cp=plan.cp,
                               cp_rank=mesh.coord("cp"), mbs=plan.mbs, device=device)

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = loss_fn(model(mb.tokens, mb.positions), mb.labels)
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1

    return run


def _slowest_median(*samples: list[float]) -> list[float]:
    """Per list of timings, the median on the slowest rank (the same on every rank)."""
    import torch
    import torch.distributed as dist

    med = torch.tensor([sorted(t)[len(t) // 2] for t in samples], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.tolist()


def pp_plan_file(micro_batches: int, processes: int) -> PlanFile:
    """tiny-dense with one layer per pipeline stage, `micro_batches` micro-batches of
    `PP_POINT`."""
    seq, mbs = PP_POINT
    model = replace(load_model("tiny-dense"), n_layers=2)
    plan = Plan.parse(f"{PP_PLAN},mbs={mbs},kernels=eager").resolve(processes)
    work = TrainWorkload(seq_len=seq, global_batch=micro_batches * mbs * plan.dp,
                         dtype="fp32")
    return PlanFile(model=model, cluster=load_cluster("cpu", gpus=processes), work=work,
                    plan=plan)


def time_pipeline_messages(pf: PlanFile, device) -> dict[str, float]:
    """Over `REPS // 2` traced steps after two warm-up steps: the median seconds a
    message takes to a receiver that waits for it (`message_latencies`), and the mean a
    receive posted after its message was sent takes (`late_receive_waits`)."""
    import torch
    import torch.distributed as dist

    from meshplan.runtime.data import rank_micro_batches
    from meshplan.runtime.mesh import build_mesh
    from meshplan.runtime.train import build, pipeline_rank

    plan = pf.plan
    mesh = build_mesh(plan, device.type)
    rank = pipeline_rank(pf, mesh, build(pf, mesh, 0, device), device)
    batch = torch.randint(0, pf.model.vocab_size, (pf.work.global_batch, pf.work.seq_len + 1))
    micro = rank_micro_batches(batch, dp=plan.dp, dp_rank=mesh.coord("dp"), cp=1, cp_rank=0,
                               mbs=plan.mbs, device=device)
    steps = []
    for rep in range(REPS // 2 + 2):
        rank.trace = []
        dist.barrier()
        rank.step(micro)
        if rep >= 2:
            steps.append([(a.kind, a.stage, a.microbatch, t0, t1) for a, t0, t1 in rank.trace])
    traces: list = [None] * dist.get_world_size()
    dist.all_gather_object(traces, steps)
    pp_ranks = [traces[mesh.pp_peer(r)] for r in range(plan.pp)]
    traced = [list(step) for step in zip(*pp_ranks, strict=True)]
    latencies = [s for step in traced for s in message_latencies(step)]
    late = [s for step in traced for s in late_receive_waits(step)]
    if not latencies or not late:
        raise RuntimeError("the traced pipeline steps need messages of both kinds: "
                           f"{len(latencies)} to a waiting receiver, {len(late)} received late")
    return {"message_s": sorted(latencies)[len(latencies) // 2],
            "late_receive_s": sum(late) / len(late)}


Trace = list[list[tuple[str, int, int, float, float]]]


def _messages(ranks: Trace) -> list[tuple[float, float, float]]:
    """(send start, receive start, receive end) of each message of one traced step.
    `ranks`: per pipeline rank, its actions as (kind, stage, micro-batch, start s, end s)
    on one clock."""
    recv = {(k, s, m): (t0, t1) for acts in ranks for k, s, m, t0, t1 in acts
            if k in ("RF", "RB")}
    out = []
    for acts in ranks:
        for k, s, m, t0, _ in acts:
            if k in ("SF", "SB"):
                got = recv.get(("RF", s + 1, m) if k == "SF" else ("RB", s - 1, m))
                if got:
                    out.append((t0, *got))
    return out


def message_latencies(ranks: Trace) -> list[float]:
    """Per message whose receiver was waiting before it was sent: seconds from the send's
    start to the receive's end."""
    return [r1 - sent for sent, r0, r1 in _messages(ranks) if r0 <= sent]


def late_receive_waits(ranks: Trace) -> list[float]:
    """Per receive posted after its message's send started: seconds from the receive's
    start to its end."""
    return [r1 - r0 for sent, r0, r1 in _messages(ranks) if sent <= r0]


def split_plan_file(seq: int) -> PlanFile:
    """One process running the chunk `time_split_backward` times, at `seq` tokens."""
    model = replace(load_model("tiny-dense"), n_layers=SPLIT_LAYERS)
    work = TrainWorkload(seq_len=seq, global_batch=1, dtype="fp32")
    return PlanFile(model=model, cluster=load_cluster("cpu", gpus=1), work=work,
                    plan=Plan.parse("mbs=1,kernels=eager").resolve(1))


def time_split_backward(device) -> dict[str, list[float]]:
    """Per sequence length of `SPLIT_SEQS`, [whole s, split s]: the backward of a middle
    stage's chunk run as one pass, and as an input pass then a weight pass, as the
    pipeline runs it under ZB-H1 and DualPipe; the slowest rank's medians, alternating."""
    runs = [_split_runner(seq, split, device) for seq in SPLIT_SEQS for split in (False, True)]
    times = [t for (t,) in _alternating(runs, REPS, device)]
    return {str(seq): times[2 * i:2 * i + 2] for i, seq in enumerate(SPLIT_SEQS)}


def _split_runner(seq: int, split: bool, device):
    import torch
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from meshplan.runtime.model import Transformer, init_weights

    spec = split_plan_file(seq).model
    chunk = Transformer(spec).to(device)
    init_weights(chunk, 0)
    chunk.tok_embeddings = chunk.norm = chunk.output = None  # a middle stage
    pos = torch.arange(seq, device=device)

    def run() -> tuple[float]:
        x = torch.randn(1, seq, spec.hidden_size, device=device, requires_grad=True)
        out = chunk(x, pos)
        grad = torch.ones_like(out)
        t0 = time.perf_counter()
        if split:
            _, groups = stage_backward_input([out], [grad], [x], chunk.parameters())
            stage_backward_weight(chunk.parameters(), groups)
        else:
            torch.autograd.backward(out, grad)
        return (time.perf_counter() - t0,)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="meshplan.validate.mechbench")
    p.add_argument("out")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: {', '.join(unknown)} unknown; parts are {', '.join(PARTS)}")
    import torch  # the worker needs torch; `plan_file` (used by the fit) does not
    import torch.distributed as dist

    from .commbench import run_worker

    torch.set_num_threads(1)
    device = torch.device("cpu")

    def record() -> dict:
        n = dist.get_world_size()
        out: dict = {}
        for mech in (m for m in MECHANISMS if m in parts):
            for seq, mbs in MECH_POINTS:
                one, three = time_layers([plan_file(mech, layers, n, seq, mbs)
                                          for layers in (1, 3)], device)
                out.setdefault(mech, {})[point_key(seq, mbs)] = {"1": one, "3": three}
        if "pp" in parts:
            out["pp"] = time_pipeline_messages(pp_plan_file(PP_MICRO_BATCHES, n), device)
        if "split_w" in parts:
            out["split_w"] = time_split_backward(device)
        return out

    run_worker(a.out, "gloo", record)


if __name__ == "__main__":
    main()
