"""A decoder-only transformer built from a `ModelSpec`; it knows nothing of parallelism.

Llama-style blocks (pre-norm RMSNorm, RoPE, grouped-query attention through
`scaled_dot_product_attention`, SwiGLU MLP) and DeepSeek-style MoE blocks (top-k softmax
router, optional shared experts, dense-first layers). Layers live in a `ModuleDict` keyed by
their global index, so a pipeline stage is this model with the other layers deleted, and
`tok_embeddings`, `norm` and `output` may be `None` on stages that do not own them
(torchtitan's convention). Two seams are left for `parallelize`: `Attention.core` (the
attention kernel: context parallelism swaps in ring attention) and `MoE.dispatch` (expert
parallelism swaps in all-to-all dispatch and combine).

Built with `fused=True`, the norms, the SwiGLU activations, the MoE permutation and the
experts' GEMMs run our Triton kernels (`meshplan.kernels`) wherever their tensors allow
(plain CUDA tensors, or CPU ones under Triton's interpreter); the eager ops run otherwise,
so a model built without it computes exactly what it always did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshplan.core.model import ModelSpec
from meshplan.kernels.grouped_gemm import grouped_mm
from meshplan.kernels.launch import can_run
from meshplan.kernels.permute import (
    permute,
    permute_reference,
    routing_order,
    unpermute,
    unpermute_reference,
)
from meshplan.kernels.rmsnorm import rmsnorm
from meshplan.kernels.swiglu import swiglu, swiglu_reference

from .support import refuse_unsupported_model

ROPE_THETA = 500_000.0  # Llama 3 (Grattafiori et al. 2024, Table 3)


def rope_tables(head_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """RoPE rotations (Su et al. 2021, eq. 34) for integer `positions` [s], as unit complex
    numbers e^{i·pos·θ_j}: [s, hd/2]."""
    inv = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [b, s, heads, hd] by the position's angle: one
    complex multiply (Meta's Llama reference implementation)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rot[None, :, None, :]).flatten(3).type_as(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [b, heads, s, hd] over k, v [b, kv_heads, s, hd]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Norm(nn.RMSNorm):
    """nn.RMSNorm (same parameters, same checkpoints); the fused kernel when asked."""

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__(dim, eps=eps)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and can_run(x, self.weight):
            return rmsnorm(x, self.weight, self.eps)
        return super().forward(x)


def _lowp(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul of x: kernels called directly bypass it."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, hd = spec.hidden_size, spec.head_dim
        bias = spec.bias or spec.qkv_bias
        self.head_dim = hd
        self.wq = nn.Linear(h, spec.n_heads * hd, bias=bias)
        self.wk = nn.Linear(h, spec.n_kv_heads * hd, bias=bias)
        self.wv = nn.Linear(h, spec.n_kv_heads * hd, bias=bias)
        self.wo = nn.Linear(spec.n_heads * hd, h, bias=spec.bias)
        self.q_norm = nn.RMSNorm(hd, eps=1e-6) if spec.qk_norm else None
        self.k_norm = nn.RMSNorm(hd, eps=1e-6) if spec.qk_norm else None
        self.core = causal_attention  # replaced by ring attention under context parallelism

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor
                ) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, kind: str, bias: bool, fused: bool = False):
        super().__init__()
        self.kind, self.fused = kind, fused
        self.w1 = nn.Linear(hidden, ffn, bias=bias)
        self.w2 = nn.Linear(ffn, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, ffn, bias=bias) if kind == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:  # SwiGLU (Shazeer 2020, eq. 6)
            act = swiglu if self.fused else swiglu_reference  # the kernel, where it can run
            return self.w2(act(self.w1(x), self.w3(x)))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Experts(nn.Module):
    """`n` SwiGLU experts as stacked weights [n, ffn, h] (w2: [n, h, ffn])."""

    def __init__(self, n: int, hidden: int, ffn: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.w1 = nn.Parameter(torch.empty(n, ffn, hidden))
        self.w3 = nn.Parameter(torch.empty(n, ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, ffn))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [tokens, h] sorted by local expert, `counts[e]` tokens for local expert e."""
        if self.fused and can_run(x, self.w1, self.w2, self.w3):
            dt = _lowp(x)
            xs, w1, w2, w3 = (t.to(dt) for t in (x, self.w1, self.w2, self.w3))
            hidden = swiglu(grouped_mm(xs, w1, counts), grouped_mm(xs, w3, counts))
            return grouped_mm(hidden, w2, counts)
        outs = []
        for e, part in enumerate(x.split(counts)):
            hidden = F.silu(part @ self.w1[e].t()) * (part @ self.w3[e].t())
            outs.append(hidden @ self.w2[e].t())
        return torch.cat(outs) if outs else x[:0]


class LocalDispatch:
    """`MoE.dispatch` when every expert is local: routing keys are expert ids."""

    def keys(self, expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, int]:
        return expert_ids, n_experts

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: Experts
                 ) -> torch.Tensor:
        """Expert outputs of `rows` [n, h], sorted by expert with `counts[e]` rows each."""
        return experts(rows, counts.tolist())


def unsort(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of `x = y[order]` (differentiable)."""
    return torch.empty_like(x).index_copy(0, order, x)


class MoE(nn.Module):
    """Top-k softmax router over `n_experts` experts plus optional shared experts (dropless)."""

    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        moe = spec.moe
        assert moe is not None
        h = spec.hidden_size
        self.top_k, self.fused = moe.top_k, fused
        self.n_experts = moe.n_experts
        self.router = nn.Linear(h, moe.n_experts, bias=False)
        self.experts = Experts(moe.n_experts, h, moe.expert_ffn_hidden_size, fused)
        self.shared = (MLP(h, moe.n_shared_experts * moe.shared_ffn, "swiglu", False, fused)
                       if moe.n_shared_experts else None)
        self.dispatch = LocalDispatch()  # replaced by all-to-all under expert parallelism
        self.last_expert_ids: torch.Tensor | None = None  # routing record of the last call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        probs = self.router(flat).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)  # [n, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).type_as(x)
        self.last_expert_ids = ids.detach()
        keys, n_keys = self.dispatch.keys(ids, self.n_experts)
        dest, counts = routing_order(keys, n_keys)  # choice j of token t goes to row dest[t*k+j]
        # the kernels where they can run (the wrappers fall back to the references)
        rows = (permute if self.fused else permute_reference)(flat, dest, self.top_k)
        out = self.dispatch(rows, counts, self.experts)
        out = (unpermute if self.fused else unpermute_reference)(out, dest, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(b, s, h)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, fused: bool = False):
        super().__init__()
        self.attention_norm = Norm(spec.hidden_size, 1e-5, fused)
        self.attention = Attention(spec)
        self.ffn_norm = Norm(spec.hidden_size, 1e-5, fused)
        if spec.is_moe_layer(layer):
            self.feed_forward: nn.Module = MoE(spec, fused)
        else:
            self.feed_forward = MLP(spec.hidden_size, spec.ffn_hidden_size, spec.mlp, spec.bias,
                                    fused)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor
                ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, positions)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """tokens [b, s] -> logits [b, s, vocab] (or hidden states on a non-last stage)."""

    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        refuse_unsupported_model(spec)
        self.spec = spec
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(spec.vocab_size,
                                                                spec.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(spec, i, fused)
                                     for i in range(spec.n_layers)})
        self.norm: nn.Module | None = Norm(spec.hidden_size, 1e-5, fused)
        self.output: nn.Linear | None = nn.Linear(spec.hidden_size, spec.vocab_size,
                                                  bias=False)
        if spec.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`h` is tokens on the first stage, hidden states after; `positions` [s] of h."""
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        rope = rope_tables(self.spec.head_dim, positions)
        for layer in self.layers.values():
            h = layer(h, rope, positions)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h


def init_weights(model: Transformer, seed: int) -> None:
    """Deterministic init from one seed: N(0, 0.02), output layers scaled by 1/sqrt(2L)
    (GPT-2, Radford et al. 2019 §2.3), norms at one, biases at zero."""
    gen = torch.Generator().manual_seed(seed)
    depth_std = 0.02 / (2 * model.spec.n_layers) ** 0.5
    for name, p in sorted(model.named_parameters()):
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
                continue
            std = depth_std if name.endswith(("wo.weight", "w2.weight", "w2")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
