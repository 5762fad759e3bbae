"""Collective and shared-machine benchmarks, one process per device under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node N \
        -m meshplan.validate.commbench OUT.json --sizes 4096,65536 --device cpu

Times all-reduce, all-gather, reduce-scatter and all-to-all over sizes (the slowest rank's
mean over a fixed number of repeats, the same on every rank), p2p as half a ping-pong
between ranks 0 and 1, a ring shift (every rank sending to the next at once), the GEMMs
of `CONCURRENT_GEMMS` run by every rank at once, to measure how much compute slows when
N processes share the machine, how much compute slows while its own rank
communicates, and how much of a core a rank's communication keeps busy. Rank 0 writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from meshplan.runtime.measure import sync

from .microbench import Scrub, mean_time_s

CONCURRENT_GEMMS = ((256, 384, 128), (512, 512, 512), (1024, 128, 512), (128, 1024, 256))


def _reps(nbytes: int) -> int:
    return max(3, min(50, int(2e7 // max(nbytes, 100_000))))


def _timed(fn, reps: int, device: torch.device) -> float:
    """Slowest rank's mean seconds per call."""
    fn()
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    t = torch.tensor([(time.perf_counter() - t0) / reps], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()



def collective_rows(sizes: list[int], device: torch.device) -> list[list]:
    """[op, bytes, seconds]; bytes is the full (gathered) buffer, as in NCCL's tests."""
    rows = []
    for nbytes in sizes:
        full, out, ops = _collectives(nbytes, device)
        count = full.numel()
        for op, fn in ops.items():
            rows.append([op, 4 * count, _timed(fn, _reps(4 * count), device)])
        rows.append(["p2p", 4 * count, _ping_pong(full, _reps(4 * count), device)])
        rows.append(["ring_shift", 4 * count,
                     _timed(lambda full=full, out=out: _ring_shift(full, out),
                            _reps(4 * count), device)])
    return rows


def _collectives(nbytes: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A full fp32 buffer of about `nbytes` (a whole number of elements per rank, at least
    one), an output buffer as large, and a call per collective on them: op -> call."""
    n = dist.get_world_size()
    count = max(n, nbytes // 4 // n * n)
    full = torch.randn(count, device=device)
    part = torch.empty(count // n, device=device)
    out = torch.empty_like(full)
    return full, out, {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: dist.all_gather_into_tensor(out, part),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
        "all_to_all": lambda: dist.all_to_all_single(out, full),
    }


def _ring_shift(buf: torch.Tensor, out: torch.Tensor) -> None:
    """Every rank sends `buf` to the next rank and receives the previous rank's into
    `out`, all at once: one hop of ring attention."""
    n, me = dist.get_world_size(), dist.get_rank()
    for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, buf, (me + 1) % n),
                                        dist.P2POp(dist.irecv, out, (me - 1) % n)]):
        work.wait()


def _ping_pong(buf: torch.Tensor, reps: int, device: torch.device) -> float:
    """One-way seconds of a send from rank 0 to rank 1 (half the round trip)."""
    me = dist.get_rank()

    def once() -> None:
        if me == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif me == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)

    return _timed(once, reps, device) / 2


def concurrent_gemm_rows(device: torch.device, rounds: int = 3) -> list[list]:
    """[m, n, k, together s, alone s] of fp32 GEMMs timed on every rank at once and on
    rank 0 alone (the other ranks waiting in a barrier), the two alternating `rounds`
    times so that a drift of the machine falls on both alike: medians over the rounds,
    `together` averaged over the ranks."""
    rows, scrub = [], Scrub(device)
    first = dist.get_rank() == 0
    for m, n, k in CONCURRENT_GEMMS:
        a, b = torch.randn(m, k, device=device), torch.randn(n, k, device=device)

        def gemm_s(a=a, b=b) -> float:
            return mean_time_s(lambda: a @ b.t(), device, min_s=0.15, scrub=scrub)

        together, alone = [], []
        for _ in range(rounds):
            dist.barrier()
            if first:
                alone.append(gemm_s())
            dist.barrier()
            together.append(gemm_s())
        t = torch.tensor([statistics.median(together),
                          statistics.median(alone) if first else 0.0],
                         dtype=torch.float64, device=device)
        dist.all_reduce(t)
        rows.append([m, n, k, t[0].item() / dist.get_world_size(), t[1].item()])
    return rows


def overlap_slowdown(device: torch.device, nbytes: int = 4 * 2**20, reps: int = 5) -> float:
    """How much slower a GEMM loop runs while all-reduces are in flight on the same rank
    (the event engine's `overlap_slowdown`): the loop alone, then again after queueing
    enough all-reduces of `nbytes` to outlast it (the same count on every rank); the
    slowest rank's ratio, median of `reps`."""
    a = torch.randn(512, 512, device=device)
    buf = torch.randn(nbytes // 4, device=device)

    def loop() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(40):
            a @ a
        sync(device)
        return time.perf_counter() - t0

    alone = loop()
    one = _timed(lambda: dist.all_reduce(buf), 3, device)
    count = torch.tensor([2.0 * alone / one + 1], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    ratios = []
    for _ in range(reps):
        dist.barrier()
        alone = loop()
        dist.barrier()
        works = [dist.all_reduce(buf, async_op=True) for _ in range(int(count.item()))]
        ratios.append(loop() / alone)
        for w in works:
            w.wait()
    ratio = torch.tensor([sorted(ratios)[reps // 2]], dtype=torch.float64, device=device)
    dist.all_reduce(ratio, op=dist.ReduceOp.MAX)
    return ratio.item() - 1.0


def comm_core_share(device: torch.device, sizes: tuple[int, ...] = (2**18, 2**20),
                    reps: int = 10) -> float:
    """Cores one process keeps busy while its collectives run and it computes nothing:
    the process's CPU time (every thread's, gloo's transport threads included) over the
    wall time of `reps` all-reduces, all-gathers and all-to-alls of each of `sizes`
    bytes, the mean over the ranks. On this VM's loopback, 2 ranks: 0.56-0.87 of a core
    (the copies and polling of a fast link), throttled to 1 Gbit/s 0.08-0.16 (waiting)."""
    calls = [ops[op] for ops in (_collectives(b, device)[2] for b in sizes)
             for op in ("all_reduce", "all_gather", "all_to_all")]
    for call in calls:  # warm-up: connections and buffers set up outside the timing
        call()
    sync(device)
    dist.barrier()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(reps):
        for call in calls:
            call()
    sync(device)
    share = torch.tensor([(time.process_time() - cpu0) / (time.perf_counter() - wall0)],
                         dtype=torch.float64, device=device)
    dist.all_reduce(share)
    return share.item() / dist.get_world_size()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="meshplan.validate.commbench")
    p.add_argument("out")
    p.add_argument("--sizes", required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-gemm", action="store_true",
                   help="skip the shared-compute GEMMs (more processes than cores: the cost "
                   "model takes the fair share instead)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    sizes = [int(s) for s in a.sizes.split(",")]
    run_worker(a.out, "nccl" if a.device == "cuda" else "gloo", lambda: {
        "processes": dist.get_world_size(), "collectives": collective_rows(sizes, device),
        "gemm": [] if a.no_gemm else concurrent_gemm_rows(device),
        "overlap_slowdown": overlap_slowdown(device),
        "comm_core_share": comm_core_share(device)})


def run_worker(out: str, backend: str, record) -> None:
    """Join the torchrun job, build the record on every rank, rank 0 writes it as JSON
    (whole or not at all: written beside `out`, then renamed)."""
    dist.init_process_group(backend)
    try:
        rec = record()
        if dist.get_rank() == 0:
            with open(f"{out}.part", "w") as f:
                json.dump(rec, f)
            os.replace(f"{out}.part", out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
