"""Fused RMSNorm (Zhang & Sennrich 2019, eq. 4): y = x / sqrt(mean(x^2) + eps) * w.

Eager PyTorch runs it as several kernels over fp32 copies (cast, pow, mean, rsqrt, mul,
cast, mul: `costmodels.flops.EAGER_TRAFFIC` counts 36 bytes moved per element against 4).
Here the forward reads x once and writes y and one fp32 rstd per row; the backward reads
x, dy and rstd and writes dx, with the weight gradient summed per program in fp32 and the
programs' partial rows added at the end:
    dx = rstd * (dy*w - x * rstd^2 * mean(dy*w*x)),   dw = sum over rows of dy * x * rstd.
"""

from __future__ import annotations

import torch

from .launch import can_run, jit, next_pow2, require, row_programs, row_warps, tl


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's reference: normalise in fp32, cast back, scale."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, cols, eps, rows_per_prog,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for i in range(rows_per_prog):
        row = pid * rows_per_prog + i
        if row < rows:
            x = tl.load(x_ptr + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / cols + eps)
            tl.store(rstd_ptr + row, rstd)
            y = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32) * w
            tl.store(y_ptr + row * cols + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _rmsnorm_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, cols, rows_per_prog,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(rows_per_prog):
        row = pid * rows_per_prog + i
        if row < rows:
            x = tl.load(x_ptr + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            g = dy * w
            dot = tl.sum(g * x, axis=0) / cols
            dx = rstd * (g - x * rstd * rstd * dot)
            tl.store(dx_ptr + row * cols + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * x * rstd
    tl.store(dw_ptr + pid * cols + offs, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        progs = row_programs(rows)
        per = -(-rows // progs)
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = next_pow2(cols)
        _rmsnorm_fwd[(progs,)](x2, weight.contiguous(), y, rstd, rows, cols, eps, per,
                               BLOCK=block, num_warps=row_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        progs = row_programs(rows)
        per = -(-rows // progs)
        dx = torch.empty_like(x2)
        dw = torch.empty(progs, cols, dtype=torch.float32, device=x2.device)
        block = next_pow2(cols)
        _rmsnorm_bwd[(progs,)](x2, weight.contiguous(), dy.reshape(-1, cols).contiguous(),
                               rstd, dx, dw, rows, cols, per, BLOCK=block,
                               num_warps=row_warps(block))
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., d] with weight [d]: the Triton kernel
    where it can run, else the reference."""
    require(weight.dim() == 1 and x.shape[-1] == weight.shape[0], "rmsnorm.weight",
            f"shape {tuple(weight.shape)} does not match the last dimension of x "
            f"{tuple(x.shape)}")
    require(eps > 0, "rmsnorm.eps", f"must be positive, got {eps}")
    if not can_run(x, weight):
        return rmsnorm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
