"""FLOPs and bytes of every op of a transformer layer, per rank and per micro-batch.

A layer is a list of `Op`s for its forward pass on one rank; `backward` derives the backward
ops (two GEMMs per GEMM: input and weight gradients; 2.5x the attention-core FLOPs, as the
FlashAttention-2 backward runs five matmuls to the forward's two; twice the bytes of every
bandwidth-bound op). Model FLOPs follow PaLM (Chowdhery et al. 2022, App. B): 6·N per token
for the matmul parameters plus 12·L·H·Q·T for attention; for GPT models this equals
Narayanan et al. 2021, eq. 3, without its recompute term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from meshplan.core.model import ModelSpec


@dataclass(frozen=True, kw_only=True, slots=True)
class Op:
    name: str
    kind: Literal["gemm", "attn", "mem"]
    m: int = 0  # gemm: (m x k) @ (k x n), `batch` times
    n: int = 0
    k: int = 0
    batch: int = 1
    flops: float = 0.0  # attn: core FLOPs (QK^T and PV)
    kv_len: int = 0  # attn: keys per query
    bytes: float = 0.0  # mem: bytes read + written
    chunks: int = 1  # gemm: runs as this many GEMMs of m / chunks rows, one after another


@dataclass(frozen=True, kw_only=True)
class Shard:
    """How one micro-batch of one layer is split over a rank."""

    mbs: int
    seq: int
    tp: int = 1
    cp: int = 1
    sp: bool = False
    ep: int = 1
    etp: int = 1
    attn: Literal["flash", "unfused"] = "flash"
    act_bytes: int = 2

    @property
    def tokens(self) -> int:
        """Tokens a TP rank computes on: the whole micro-batch slice of this CP rank."""
        return self.mbs * self.seq // self.cp

    @property
    def sp_tokens(self) -> int:
        """Tokens held outside TP regions (norms, residuals): split by tp under SP."""
        return self.tokens // self.tp if self.sp else self.tokens


def kv_width(model: ModelSpec, tp: int) -> int:
    """Width of K (= of V) per token on one TP rank; KV heads replicate when tp > n_kv."""
    if model.mla:
        return model.kv_dim // tp
    return max(model.n_kv_heads // tp, 1) * model.head_dim


def _gemm(name: str, m: int, k: int, n: int, batch: int = 1) -> Op:
    return Op(name=name, kind="gemm", m=m, n=n, k=k, batch=batch)


def _mem(name: str, nbytes: float) -> Op:
    return Op(name=name, kind="mem", bytes=nbytes)


def attention_ops(model: ModelSpec, s: Shard) -> list[Op]:
    t, h, tp, b = s.tokens, model.hidden_size, s.tp, s.act_bytes
    heads = model.n_heads // tp
    ops: list[Op] = [_mem("attn_norm", 2 * s.sp_tokens * h * b)]
    if model.mla:
        m = model.mla
        qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            ops += [_gemm("q_down", t, h, m.q_lora_rank),
                    _gemm("q_up", t, m.q_lora_rank, heads * qk_head)]
        else:
            ops.append(_gemm("q_proj", t, h, heads * qk_head))
        ops += [_gemm("kv_down", t, h, m.kv_lora_rank + m.qk_rope_head_dim),
                _gemm("kv_up", t, m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim))]
        qk_dim, v_dim = heads * qk_head, heads * m.v_head_dim
    else:
        kv_local = kv_width(model, tp)
        q_local = heads * model.head_dim
        ops.append(_gemm("qkv", t, h, q_local + 2 * kv_local))
        if model.position == "rope":
            ops.append(_mem("rope", 2 * t * (q_local + kv_local) * b))
        qk_dim = v_dim = q_local
    ops += _core_attention(model, s, heads, qk_dim, v_dim)
    ops.append(_gemm("attn_out", t, v_dim, h))
    ops.append(_mem("attn_residual", 3 * s.sp_tokens * h * b))
    if model.dropout:
        ops.append(_mem("attn_dropout", 2.5 * s.sp_tokens * h * b))
    return ops


def _core_attention(model: ModelSpec, s: Shard, heads: int, qk_dim: int, v_dim: int) -> list[Op]:
    """QK^T, softmax and PV for this rank's queries against all keys of the sequence."""
    q_len, kv_len = s.seq // s.cp, s.seq
    qk_head, v_head = qk_dim // heads, v_dim // heads
    if s.attn == "flash":
        # Causal masking skips the upper triangle: half of the q_len x kv_len scores.
        flops = 2.0 * s.mbs * q_len * kv_len * heads * (qk_head + v_head) * 0.5
        return [Op(name="flash_attn", kind="attn", flops=flops, kv_len=kv_len)]
    # Unfused (Megatron-LM 2021): scores materialised, fused scale-mask-softmax, dropout.
    scores = s.mbs * heads * q_len * kv_len * s.act_bytes
    ops = [_gemm("qk", q_len, qk_head, kv_len, batch=s.mbs * heads),
           _mem("softmax", 2 * scores)]
    if model.dropout:
        ops.append(_mem("attn_prob_dropout", 2.5 * scores))
    ops.append(_gemm("pv", q_len, kv_len, v_head, batch=s.mbs * heads))
    return ops


def mlp_ops(model: ModelSpec, s: Shard, ffn: int, name: str = "mlp") -> list[Op]:
    t, h, b = s.tokens, model.hidden_size, s.act_bytes
    f = ffn // s.tp
    if model.mlp == "swiglu":
        return [_gemm(f"{name}_gate_up", t, h, 2 * f), _mem(f"{name}_swiglu", 3 * t * f * b),
                _gemm(f"{name}_down", t, f, h)]
    return [_gemm(f"{name}_up", t, h, f), _mem(f"{name}_gelu", 2 * t * f * b),
            _gemm(f"{name}_down", t, f, h)]


def moe_ops(model: ModelSpec, s: Shard, capacity_factor: float = 1.0) -> list[Op]:
    """Router, permute, the local experts' grouped GEMMs, unpermute; shared experts.

    Balanced routing: each EP rank receives as many token-expert pairs as it sends,
    `tokens · top_k`; its E/ep local experts each get tokens·top_k·ep/E of them. With
    expert TP smaller than TP, the tp/etp ranks of a TP group split those tokens.
    """
    moe = model.moe
    assert moe is not None
    t, h, b = s.tokens, model.hidden_size, s.act_bytes
    local = moe.n_experts // s.ep
    per_expert = max(1, round(t * moe.top_k * s.ep * s.etp / (moe.n_experts * s.tp)
                              * capacity_factor))
    f = moe.expert_ffn_hidden_size // s.etp
    routed = t * moe.top_k * s.etp // s.tp
    ops = [_gemm("router", t, h, moe.n_experts), _mem("permute", 2 * routed * h * b)]
    if model.mlp == "swiglu":
        ops += [_gemm("experts_gate_up", per_expert, h, 2 * f, batch=local),
                _mem("experts_swiglu", 3 * per_expert * local * f * b),
                _gemm("experts_down", per_expert, f, h, batch=local)]
    else:
        ops += [_gemm("experts_up", per_expert, h, f, batch=local),
                _gemm("experts_down", per_expert, f, h, batch=local)]
    ops.append(_mem("unpermute", 2 * routed * h * b))
    if moe.n_shared_experts:
        ops += mlp_ops(model, s, moe.n_shared_experts * moe.shared_ffn, "shared")
    return ops


def layer_ops(model: ModelSpec, s: Shard, moe_layer: bool) -> list[Op]:
    ops = attention_ops(model, s)
    ops.append(_mem("mlp_norm", 2 * s.sp_tokens * model.hidden_size * s.act_bytes))
    if moe_layer:
        assert model.moe is not None
        ops += moe_ops(model, s, model.moe.capacity_factor or 1.0)
    else:
        ops += mlp_ops(model, s, model.ffn_hidden_size)
    ops.append(_mem("mlp_residual", 3 * s.sp_tokens * model.hidden_size * s.act_bytes))
    if model.dropout:
        ops.append(_mem("mlp_dropout", 2.5 * s.sp_tokens * model.hidden_size * s.act_bytes))
    return ops


def embedding_ops(model: ModelSpec, s: Shard) -> list[Op]:
    """Gather the token rows and write them; learned positions add their rows' read."""
    rows = 3 if model.position == "learned" else 2
    return [_mem("embedding", rows * s.sp_tokens * model.hidden_size * s.act_bytes)]


def head_ops(model: ModelSpec, s: Shard, gathered: bool = False) -> list[Op]:
    """Final norm, vocab-parallel logits and fp32 cross-entropy (read, exp, write).
    `gathered`: the logits are all-gathered first (an eager head under TP, see
    `memory.head_activation_bytes`), so the cross-entropy reads the whole vocabulary."""
    t, h, v = s.tokens, model.hidden_size, model.vocab_size // s.tp
    ce_v = model.vocab_size if gathered else v
    return [_mem("final_norm", 2 * s.sp_tokens * h * s.act_bytes),
            _gemm("logits", t, h, v),
            _mem("cross_entropy", t * ce_v * (s.act_bytes + 2 * 4))]


# Bytes an eager PyTorch implementation moves relative to one fused kernel (read inputs
# once, write outputs once), from counting the kernels of the reference code: RMSNorm in
# fp32 (cast, pow, mean, rsqrt-mul, cast back, weight-mul: 36 vs 4 bytes per element),
# RoPE through complex views (~28 vs 4), SwiGLU as silu then mul (10 vs 6), cross-entropy
# via an fp32 copy then log-softmax (~2x). Residual adds are one kernel either way.
EAGER_TRAFFIC = {"attn_norm": 9.0, "mlp_norm": 9.0, "final_norm": 9.0, "rope": 7.0,
                 "mlp_swiglu": 10 / 6, "experts_swiglu": 10 / 6, "shared_swiglu": 10 / 6,
                 "cross_entropy": 2.0}


def eager_factor(name: str) -> float:
    return EAGER_TRAFFIC.get(name.removesuffix("_bwd"), 1.0)


def fp8_casts(ops: list[Op]) -> list[Op]:
    """Dynamic FP8 scaling casts each GEMM operand: read 16-bit, write 8-bit (Micikevicius
    et al. 2022, "FP8 Formats for Deep Learning", §4), per GEMM in the forward pass;
    `backward` doubles them for the gradient GEMMs."""
    return [_mem(op.name + "_fp8_cast", 3 * (op.m * op.k + op.k * op.n) * op.batch)
            for op in ops if op.kind == "gemm" and op.name not in ("router", "qk", "pv")]


# The GEMMs beside a TP collective under SP: the first consumer of the all-gathered input
# and the producers of what is reduce-scattered (Megatron-Core / Transformer Engine).
TP_OVERLAP_GEMMS = frozenset({"qkv", "q_proj", "q_down", "attn_out", "mlp_up",
                              "mlp_gate_up", "mlp_down"})


def tp_chunked(ops: list[Op], tp: int) -> list[Op]:
    """Overlapped TP decomposes each GEMM beside a collective into tp GEMMs over 1/tp of
    the tokens, each one running while the next chunk moves (Wang et al. 2023, "Overlap
    Communication with Dependent Computation via Decomposition", ASPLOS §3; Megatron
    --tp-comm-overlap, torchtitan async TP): smaller GEMMs, one launch each."""
    return [replace(op, chunks=tp) if op.kind == "gemm" and op.name in TP_OVERLAP_GEMMS
            and op.m >= tp else op for op in ops]


def backward(ops: list[Op]) -> list[Op]:
    """Input-gradient GEMMs keep their forward's chunks (they feed the mirror collective);
    weight-gradient GEMMs reduce over the tokens, in one piece."""
    out: list[Op] = []
    for op in ops:
        if op.kind == "gemm":
            out += [replace(_gemm(op.name + "_dgrad", op.m, op.n, op.k, op.batch),
                            chunks=op.chunks),
                    _gemm(op.name + "_wgrad", op.k, op.m, op.n, op.batch)]
        elif op.kind == "attn":
            out.append(Op(name=op.name + "_bwd", kind="attn", flops=2.5 * op.flops,
                          kv_len=op.kv_len))
        else:
            out.append(_mem(op.name + "_bwd", 2 * op.bytes))
    return out


# ---- model FLOPs (PaLM App. B; Narayanan 2021 eq. 3) -----------------------------------

def attention_flops_per_token(model: ModelSpec, seq: int) -> float:
    """Forward FLOPs of QK^T and PV per token over all layers, without causal savings."""
    if model.mla:
        per_head = model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim + model.mla.v_head_dim
    else:
        per_head = 2 * model.head_dim
    return 2.0 * seq * model.n_heads * per_head * model.n_layers


def model_flops_per_token(model: ModelSpec, seq: int) -> float:
    """Training FLOPs per token (forward + backward, no recompute): 6N + 12·L·H·Q·T."""
    return 6.0 * model.matmul_params_per_token() + 3.0 * attention_flops_per_token(model, seq)


def recompute_flops_per_token(model: ModelSpec, seq: int, recompute: str) -> float:
    """Extra forward FLOPs that activation recomputation adds, in the same convention.

    Full: the forward of every transformer layer again (not the logits), as eq. 3 counts.
    Selective: the attention core (Korthikanti et al. 2022, §5). Op: every other matmul.
    """
    layer_matmul = model.matmul_params_per_token() - model.vocab_size * model.hidden_size
    if recompute == "full":
        return 2.0 * layer_matmul + attention_flops_per_token(model, seq)
    if recompute == "op":
        return layer_matmul
    if recompute == "selective":
        return attention_flops_per_token(model, seq)
    return 0.0
