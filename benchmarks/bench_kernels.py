"""Our Triton kernels against the eager torch reference and torch.compile of it.

Run on a GPU: python benchmarks/bench_kernels.py [--out kernels.json] [--dtype bf16]
For each kernel and shape it times forward and forward+backward (median of repeats after
warm-up, CUDA-synchronised), and prints achieved bytes/s (memory-bound kernels, by the
cost model's nominal bytes for the op) or FLOP/s (grouped GEMM, beside a dense cuBLAS
GEMM of the same FLOPs), the speed-up over eager, and for the cross-entropy the peak
memory above the inputs. The backward time is forward+backward less forward, recorded as
0 where timing noise makes that difference negative (tiny shapes). The JSON table holds
every row, plus an `elementwise` section in the hardware profile's layout (dtype ->
cost-model op name -> [nominal bytes, forward s, backward s]) that `meshplan profile
--kernel-table kernels.json` merges, so that the calibrated cost model prices those ops
at the measured kernels.

`--quick` runs tiny shapes; with TRITON_INTERPRET=1 on a CPU it checks the script runs
(the interpreter's times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from meshplan.kernels import cross_entropy as ce
from meshplan.kernels import grouped_gemm as gg
from meshplan.kernels import permute as pm
from meshplan.kernels.launch import can_run
from meshplan.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from meshplan.kernels.swiglu import swiglu, swiglu_reference

FORMAT = "meshplan-kernel-table"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shapes: Llama-3 8B/70B/405B widths and DeepSeek-V3 / Mixtral MoE layers, per GPU.
FULL = {
    "rmsnorm": [(t, h) for t in (4096, 16384) for h in (4096, 8192, 16384)],
    "swiglu": [(t, f) for t in (4096, 16384) for f in (3584, 14336, 28672)],
    "permute": [(t, h, e, k) for t in (4096, 16384) for h, e, k in
                ((4096, 8, 2), (7168, 256, 8))],
    "grouped_mm": [(e, m, n, k) for e, m in ((8, 4096), (64, 512), (32, 2048)) for n, k in
                   ((14336, 4096), (4096, 14336), (4096, 7168), (7168, 2048))],
    "cross_entropy": [(t, v) for t in (4096, 8192) for v in (32000, 128256)],
}
QUICK = {"rmsnorm": [(64, 256)], "swiglu": [(64, 256)], "permute": [(32, 64, 4, 2)],
         "grouped_mm": [(4, 32, 64, 64)], "cross_entropy": [(16, 1000)]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `fn` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory above what was allocated before `fn` ran."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def impls(triton_fn, reference, device: str, compile_ref: bool) -> dict[str, Callable]:
    out = {"triton": triton_fn, "eager": reference}
    if compile_ref and device == "cuda":
        out["compile"] = torch.compile(reference)
    return out


def measure(kernel: str, shape: tuple, make: Callable, funcs: dict[str, Callable],
            nominal_bytes: float, flops: float, device: str, repeats: int) -> list[dict]:
    """Rows for each implementation: forward, forward+backward, rates, peak memory."""
    rows = []
    for impl, fn in funcs.items():
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(*make(False))

        def both(fn=fn):
            args = make(True)
            out = fn(*args)
            out.float().sum().backward() if out.dim() else out.backward()

        f_s, fb_s = timed(fwd, device, repeats), timed(both, device, repeats)
        rows.append({
            "kernel": kernel, "impl": impl, "shape": list(shape), "fwd_s": f_s,
            "fwd_bwd_s": fb_s, "bwd_s": max(fb_s - f_s, 0.0), "nominal_bytes": nominal_bytes,
            "bytes_per_s": 3 * nominal_bytes / fb_s if nominal_bytes else None,
            "flops": flops, "flops_per_s": 3 * flops / fb_s if flops else None,
            "peak_bytes": peak_bytes(both, device)})
    return rows


def _inputs(device: str, dtype: torch.dtype, *shapes, grad: bool) -> list[torch.Tensor]:
    return [torch.randn(*s, device=device, dtype=dtype).requires_grad_(grad) for s in shapes]


def bench_rmsnorm(shape, device, dtype, compile_ref, repeats) -> list[dict]:
    t, h = shape
    x, w = _inputs(device, dtype, (t, h), (h,), grad=False)

    def make(grad):
        return x.detach().requires_grad_(grad), w.detach().requires_grad_(grad), 1e-5

    funcs = impls(rmsnorm, rmsnorm_reference, device, compile_ref)
    return measure("rmsnorm", shape, make, funcs, 2 * t * h * x.element_size(), 0.0,
                   device, repeats)


def bench_swiglu(shape, device, dtype, compile_ref, repeats) -> list[dict]:
    t, f = shape
    a, b = _inputs(device, dtype, (t, f), (t, f), grad=False)

    def make(grad):
        return a.detach().requires_grad_(grad), b.detach().requires_grad_(grad)

    funcs = impls(swiglu, swiglu_reference, device, compile_ref)
    return measure("swiglu", shape, make, funcs, 3 * t * f * a.element_size(), 0.0,
                   device, repeats)


def bench_permute(shape, device, dtype, compile_ref, repeats) -> list[dict]:
    """permute, then unpermute with weights (dispatch and combine around the experts)."""
    t, h, e, k = shape
    (x,) = _inputs(device, dtype, (t, h), grad=False)
    ids = torch.rand(t, e, device=device).argsort(dim=1)[:, :k]  # k distinct experts a token
    w = torch.rand(t, k, device=device, dtype=dtype)
    dest, _ = pm.routing_order(ids, e)

    def make(grad):
        return x.detach().requires_grad_(grad), w.detach().requires_grad_(grad)

    def ours(x, w):
        return pm.unpermute(pm.permute(x, dest, k), dest, w)

    def eager(x, w):
        return pm.unpermute_reference(pm.permute_reference(x, dest, k), dest, w)

    funcs = impls(ours, eager, device, compile_ref)
    # the cost model's permute + unpermute: 2 * routed * h * bytes each
    return measure("permute", shape, make, funcs, 4 * t * k * h * x.element_size(), 0.0,
                   device, repeats)


def bench_grouped_mm(shape, device, dtype, compile_ref, repeats) -> list[dict]:
    """Balanced loads: every expert gets m rows. 'dense' is one cuBLAS GEMM of the same
    FLOPs ([e*m, k] @ [k, n])."""
    e, m, n, k = shape
    x, w = _inputs(device, dtype, (e * m, k), (e, n, k), grad=False)
    counts = [m] * e
    dense_w = w[0].detach().clone().requires_grad_()

    def make(grad):
        return x.detach().requires_grad_(grad), w.detach().requires_grad_(grad)

    funcs = {"triton": lambda x, w: gg.grouped_mm(x, w, counts),
             "eager": lambda x, w: gg.grouped_mm_reference(x, w, counts),
             "dense": lambda x, w: x @ dense_w.t()}
    return measure("grouped_mm", shape, make, funcs, 0.0, 2.0 * e * m * n * k, device,
                   repeats)


def bench_cross_entropy(shape, device, dtype, compile_ref, repeats) -> list[dict]:
    """Loss from logits [t, v] (the runtime's case) and the fused linear form from hidden
    states [t, 4096] (no logits at all beyond one chunk)."""
    t, v = shape
    (logits,) = _inputs(device, dtype, (t, v), grad=False)
    labels = torch.randint(0, v, (t,), device=device)

    def make(grad):
        return logits.detach().clone().requires_grad_(grad), labels

    funcs = impls(lambda z, y: ce.cross_entropy(z, y, inplace_backward=True),
                  ce.cross_entropy_reference, device, compile_ref)
    nominal = t * v * (logits.element_size() + 2 * 4)  # costmodels.flops.head_ops
    rows = measure("cross_entropy", shape, make, funcs, nominal, 0.0, device, repeats)
    h = 4096 if device == "cuda" else 64
    hid, w = _inputs(device, dtype, (t, h), (v, h), grad=False)

    def make_linear(grad):
        return hid.detach().requires_grad_(grad), w.detach().requires_grad_(grad), labels

    linear = {"triton": lambda a, b, y: ce.linear_cross_entropy(a, b, y, chunk_rows=1024),
              "eager": ce.linear_cross_entropy_reference}
    rows += measure("linear_cross_entropy", (t, v, h), make_linear, linear, 0.0,
                    6.0 * t * v * h, device, repeats)
    return rows


BENCHES = {"rmsnorm": bench_rmsnorm, "swiglu": bench_swiglu, "permute": bench_permute,
           "grouped_mm": bench_grouped_mm, "cross_entropy": bench_cross_entropy}
# cost-model op names (costmodels.flops) each kernel's rows price in a hardware profile
PROFILE_OPS = {"rmsnorm": ("attn_norm", "mlp_norm", "final_norm"),
               "swiglu": ("mlp_swiglu", "experts_swiglu", "shared_swiglu"),
               "cross_entropy": ("cross_entropy",)}


def elementwise_section(rows: list[dict], dtype: str) -> dict:
    """The Triton rows in the profile's `elementwise` layout. The nominal bytes of a shape
    are the op's forward bytes; the backward time is the forward+backward time less the
    forward."""
    table: dict[str, list] = {}
    for r in rows:
        if r["impl"] != "triton" or r["kernel"] not in PROFILE_OPS:
            continue
        for op in PROFILE_OPS[r["kernel"]]:
            table.setdefault(op, []).append([r["nominal_bytes"], r["fwd_s"], r["bwd_s"]])
    return {dtype: table}


def report(rows: list[dict]) -> str:
    lines = [f"{'kernel':22s} {'shape':26s} {'impl':8s} {'fwd ms':>8s} {'f+b ms':>8s} "
             f"{'GB/s':>8s} {'TFLOP/s':>8s} {'vs eager':>8s} {'peak MiB':>9s}"]
    eager = {(r["kernel"], tuple(r["shape"])): r["fwd_bwd_s"] for r in rows
             if r["impl"] == "eager"}
    for r in rows:
        base = eager.get((r["kernel"], tuple(r["shape"])))
        gbs = f"{r['bytes_per_s'] / 1e9:8.0f}" if r["bytes_per_s"] else f"{'':8s}"
        tfs = f"{r['flops_per_s'] / 1e12:8.1f}" if r["flops_per_s"] else f"{'':8s}"
        peak = f"{r['peak_bytes'] / 2**20:9.0f}" if r["peak_bytes"] is not None else ""
        lines.append(f"{r['kernel']:22s} {str(tuple(r['shape'])):26s} {r['impl']:8s} "
                     f"{r['fwd_s'] * 1e3:8.3f} {r['fwd_bwd_s'] * 1e3:8.3f} {gbs} {tfs} "
                     f"{base / r['fwd_bwd_s']:7.2f}x {peak}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="kernels.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", default=",".join(BENCHES), help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    a = p.parse_args(argv)
    probe = torch.ones(1, device=a.device)
    if not can_run(probe):
        print(f"bench_kernels: error: Triton cannot run on {a.device} here (needs CUDA, or "
              "TRITON_INTERPRET=1 on a CPU)", file=sys.stderr)
        return 2
    shapes = QUICK if a.quick else FULL
    rows = []
    for name in a.kernels.split(","):
        if name not in BENCHES:
            print(f"bench_kernels: error: unknown kernel {name!r} (one of {sorted(BENCHES)})",
                  file=sys.stderr)
            return 2
        for shape in shapes[name]:
            rows += BENCHES[name](shape, a.device, DTYPES[a.dtype], not a.no_compile,
                                  a.repeats)
    device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (interpreted)"
    table = {"format": FORMAT, "version": 1, "device": device, "dtype": a.dtype,
             "rows": rows, "elementwise": elementwise_section(rows, a.dtype)}
    with open(a.out, "w") as f:
        json.dump(table, f, indent=1)
    print(report(rows))
    print(f"\ntable written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
