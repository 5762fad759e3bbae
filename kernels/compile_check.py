"""Compile every kernel ahead of time for GPU targets, without a GPU.

The interpreter checks what a kernel computes but not that it lowers: a construct the
interpreter accepts can still fail in Triton's GPU compiler. Triton compiles for a named
target (`GPUTarget`) with the ptxas its wheel carries, so this runs on any Linux machine.

Usage: python -m meshplan.kernels.compile_check [--arch 90,80]
(with TRITON_INTERPRET unset: the interpreter replaces the kernels' compiled form).
"""

from __future__ import annotations

import argparse
import sys
import time

from . import cross_entropy as ce
from . import grouped_gemm as gg
from . import permute as pm
from . import rmsnorm as rn
from . import swiglu as sw
from .launch import INTERPRET, triton

P16, P32, I64 = "*bf16", "*fp32", "*i64"


def _sig(**kinds: str) -> dict[str, str]:
    return kinds


def _gmm_sig(ptr: str) -> dict[str, str]:
    return _sig(x_ptr=ptr, b_ptr=ptr, out_ptr=ptr, tile_group_ptr="*i32", tile_row_ptr="*i32",
                group_end_ptr="*i32", n="i32", k="i32", stride_bg="i32", stride_bk="i32",
                stride_bn="i32")


# (name, kernel, signature, constexprs, launch options): the launches the wrappers make
CASES = [
    ("rmsnorm_fwd", rn._rmsnorm_fwd,
     _sig(x_ptr=P16, w_ptr=P16, y_ptr=P16, rstd_ptr=P32, rows="i32", cols="i32", eps="fp32",
          rows_per_prog="i32"), {"BLOCK": 8192}, {"num_warps": 16}),
    ("rmsnorm_bwd", rn._rmsnorm_bwd,
     _sig(x_ptr=P16, w_ptr=P16, dy_ptr=P16, rstd_ptr=P32, dx_ptr=P16, dw_ptr=P32,
          rows="i32", cols="i32", rows_per_prog="i32"), {"BLOCK": 8192}, {"num_warps": 16}),
    ("swiglu_fwd", sw._swiglu_fwd, _sig(a_ptr=P16, b_ptr=P16, y_ptr=P16, n="i32"),
     {"BLOCK": sw.BLOCK}, {}),
    ("swiglu_bwd", sw._swiglu_bwd,
     _sig(a_ptr=P16, b_ptr=P16, dy_ptr=P16, da_ptr=P16, db_ptr=P16, n="i32"),
     {"BLOCK": sw.BLOCK}, {}),
    ("cross_entropy_fwd", ce._ce_fwd,
     _sig(logits_ptr=P16, labels_ptr=I64, loss_ptr=P32, lse_ptr=P32, stride="i32",
          vocab="i32", ignore_index="i32"), {"BLOCK": ce.BLOCK_V}, {"num_warps": 8}),
    ("cross_entropy_bwd", ce._ce_bwd,
     _sig(logits_ptr=P16, grad_ptr=P16, labels_ptr=I64, lse_ptr=P32, scale_ptr=P32,
          stride="i32", vocab="i32", ignore_index="i32"), {"BLOCK": ce.BLOCK_V},
     {"num_warps": 8}),
    ("permute", pm._permute, _sig(x_ptr=P16, dest_ptr=I64, out_ptr=P16, hidden="i32"),
     {"K": 8, "BLOCK": pm.BLOCK_H}, {}),
    ("unpermute", pm._unpermute,
     _sig(rows_ptr=P16, dest_ptr=I64, w_ptr=P32, out_ptr=P32, hidden="i32"),
     {"K": 8, "WEIGHTED": True, "BLOCK": pm.BLOCK_H}, {}),
    ("unpermute_bwd", pm._unpermute_bwd,
     _sig(rows_ptr=P16, dest_ptr=I64, w_ptr=P32, g_ptr=P32, grows_ptr=P16, gw_ptr=P32,
          hidden="i32"), {"K": 8, "BLOCK": pm.BLOCK_H}, {}),
    ("grouped_mm", gg._gmm, _gmm_sig(P16),
     {"BM": 128, "BN": 128, "BK": 64, "DOT_F32": False, "PRECISION": "tf32"},
     {"num_warps": 8, "num_stages": 3}),
    ("grouped_mm_fp32", gg._gmm, _gmm_sig(P32),
     {"BM": 128, "BN": 64, "BK": 64, "DOT_F32": False, "PRECISION": "ieee"},
     {"num_warps": 8, "num_stages": 3}),
    ("grouped_mm_wgrad", gg._gmm_wgrad,
     _sig(dy_ptr=P16, x_ptr=P16, dw_ptr=P16, group_start_ptr="*i32", group_end_ptr="*i32",
          n="i32", k="i32", stride_wg="i32", stride_wn="i32", stride_wk="i32"),
     {"BM": 64, "BN": 128, "BK": 64, "DOT_F32": False, "PRECISION": "tf32"},
     {"num_warps": 8, "num_stages": 3}),
]


def compile_all(archs: list[int], say=print) -> list[str]:
    """Compile every case for every `sm_<arch>`; returns the failures, one line each."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, consts, opts in CASES:
            t0 = time.perf_counter()
            try:
                src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                                constexprs=consts)
                kernel = triton.compile(src, target=target, options=opts)
                size, took = len(kernel.asm["cubin"]), time.perf_counter() - t0
                say(f"sm_{arch} {name:20s} ok   {size:7d} B cubin  {took:5.1f} s")
            except Exception as err:  # noqa: BLE001 - every compiler error is a finding
                line = f"sm_{arch} {name}: {type(err).__name__}: {str(err).splitlines()[0]}"
                failures.append(line)
                say(line)
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80")
    a = p.parse_args(argv)
    if triton is None or INTERPRET:
        print("compile_check: error: needs triton installed and TRITON_INTERPRET unset",
              file=sys.stderr)
        return 2
    failures = compile_all([int(x) for x in a.arch.split(",")])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
