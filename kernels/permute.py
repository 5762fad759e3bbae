"""MoE token permute and unpermute-with-combine.

`permute` copies each token's row once per routing choice into expert-contiguous order
(the order GShard's dispatch needs, Lepikhin et al. 2021 §2.2): given keys [tokens, k]
(the expert, or the physical slot, of each choice) it returns rows [tokens * k, h]
sorted by key (stable: token order within a key), `dest` [tokens * k] (where choice j of
token t went) and the count per key. `unpermute` is the combine: token t's output is
sum_j weights[t, j] * rows[dest[t*k + j]].

Eager PyTorch does this as repeat_interleave, an index gather, an index_copy back and a
weighted sum over a [tokens, k, h] temporary: four passes over tokens * k rows. Each
kernel here is one pass, a program per token. The sort itself is `torch.argsort` on
tokens * k integers, as in Megatron-Core's permutation, and costs little beside the rows.
Backwards: permute's is unpermute without weights (a token sums its copies' gradients);
unpermute's scatters weights * grad to the copies and takes each weight's gradient as
the dot product of its copy with the token's output gradient.
"""

from __future__ import annotations

import torch

from .launch import can_run, jit, next_pow2, require, tl

BLOCK_H = 1024  # hidden columns per program step


def routing_order(keys: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dest [tokens * k] int64, counts [n_keys]) for keys [tokens, k]."""
    flat = keys.reshape(-1)
    order = torch.argsort(flat, stable=True)
    dest = torch.empty_like(order)
    dest[order] = torch.arange(flat.numel(), device=flat.device)
    return dest, torch.bincount(flat, minlength=n_keys)


def permute_reference(x: torch.Tensor, dest: torch.Tensor, top_k: int) -> torch.Tensor:
    rows = x.repeat_interleave(top_k, dim=0)
    return torch.empty_like(rows).index_copy(0, dest, rows)


def unpermute_reference(rows: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor
                        ) -> torch.Tensor:
    tokens, k = weights.shape
    picked = rows[dest].view(tokens, k, -1)
    return (picked * weights[..., None]).sum(dim=1)


@jit
def _permute(x_ptr, dest_ptr, out_ptr, hidden, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for start in range(0, hidden, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hidden
        row = tl.load(x_ptr + t * hidden + offs, mask=mask)
        for j in tl.static_range(K):
            d = tl.load(dest_ptr + t * K + j)
            tl.store(out_ptr + d * hidden + offs, row, mask=mask)


@jit
def _unpermute(rows_ptr, dest_ptr, w_ptr, out_ptr, hidden, K: tl.constexpr,
               WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for start in range(0, hidden, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hidden
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            d = tl.load(dest_ptr + t * K + j)
            r = tl.load(rows_ptr + d * hidden + offs, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                r = r * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += r
        tl.store(out_ptr + t * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _unpermute_bwd(rows_ptr, dest_ptr, w_ptr, g_ptr, grows_ptr, gw_ptr, hidden,
                   K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        d = tl.load(dest_ptr + t * K + j)
        w = tl.load(w_ptr + t * K + j).to(tl.float32)
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < hidden
            g = tl.load(g_ptr + t * hidden + offs, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(rows_ptr + d * hidden + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(grows_ptr + d * hidden + offs, (w * g).to(grows_ptr.dtype.element_ty),
                     mask=mask)
            dot += r * g
        tl.store(gw_ptr + t * K + j, tl.sum(dot, axis=0))


def _block(hidden: int) -> int:
    return min(BLOCK_H, next_pow2(hidden))


def _gather_sum(rows, dest, weights, tokens, k):
    hidden = rows.shape[1]
    dtype = rows.dtype if weights is None else torch.promote_types(rows.dtype, weights.dtype)
    out = rows.new_empty((tokens, hidden), dtype=dtype)
    _unpermute[(tokens,)](rows, dest, weights if weights is not None else rows, out, hidden,
                          K=k, WEIGHTED=weights is not None, BLOCK=_block(hidden))
    return out


def _scatter(x, dest, k):
    tokens, hidden = x.shape
    out = x.new_empty((tokens * k, hidden))
    _permute[(tokens,)](x, dest, out, hidden, K=k, BLOCK=_block(hidden))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dest, k):
        ctx.save_for_backward(dest)
        ctx.k = k
        return _scatter(x, dest, k)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return _gather_sum(grad.contiguous(), dest, None, grad.shape[0] // ctx.k, ctx.k), \
            None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, dest, weights):
        ctx.save_for_backward(rows, dest, weights)
        return _gather_sum(rows, dest, weights, *weights.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, dest, weights = ctx.saved_tensors
        tokens, k = weights.shape
        grad_rows = torch.empty_like(rows)
        grad_w = torch.empty(tokens, k, dtype=torch.float32, device=rows.device)
        hidden = rows.shape[1]
        _unpermute_bwd[(tokens,)](rows, dest, weights, grad.contiguous(), grad_rows, grad_w,
                                  hidden, K=k, BLOCK=_block(hidden))
        return grad_rows, None, grad_w.to(weights.dtype)


def permute(x: torch.Tensor, dest: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows [tokens * top_k, h] with choice j of token t at dest[t * top_k + j]."""
    require(x.dim() == 2, "permute.x", f"needs [tokens, hidden], got {tuple(x.shape)}")
    require(dest.numel() == x.shape[0] * top_k, "permute.dest",
            f"{dest.numel()} entries for {x.shape[0]} tokens x top_k {top_k}")
    if not can_run(x, dest):
        return permute_reference(x, dest, top_k)
    return _Permute.apply(x.contiguous(), dest.contiguous(), top_k)


def unpermute(rows: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * rows[dest[t * k + j]] for weights [tokens, k], in the
    dtype torch's promotion gives rows * weights."""
    require(weights.dim() == 2, "unpermute.weights",
            f"needs [tokens, top_k], got {tuple(weights.shape)}")
    require(rows.dim() == 2 and rows.shape[0] == weights.numel() == dest.numel(),
            "unpermute.rows", f"{tuple(rows.shape)} rows and {dest.numel()} destinations for "
            f"weights {tuple(weights.shape)}")
    if not can_run(rows, dest, weights):
        return unpermute_reference(rows, dest, weights)
    return _Unpermute.apply(rows.contiguous(), dest.contiguous(), weights.contiguous())
