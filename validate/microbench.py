"""Microbenchmarks of this machine for `meshplan profile` (torch; one process).

Each function times one kind of kernel over a sweep of sizes and returns plain rows;
`profile.py` fits them into a hardware profile. Times are medians of repeats that run at
least `min_s` in all (CUDA: synchronized before and after each call).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from meshplan.runtime.measure import sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



def private_cache_bytes(device: torch.device) -> int:
    """The cache a benchmark loop keeps its operands in that a training step does not:
    one CPU core's L2 (Linux sysfs) or the GPU's L2. Between two uses of a tensor a
    training step streams far more than this through it (the rest of the layer, the other
    layers, the other micro-batches), so in a step every kernel finds its operands outside
    it; a loop that calls one kernel on the same tensors finds them inside."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")):
        if (index / "level").read_text().strip() == "2":
            return _parse_size((index / "size").read_text().strip())
    raise RuntimeError(f"cannot find this CPU's L2 size under {root}")


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


class Scrub:
    """Evicts the private cache before a timed call by writing twice its size (as
    `triton.testing.do_bench` clears the GPU's L2 between runs); the write is not timed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buf = torch.empty(2 * private_cache_bytes(device) // 4, device=device)

    def __call__(self) -> None:
        self.buf.zero_()
        sync(self.device)


def time_s(fn: Callable[[], object], device: torch.device, min_s: float = 0.02,
           min_reps: int = 3, max_reps: int = 200, scrub: Scrub | None = None) -> float:
    """Median seconds of one call of `fn` (after one warm-up call), each call after
    `scrub` when given (the operands then come from beyond the private cache). Calls
    repeat until `min_s` of wall time, scrubs included, or `max_reps`."""
    return alternating_time_s([fn], device, min_s, min_reps, max_reps, scrub)[0]


def alternating_time_s(fns: list[Callable[[], object]], device: torch.device,
                       min_s: float = 0.04, min_reps: int = 3, max_reps: int = 200,
                       scrub: Scrub | None = None) -> list[float]:
    """Median seconds of one call of each of `fns`, their calls alternating (each after
    `scrub` when given) so that a drift of the machine falls on all of them alike: what
    differences of these times (a backward as forward+backward less forward, a layer as
    3 layers less 1) need."""
    return [statistics.median(t)
            for t in _timed_calls(fns, device, min_s, min_reps, max_reps, scrub)]


def mean_time_s(fn: Callable[[], object], device: torch.device, min_s: float = 0.3,
                scrub: Scrub | None = None) -> float:
    """Mean seconds of one call over calls for at least `min_s` of wall time, each after
    `scrub` when given (untimed). Unlike the median, the mean sees time-slicing when
    processes share cores: a call that is preempted counts its wait."""
    return statistics.fmean(_timed_calls([fn], device, min_s, 4, sys.maxsize, scrub)[0])


def _timed_calls(fns: list[Callable[[], object]], device: torch.device, min_s: float,
                 min_reps: int, max_reps: int, scrub: Scrub | None) -> list[list[float]]:
    """Seconds of each call of each of `fns` (after one warm-up call each), in turns,
    until `min_s` of wall time (scrubs included) or `max_reps` turns, at least `min_reps`;
    `scrub`, when given, runs untimed before every call."""
    for fn in fns:
        fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or (time.perf_counter() - start < min_s
                                       and len(times[0]) < max_reps):
        for fn, out in zip(fns, times, strict=True):
            if scrub is not None:
                scrub()
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return times


def gemm_rows(sizes: Iterable[int], dtypes: Iterable[str], device: torch.device,
              max_flops: float, progress=None) -> list[list]:
    """[dtype, m, n, k, seconds] for every m, n, k in `sizes` (x @ w.T, as nn.Linear does)."""
    rows, scrub = [], Scrub(device)
    sizes = list(sizes)
    for dtype in dtypes:
        dt = DTYPES[dtype]
        for m in sizes:
            for n in sizes:
                for k in sizes:
                    if progress:
                        progress()
                    if 2.0 * m * n * k > max_flops:
                        continue
                    a = torch.randn(m, k, device=device, dtype=dt)
                    b = torch.randn(n, k, device=device, dtype=dt)
                    rows.append([dtype, m, n, k, time_s(lambda a=a, b=b: a @ b.t(), device,
                                                             scrub=scrub)])
    return rows


def attention_rows(seqs: Iterable[int], head_dims: Iterable[int], dtypes: Iterable[str],
                   device: torch.device, heads: int = 4, max_flops: float = 2e9,
                   say: Callable[[str], None] | None = None) -> list[list]:
    """[dtype, seq, head_dim, flops, forward s, backward s] of causal SDPA, batch 1."""
    from .profile import backward_s

    rows, scrub = [], Scrub(device)
    for dtype in dtypes:
        for d in head_dims:
            for s in seqs:
                flops = 2 * 2 * heads * s * s * d / 2  # QK^T and PV, causal half
                if flops > max_flops:
                    continue
                q, k, v = (torch.randn(1, heads, s, d, device=device, dtype=DTYPES[dtype],
                                       requires_grad=True) for _ in range(3))

                def fwd(q=q, k=k, v=v):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                grad = torch.ones_like(fwd())
                f_s, both = alternating_time_s(
                    [fwd, lambda grad=grad, q=q, k=k, v=v: torch.autograd.grad(
                        fwd(q, k, v), (q, k, v), grad)], device, scrub=scrub)
                rows.append([dtype, s, d, flops, f_s, backward_s(
                    both, f_s, f"attention ({dtype}, seq {s}, head dim {d})", say)])
    return rows


def memory_rows(sizes_bytes: Iterable[int], device: torch.device) -> list[list]:
    """[bytes moved, seconds] of an out-of-place fp32 add (reads 2 x, writes 1 x)."""
    rows, scrub = [], Scrub(device)
    for nbytes in sizes_bytes:
        n = max(1, nbytes // 12)
        a, b = torch.randn(n, device=device), torch.randn(n, device=device)
        out = torch.empty_like(a)
        rows.append([12 * n, time_s(lambda a=a, b=b, out=out: torch.add(a, b, out=out),
                                    device, scrub=scrub)])
    return rows


def host_copy_rows(sizes_bytes: Iterable[int], device: torch.device) -> list[list]:
    """[bytes, host->device s, device->host s] with pinned host memory (CUDA only)."""
    rows = []
    for nbytes in sizes_bytes:
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        h2d = time_s(lambda d=dev, h=host: d.copy_(h, non_blocking=True), device)
        d2h = time_s(lambda d=dev, h=host: h.copy_(d, non_blocking=True), device)
        rows.append([nbytes, h2d, d2h])
    return rows


def optimizer_rows(name: str, device: torch.device) -> list[list]:
    """[tensors, parameters, seconds] of one torch.optim step (as the runtime makes it)."""
    rows, scrub = [], Scrub(device)
    for tensors in (4, 32):
        for size in (1_000, 100_000, 1_000_000):
            params = [torch.nn.Parameter(torch.randn(size, device=device))
                      for _ in range(tensors)]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = (torch.optim.SGD(params, lr=1e-3, momentum=0.9) if name == "sgd"
                   else torch.optim.Adam(params, lr=1e-3))
            rows.append([tensors, tensors * size, time_s(opt.step, device, scrub=scrub)])
    return rows


def scheduler_slice_s(processes: int, seconds: float = 1.0, gap_s: float = 50e-6) -> float:
    """How long the kernel lets a busy process run before giving its core to another
    waiting: `processes` (more than the cores) spin for `seconds`, each noting the
    stretches it ran unbroken (a clock step over `gap_s` means it was off its core); the
    median stretch. On this VM (2 cores, 4 processes) every quartile was 3.98 ms: a
    250 Hz tick."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter each: no torch threads to fork
    with ctx.Pool(processes) as pool:
        runs = pool.map(_spin, [(seconds, gap_s)] * processes)
    stretches = [r for per in runs for r in per if r > 0]
    if not stretches:
        raise RuntimeError(f"{processes} spinning processes were never preempted in "
                           f"{seconds} s: more cores than processes?")
    return statistics.median(stretches)


def _spin(args: tuple[float, float]) -> list[float]:
    seconds, gap_s = args
    start = last = t0 = time.perf_counter()
    out = []
    while last - t0 < seconds:
        t = time.perf_counter()
        if t - last > gap_s:
            out.append(last - start)
            start = t
        last = t
    return out
