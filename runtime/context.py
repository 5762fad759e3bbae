"""Context parallelism: ring attention over a load-balanced sequence split.

The sequence is cut into 2·cp chunks and CP rank i holds chunks i and 2·cp−1−i, so every
rank has the same share of the causal mask's work (the "zigzag" split of Llama 3's context
parallelism, Grattafiori et al. 2024 §3.3.2, and of ring-flash-attention). Attention passes
the K/V blocks around the ring cp−1 times, computing blockwise attention with a running
log-sum-exp (Liu et al. 2023, "Ring Attention with Blockwise Transformers", §3;
Milakov & Gimelshein 2018 for the online softmax). Backward passes K/V and their gradients
around the ring once more so each block's gradient returns to its owner.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEG = -1e30  # masked score; finite so fully masked rows give zero weight, not NaN


def zigzag_index(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions (0..seq_len-1) held by `cp_rank`: chunks cp_rank and 2·cp−1−cp_rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    last = 2 * cp - 1 - cp_rank
    return torch.cat([first, torch.arange(last * chunk, (last + 1) * chunk)])


def _shift(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send each tensor to the next rank of the ring and receive the previous rank's."""
    n, me = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % n)
    prev = dist.get_global_rank(group, (me - 1) % n)
    tensors = [t.contiguous() for t in tensors]
    out = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, o, prev, group) for o in out]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return out


def _scores(q, k, q_pos, k_pos, scale):
    """Causally masked scores of q [b,H,sq,d] against k [b,H,sk,d] at these positions."""
    s = (q @ k.transpose(-1, -2)) * scale
    return s.masked_fill(q_pos[:, None] < k_pos[None, :], NEG)


def _block(q, k, v, q_pos, k_pos, scale):
    """One block: (out [b,H,sq,d], lse [b,H,sq]) of q against this K/V block."""
    s = _scores(q, k, q_pos, k_pos, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ v, lse


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, s, d = grad.shape
    return grad.view(b, kv_heads, h // kv_heads, s, d).sum(2)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, group):
        dtype, heads = q.dtype, q.shape[1]
        q32, k32, v32 = q.float(), k.float(), v.float()
        scale = q.shape[-1] ** -0.5
        out = torch.zeros_like(q32)
        lse = torch.full(q.shape[:-1], NEG, dtype=torch.float32, device=q.device)
        kv, k_pos = (k32, v32), positions
        for step in range(dist.get_world_size(group)):
            if step:
                *kv, k_pos = _shift([*kv, k_pos], group)
            o_j, lse_j = _block(q32, _expand(kv[0], heads), _expand(kv[1], heads),
                                positions, k_pos, scale)
            new = torch.logaddexp(lse, lse_j)
            out = out * torch.exp(lse - new)[..., None] + o_j * torch.exp(lse_j - new)[..., None]
            lse = new
        ctx.save_for_backward(q32, k32, v32, positions, out, lse)
        ctx.group, ctx.scale, ctx.dtypes = group, scale, (q.dtype, k.dtype, v.dtype)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, positions, out, lse = ctx.saved_tensors
        group, scale, heads = ctx.group, ctx.scale, q.shape[1]
        dout = dout.float()
        delta = (dout * out).sum(-1, keepdim=True)
        dq = torch.zeros_like(q)
        k_blk, v_blk, k_pos = k, v, positions
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for step in range(dist.get_world_size(group)):
            if step:
                k_blk, v_blk, k_pos, dk, dv = _shift([k_blk, v_blk, k_pos, dk, dv], group)
            ke, ve = _expand(k_blk, heads), _expand(v_blk, heads)
            p = torch.exp(_scores(q, ke, positions, k_pos, scale) - lse[..., None])
            dv = dv + _fold(p.transpose(-1, -2) @ dout, k.shape[1])
            ds = p * (dout @ ve.transpose(-1, -2) - delta)
            dq = dq + (ds @ ke) * scale
            dk = dk + _fold((ds.transpose(-1, -2) @ q) * scale, k.shape[1])
        dk, dv = _shift([dk, dv], group)  # the last hop brings each block's gradient home
        dq_t, dk_t, dv_t = ctx.dtypes
        return dq.to(dq_t), dk.to(dk_t), dv.to(dv_t), None, None


class RingAttention:
    """`Attention.core` under context parallelism over `group`."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q, k, v, positions):
        return _RingAttention.apply(q, k, v, positions, self.group)
