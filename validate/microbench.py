"""Microbenchmarks of this machine for `meshplan profile` (torch; one process).

Each function times one kind of kernel over a sweep of sizes and returns plain rows;
`profile.py` fits them into a hardware profile. Times are medians of repeats that run at
least `min_s` in all (CUDA: synchronized before and after each call).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from meshplan.runtime.measure import sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



def time_s(fn: Callable[[], object], device: torch.device, min_s: float = 0.02,
           min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds of one call of `fn` (after one warm-up call)."""
    fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < min_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


def throughput_time_s(fn: Callable[[], object], device: torch.device,
                      min_s: float = 0.3) -> float:
    """Mean seconds per call over calls back to back for at least `min_s`. Unlike the
    median of single calls, this sees time-slicing when processes share cores."""
    fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls % 4 == 0:
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                return elapsed / calls


def gemm_rows(sizes: Iterable[int], dtypes: Iterable[str], device: torch.device,
              max_flops: float, progress=None) -> list[list]:
    """[dtype, m, n, k, seconds] for every m, n, k in `sizes` (x @ w.T, as nn.Linear does)."""
    rows = []
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
                    rows.append([dtype, m, n, k, time_s(lambda a=a, b=b: a @ b.t(), device)])
    return rows


def attention_rows(seqs: Iterable[int], head_dims: Iterable[int], dtypes: Iterable[str],
                   device: torch.device, heads: int = 4, max_flops: float = 2e9) -> list[list]:
    """[dtype, seq, head_dim, flops, forward s, backward s] of causal SDPA, batch 1."""
    rows = []
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

                out = fwd()
                grad = torch.ones_like(out)
                f_s = time_s(fwd, device)
                both = time_s(lambda out=out, grad=grad, q=q, k=k, v=v: torch.autograd.grad(
                    fwd(q, k, v), (q, k, v), grad), device)
                rows.append([dtype, s, d, flops, f_s, max(both - f_s, 0.0)])
    return rows


def memory_rows(sizes_bytes: Iterable[int], device: torch.device) -> list[list]:
    """[bytes moved, seconds] of an out-of-place fp32 add (reads 2 x, writes 1 x)."""
    rows = []
    for nbytes in sizes_bytes:
        n = max(1, nbytes // 12)
        a, b = torch.randn(n, device=device), torch.randn(n, device=device)
        out = torch.empty_like(a)
        rows.append([12 * n, time_s(lambda a=a, b=b, out=out: torch.add(a, b, out=out),
                                    device)])
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
    rows = []
    for tensors in (4, 32):
        for size in (1_000, 100_000, 1_000_000):
            params = [torch.nn.Parameter(torch.randn(size, device=device))
                      for _ in range(tensors)]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = (torch.optim.SGD(params, lr=1e-3, momentum=0.9) if name == "sgd"
                   else torch.optim.Adam(params, lr=1e-3))
            rows.append([tensors, tensors * size, time_s(opt.step, device)])
    return rows
