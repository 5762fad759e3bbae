"""Grouped GEMM over experts with variable token counts: out_g = x_g @ w[g]^T.

x [rows, k] holds each expert's tokens contiguously (`counts[g]` rows for expert g, as
`permute` leaves them), w [groups, n, k] the experts' weights (nn.Linear layout). The
eager path runs one matmul per expert; small or uneven experts then leave most of the
GPU idle between launches. One launch here covers every expert: the host lays out a
table of (expert, first row) per 128-row tile, and each program computes one (tile,
column block) of its expert's output with a K loop of `tl.dot` (the grouped GEMM of
Megablocks, Gale et al. 2023 §5.1, and of Triton's grouped-GEMM tutorial).

Backward: dx_g = dy_g @ w[g], the same kernel with w read transposed (strides only);
dw[g] = dy_g^T @ x_g, a second kernel whose programs loop over their expert's rows.
"""

from __future__ import annotations

import torch

from .launch import DOT_F32, INTERPRET, can_run, dot_precision, jit, require, tl, triton

BLOCK_M = 32 if INTERPRET else 128  # rows per tile (the host's tile table uses it)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs = [part @ w[g].t() for g, part in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x.new_empty((0, w.shape[1]))


@jit
def _gmm(x_ptr, b_ptr, out_ptr, tile_group_ptr, tile_row_ptr, group_end_ptr, n, k,
         stride_bg, stride_bk, stride_bn, BM: tl.constexpr, BN: tl.constexpr,
         BK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """out[rows of g] = x[rows of g] @ B[g], B[g] a [k, n] view of the weights."""
    tile, pn = tl.program_id(0), tl.program_id(1)
    g = tl.load(tile_group_ptr + tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + tile).to(tl.int64)
    end = tl.load(group_end_ptr + g).to(tl.int64)
    rm = row0 + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, k, BK):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * k + kk[None, :],
                    mask=(rm[:, None] < end) & (kk[None, :] < k), other=0.0)
        b = tl.load(b_ptr + g * stride_bg + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < k) & (rn[None, :] < n), other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None] * n + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < end) & (rn[None, :] < n))


@jit
def _gmm_wgrad(dy_ptr, x_ptr, dw_ptr, group_start_ptr, group_end_ptr, n, k,
               stride_wg, stride_wn, stride_wk, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """dw[g] = dy[rows of g]^T @ x[rows of g], dw [groups, n, k] by the given strides."""
    g, pn, pk = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    start = tl.load(group_start_ptr + g).to(tl.int64)
    end = tl.load(group_end_ptr + g).to(tl.int64)
    rn = pn * BN + tl.arange(0, BN)
    rk = pk * BK + tl.arange(0, BK)
    rm = tl.arange(0, BM)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + rm
        dy = tl.load(dy_ptr + rows[None, :] * n + rn[:, None],
                     mask=(rows[None, :] < end) & (rn[:, None] < n), other=0.0)  # [BN, BM]
        xb = tl.load(x_ptr + rows[:, None] * k + rk[None, :],
                     mask=(rows[:, None] < end) & (rk[None, :] < k), other=0.0)  # [BM, BK]
        if DOT_F32:
            acc += tl.dot(dy.to(tl.float32), xb.to(tl.float32))
        else:
            acc += tl.dot(dy, xb, input_precision=PRECISION)
    tl.store(dw_ptr + g * stride_wg + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=(rn[:, None] < n) & (rk[None, :] < k))


def _tiles(counts: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per BLOCK_M tile: its group and first row; per group: the row after its last."""
    groups, rows, ends, start = [], [], [], 0
    for g, c in enumerate(counts):
        for r in range(start, start + c, BLOCK_M):
            groups.append(g)
            rows.append(r)
        start += c
        ends.append(start)
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(groups), as_t(rows), as_t(ends)


def _blocks(n: int, k: int) -> tuple[int, int]:
    if INTERPRET:  # few programs: each interpreted program is a Python loop
        return 64, 64
    return (128 if n >= 128 else 64), 64


def _mm(x: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [rows, k] @ b[g] for b [groups, k, n] (any strides)."""
    k, n = b.shape[1], b.shape[2]
    out = x.new_empty((x.shape[0], n))
    tile_group, tile_row, ends = _tiles(counts, x.device)
    if len(tile_group) == 0:
        return out
    bn, bk = _blocks(n, k)
    grid = (len(tile_group), triton.cdiv(n, bn))
    _gmm[grid](x, b, out, tile_group, tile_row, ends, n, k, b.stride(0), b.stride(1),
               b.stride(2), BM=BLOCK_M, BN=bn, BK=bk, DOT_F32=DOT_F32,
               PRECISION=dot_precision(x.dtype),
               num_warps=4 if INTERPRET else 8, num_stages=1 if INTERPRET else 3)
    return out


def _wgrad(dy: torch.Tensor, x: torch.Tensor, counts: list[int], like: torch.Tensor
           ) -> torch.Tensor:
    groups, n, k = like.shape
    dw = torch.empty_like(like)
    ends = torch.tensor(counts, device=x.device).cumsum(0)
    starts = (ends - torch.tensor(counts, device=x.device)).to(torch.int32)
    bn, bk = _blocks(n, k)
    grid = (groups, triton.cdiv(n, bn), triton.cdiv(k, bk))
    _gmm_wgrad[grid](dy, x, dw, starts, ends.to(torch.int32), n, k, dw.stride(0),
                     dw.stride(1), dw.stride(2), BM=32 if INTERPRET else 64, BN=bn, BK=bk,
                     DOT_F32=DOT_F32, PRECISION=dot_precision(x.dtype),
                     num_warps=4 if INTERPRET else 8,
                     num_stages=1 if INTERPRET else 3)
    return dw


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts):
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return _mm(x, w.transpose(1, 2), counts)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _mm(dy, w, ctx.counts) if ctx.needs_input_grad[0] else None
        dw = _wgrad(dy, x, ctx.counts, w) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """out [rows, n]: rows of expert g (counts[g] of them, in order) times w[g]^T, for
    x [rows, k] and w [groups, n, k]."""
    require(w.dim() == 3 and x.dim() == 2 and w.shape[2] == x.shape[1], "grouped_mm.w",
            f"shape {tuple(w.shape)} does not match x {tuple(x.shape)} "
            f"(needs [groups, n, {x.shape[-1] if x.dim() == 2 else '?'}])")
    require(len(counts) == w.shape[0], "grouped_mm.counts",
            f"{len(counts)} counts for {w.shape[0]} experts")
    require(min(counts, default=0) >= 0 and sum(counts) == x.shape[0], "grouped_mm.counts",
            f"counts sum to {sum(counts)} (smallest {min(counts, default=0)}), x has "
            f"{x.shape[0]} rows")
    if not can_run(x, w):
        return grouped_mm_reference(x, w, counts)
    return _GroupedMM.apply(x.contiguous(), w, list(counts))
