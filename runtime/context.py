"""Context parallelism: ring attention over a load-balanced sequence split.

The sequence is cut into 2·cp chunks and CP rank i holds chunks i and 2·cp−1−i, so every
rank has the same share of the causal mask's work (the "zigzag" split of Llama 3's context
parallelism, Grattafiori et al. 2024 §3.3.2, and of ring-flash-attention). Attention passes
the K/V blocks around the ring cp−1 times, computing blockwise attention with a running
log-sum-exp (Liu et al. 2023, "Ring Attention with Blockwise Transformers", §3;
Milakov & Gimelshein 2018 for the online softmax). Backward passes the K/V blocks around
again, each block's gradient following it one hop behind and taking one hop more to
return to its owner. Every hop is started before the block in hand is computed and
waited for after it, so it travels under that compute (Liu et al. §3: "overlapping the
communication of key-value blocks with the computation of blockwise attention"); only
the backward's last hop, the gradients coming home, has nothing left to hide behind.

Each (query chunk, key chunk) pair runs one fused flash-attention call that also returns
its log-sum-exp (causal on the diagonal, unmasked below it, skipped above), so the ring
costs what the flash kernel costs plus the merge; the backward calls the flash backward
per pair with the merged output and log-sum-exp, which gives each pair's exact share of
the gradients (Dao 2023, FlashAttention-2 §3.1.2 — the backward needs only O and LSE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def zigzag_index(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions (0..seq_len-1) held by `cp_rank`: chunks cp_rank and 2·cp−1−cp_rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    last = 2 * cp - 1 - cp_rank
    return torch.cat([first, torch.arange(last * chunk, (last + 1) * chunk)])


def zigzag_chunks(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two sequence chunks (of 2·cp) that `cp_rank` holds, in its local order."""
    return cp_rank, 2 * cp - 1 - cp_rank


def _shift(tensors: list[torch.Tensor], group) -> Callable[[], list[torch.Tensor]]:
    """Start sending each tensor to the next rank of the ring and receiving the previous
    rank's, packed into one message per dtype (K and V would otherwise pay one latency
    each); returns the wait that gives the received tensors. The hop travels while the
    caller computes (gloo's threads carry it on a CPU, NCCL's stream on a GPU)."""
    n, me = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % n)
    prev = dist.get_global_rank(group, (me - 1) % n)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    sent = [torch.cat([tensors[i].reshape(-1) for i in idx]) for idx in by_dtype.values()]
    got = [torch.empty_like(flat) for flat in sent]
    ops = [dist.P2POp(dist.isend, flat, nxt, group) for flat in sent]
    ops += [dist.P2POp(dist.irecv, flat, prev, group) for flat in got]
    works = dist.batch_isend_irecv(ops)

    def finish() -> list[torch.Tensor]:
        for work in works:
            work.wait()
        out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for idx, flat in zip(by_dtype.values(), got, strict=True):
            for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx]),
                               strict=True):
                out[i] = part.view_as(tensors[i])
        return out

    return finish


def _flash(q, k, v, causal: bool, scale: float):
    """(out, lse [b,H,s] fp32) of one fused attention call."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                             scale=scale)
    return out[0], out[1]


def _flash_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one fused attention call, given the merged output and LSE."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    # CUDA (not run here: no GPU in CI): dense batches need no cumulative lengths, and
    # without dropout the RNG state is unused.
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, empty, empty, q.shape[2], k.shape[2], 0.0, causal,
        empty, empty, scale=scale)


def _pairs(me: int, src: int, n: int):
    """(query half, key half, causal) of the chunk pairs rank `me` computes against the
    K/V that rank `src` holds: causal on the diagonal, whole below it, none above."""
    for qi, qc in enumerate(zigzag_chunks(n, me)):
        for ki, kc in enumerate(zigzag_chunks(n, src)):
            if kc <= qc:
                yield qi, ki, kc == qc


def _half(x: torch.Tensor, i: int) -> torch.Tensor:
    """Chunk `i` (0 or 1) of this rank's two along the sequence dim of [b, H, s, ...]."""
    n = x.shape[2] // 2
    return x[:, :, i * n:(i + 1) * n]


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, s, d = grad.shape
    return grad.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _merge(out, lse, o_j, lse_j) -> None:
    """Fold one block's (output, LSE) into the running ones, in place (online softmax)."""
    new = torch.logaddexp(lse, lse_j)
    out.mul_(torch.exp(lse - new)[..., None])
    out.add_(o_j.float() * torch.exp(lse_j - new)[..., None])
    lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group):
        n, me, heads = dist.get_world_size(group), dist.get_rank(group), q.shape[1]
        scale = q.shape[-1] ** -0.5
        out = torch.zeros_like(q, dtype=torch.float32)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k, v]
        for step in range(n):
            hop = _shift(kv, group) if step < n - 1 else None  # the next block, meanwhile
            ke, ve = _expand(kv[0], heads), _expand(kv[1], heads)
            for qi, ki, causal in _pairs(me, (me - step) % n, n):
                o_j, lse_j = _flash(_half(q, qi), _half(ke, ki), _half(ve, ki), causal, scale)
                _merge(_half(out, qi), _half(lse, qi), o_j, lse_j)
            if hop is not None:
                kv = hop()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, heads = ctx.group, ctx.scale, q.shape[1]
        n, me = dist.get_world_size(group), dist.get_rank(group)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv, grads = [k, v], None
        for step in range(n):
            hop = _shift(kv, group) if step < n - 1 else None
            ke, ve = _expand(kv[0], heads), _expand(kv[1], heads)
            dke = torch.zeros_like(ke, dtype=torch.float32)
            dve = torch.zeros_like(ve, dtype=torch.float32)
            for qi, ki, causal in _pairs(me, (me - step) % n, n):
                g = _flash_bwd(_half(dout, qi).contiguous(), _half(q, qi).contiguous(),
                               _half(ke, ki).contiguous(), _half(ve, ki).contiguous(),
                               _half(out, qi).contiguous(),
                               _half(lse, qi).contiguous(), causal, scale)
                _half(dq, qi).add_(g[0].float())
                _half(dke, ki).add_(g[1].float())
                _half(dve, ki).add_(g[2].float())
            dk, dv = _fold(dke, k.shape[1]), _fold(dve, v.shape[1])
            if grads is not None:  # the block's gradient so far, from the ranks before
                got = grads()
                dk, dv = dk + got[0], dv + got[1]
            grads = _shift([dk, dv], group)  # on to the next rank, under the next block
            if hop is not None:
                kv = hop()
        dk, dv = grads()  # the last hop has brought this rank's blocks' gradients home
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


class RingAttention:
    """`Attention.core` under context parallelism over `group`."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q, k, v, positions):
        return _RingAttention.apply(q, k, v, self.group)
