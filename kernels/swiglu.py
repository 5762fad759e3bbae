"""Fused SwiGLU activation (Shazeer 2020, eq. 6): y = silu(a) * b, a and b the gate and up
projections.

Eager PyTorch writes silu(a) to memory and reads it back for the product (10 bytes per
element in 16-bit against 6 fused, `costmodels.flops.EAGER_TRAFFIC`) and saves it for
the backward. This kernel reads a and b once and writes y; its backward recomputes the
sigmoid from a:
    da = dy * b * s * (1 + a * (1 - s)),  db = dy * a * s,  s = sigmoid(a).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch import can_run, jit, require, tl

BLOCK = 1024


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


@jit
def _swiglu_fwd(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = a * tl.sigmoid(a)
    # round silu(a) to the input dtype first, as the eager pair of kernels does
    y = silu.to(y_ptr.dtype.element_ty).to(tl.float32) * b
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd(a_ptr, b_ptr, dy_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * a * s
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(a)
        n = a.numel()
        _swiglu_fwd[(_blocks(n),)](a, b, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        _swiglu_bwd[(_blocks(n),)](a, b, dy.contiguous(), da, db, n, BLOCK=BLOCK)
        return da, db


def _blocks(n: int) -> int:
    return max(1, -(-n // BLOCK))


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for same-shaped, same-dtype a and b."""
    require(a.shape == b.shape, "swiglu.b", f"shape {tuple(b.shape)} differs from the gate's "
            f"{tuple(a.shape)}")
    require(a.dtype == b.dtype, "swiglu.b", f"dtype {b.dtype} differs from the gate's {a.dtype}")
    if not can_run(a, b):
        return swiglu_reference(a, b)
    return _SwiGLU.apply(a, b)
