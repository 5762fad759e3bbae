"""Memory per rank: model states under ZeRO, activations under TP/SP/CP and recompute.

Model states (Rajbhandari et al. 2020, "ZeRO", §3.1 and §5): mixed-precision training keeps
2Ψ bytes of 16-bit weights, 2Ψ of 16-bit gradients and KΨ of optimizer state (K = 12 for
Adam). Over N_d data-parallel ranks, ZeRO-1 shards the optimizer (4Ψ + KΨ/N_d), ZeRO-2 also
the gradients (2Ψ + (2+K)Ψ/N_d), ZeRO-3 everything ((2+2+K)Ψ/N_d).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", §4, Table 2):
per layer and micro-batch, sbh(34 + 5as/h) bytes without parallelism; sbh(10 + 24/t +
5as/(ht)) with tensor parallelism t; (sbh/t)(34 + 5as/h) with sequence parallelism;
selective recompute drops the 5as²b/t attention term; full recompute keeps only the layer
input, 2sbh (2sbh/t with sequence parallelism). `layer_activation_bytes` counts the same
tensors one by one, so it reproduces those formulas for GPT layers and extends them to
GQA/MLA, SwiGLU, MoE, FlashAttention and context parallelism.
"""

from __future__ import annotations

from meshplan.core.model import ModelSpec

from .flops import Shard, kv_width, layer_ops


def model_state_bytes(params: float, dp: int, zero: int, optimizer_bytes: int = 12,
                      weight_bytes: int = 2, grad_bytes: int = 2) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per rank for `params` replicated over `dp`."""
    w, g, o = weight_bytes * params, grad_bytes * params, optimizer_bytes * params
    if zero >= 1:
        o /= dp
    if zero >= 2:
        g /= dp
    if zero >= 3:
        w /= dp
    return w, g, o


def layer_activation_bytes(model: ModelSpec, s: Shard, recompute: str, moe_layer: bool,
                           dropout: bool | None = None, eager: bool = False) -> float:
    """Bytes one layer keeps for backward, for one micro-batch on one rank; `eager` adds
    what unfused PyTorch ops keep beyond fused kernels (`eager_layer_extra_bytes`)."""
    b, h = s.act_bytes, model.hidden_size
    t, t_sp = s.tokens, s.sp_tokens
    if recompute == "full":
        return b * t_sp * h
    if recompute == "op":
        return _op_checkpoint_bytes(model, s, moe_layer)
    if eager:
        return layer_activation_bytes(model, s, recompute, moe_layer, dropout) + \
            eager_layer_extra_bytes(model, s, moe_layer)
    drop = model.dropout if dropout is None else dropout
    mask = t_sp * h if drop else 0  # 1-byte dropout masks
    attn = _attention_activations(model, s, recompute, drop) + 2 * b * t_sp * h + mask
    mlp = 2 * b * t_sp * h + mask  # norm input and norm output (the MLP input)
    if moe_layer:
        mlp += _moe_activations(model, s)
    else:
        f = model.ffn_hidden_size // s.tp
        mlp += b * t * f * (3 if model.mlp == "swiglu" else 2)
    return attn + mlp


def eager_layer_extra_bytes(model: ModelSpec, s: Shard, moe_layer: bool) -> float:
    """What eager PyTorch keeps beyond fused kernels, counted from autograd's saved tensors
    of meshplan's runtime (nn.RMSNorm, F.silu, SDPA): each RMSNorm also keeps its
    normalised input before the weight (2 norms), the attention output is copied into the
    output projection's layout, and SwiGLU keeps silu(gate) beside gate, up and product.
    Under sequence parallelism through DTensor (torchtitan's plan, and meshplan's) the
    column-parallel linears keep their all-gathered inputs, where Megatron-LM keeps the
    sequence shard and gathers again in backward (Korthikanti et al. 2022 §4.2.2)."""
    b, h = s.act_bytes, model.hidden_size
    extra = 2 * s.sp_tokens * h + s.tokens * model.attn_out_dim // s.tp
    if s.sp and s.tp > 1:
        extra += 2 * (s.tokens - s.sp_tokens) * h
    if model.mlp == "swiglu":
        if moe_layer and model.moe is not None:
            moe = model.moe
            extra += s.tokens * moe.top_k * s.etp / s.tp * moe.expert_ffn_hidden_size // s.etp
            extra += s.tokens * moe.n_shared_experts * moe.shared_ffn // s.tp
        else:
            extra += s.tokens * model.ffn_hidden_size // s.tp
    return b * extra


def _op_checkpoint_bytes(model: ModelSpec, s: Shard, moe_layer: bool) -> float:
    """Per-op selective checkpointing (torchtitan's `selective_ac_option="op"`): keep the
    layer input, the attention output and log-sum-exp, and the outputs of every other
    matmul (on average half of them); recompute everything else in backward."""
    gemm_out = sum(o.m * o.n * o.batch for o in layer_ops(model, s, moe_layer)
                   if o.kind == "gemm")
    heads = model.n_heads // s.tp
    attn_out = s.tokens * model.attn_out_dim // s.tp
    lse = 4 * s.mbs * heads * (s.seq // s.cp)
    return s.act_bytes * (s.sp_tokens * model.hidden_size + attn_out + gemm_out / 2) + lse


def _attention_activations(model: ModelSpec, s: Shard, recompute: str, dropout: bool) -> float:
    """Q, K, V, the output-projection input, and the score matrices if materialised."""
    b, t, tp = s.act_bytes, s.tokens, s.tp
    heads = model.n_heads // tp
    if model.mla:
        m = model.mla
        latents = t * (m.q_lora_rank + m.kv_lora_rank)
        qkv = t * heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + m.v_head_dim)
        out = t * heads * m.v_head_dim
        stored = b * (latents + qkv + out)
    else:
        kv_local = kv_width(model, tp)
        q_local = heads * model.head_dim
        stored = b * t * (2 * q_local + 2 * kv_local)
    q_len, kv_len = s.seq // s.cp, s.seq
    if s.attn == "flash":
        return stored + 4 * s.mbs * heads * q_len  # fp32 log-sum-exp per query and head
    if recompute == "selective":
        return stored
    scores = s.mbs * heads * q_len * kv_len
    return stored + scores * (b + (1 + b if dropout else 0))


def _moe_activations(model: ModelSpec, s: Shard) -> float:
    moe = model.moe
    assert moe is not None
    b, h, t = s.act_bytes, model.hidden_size, s.tokens
    routed = t * moe.top_k * s.etp / s.tp
    f = moe.expert_ffn_hidden_size // s.etp
    acts = 4 * t * moe.n_experts  # fp32 router probabilities
    acts += b * routed * h * 2  # permuted expert inputs, expert outputs before combine
    acts += b * routed * f * (3 if model.mlp == "swiglu" else 2)
    if moe.n_shared_experts:
        fs = moe.n_shared_experts * moe.shared_ffn // s.tp
        acts += b * t * fs * (3 if model.mlp == "swiglu" else 2)
    return acts


def head_activation_bytes(model: ModelSpec, s: Shard, eager: bool = False) -> float:
    """Last stage, one micro-batch: the final norm's input and what the loss keeps. Eager:
    an eager RMSNorm also keeps its normalised input and its output (the LM head's
    input), and PyTorch's cross-entropy keeps the fp32 log-probabilities, 4sbv
    (Korthikanti §4.3), over the whole vocabulary on every TP rank: the head's output is
    gathered to replicated logits (meshplan's runtime, and torchtitan without
    loss_parallel). Fused: a fused cross-entropy (`meshplan.kernels.cross_entropy`, as
    Liger-Kernel's) keeps the 16-bit logits of the rank's vocabulary shard and one fp32
    log-sum-exp per token, and writes the gradient over the logits in place."""
    norm = (3 if eager else 1) * s.act_bytes * s.sp_tokens * model.hidden_size
    if eager:
        return norm + 4 * s.tokens * model.vocab_size
    return norm + s.act_bytes * s.tokens * model.vocab_size / s.tp + 4 * s.tokens


def loss_backward_bytes(model: ModelSpec, s: Shard, eager: bool = False) -> float:
    """Eager cross-entropy's backward briefly holds, beside the log-probabilities, the
    gradients over them and over the logits: two more fp32 logits, once, at the start of
    the last stage's backward while its activations are all alive."""
    return 2 * 4 * s.tokens * model.vocab_size if eager else 0.0


def head_held_bytes(model: ModelSpec, s: Shard, eager: bool, schedule: str, pp: int,
                    m: int) -> float:
    """What the loss keeps on the rank holding the last stage at its peak: one
    micro-batch's head activations for each micro-batch the schedule holds there."""
    return head_activation_bytes(model, s, eager) * last_stage_inflight(schedule, pp, m)


def head_grad_bytes(model: ModelSpec, s: Shard, eager: bool = False) -> float:
    """The gradient over the logits that the LM head's weight gradient needs."""
    return (4 * s.tokens * model.vocab_size if eager
            else s.act_bytes * s.tokens * model.vocab_size / s.tp)


def split_backward_grad_bytes(model: ModelSpec, s: Shard, moe_layer: bool) -> float:
    """What one layer keeps for one micro-batch between B (input gradient) and W (weight
    gradients) beyond its activations: the gradient at every weight GEMM's output, which
    W multiplies by that GEMM's input. torch.distributed.pipelining's
    `stage_backward_input` (meshplan's runtime, torchtitan's zero-bubble schedules)
    captures these and retains the whole graph, so the activations stay until W too."""
    out = sum(o.m * o.n * o.batch for o in layer_ops(model, s, moe_layer)
              if o.kind == "gemm" and o.name not in ("qk", "pv"))
    return s.act_bytes * out


def split_backward_pending(schedule: str, rank: int, m: int) -> float:
    """Micro-batches of a rank holding W's gradients at its peak. ZB-H1 defers rank i's
    W by i micro-batches, so at its peak (after B_i, before W_0) it holds min(i + 1, m)
    beside min(p, m) micro-batches of activations; the first stage has no input gradient
    to send and runs its whole backward at W (`runtime.pipeline`), so it holds none."""
    if schedule != "zb" or rank == 0:
        return 0.0
    return float(min(rank + 1, m))


def last_stage_inflight(schedule: str, pp: int, m: int) -> float:
    """Micro-batches whose loss (the logits it keeps) the last stage holds at its peak:
    all m under GPipe, min(p, m) under ZB-H1 (its W comes p − 1 micro-batches after its
    B), and one where each backward follows its forward (1F1B, interleaved)."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "zb":
        return float(min(pp, m))
    return 1.0


def stage_output_bytes(model: ModelSpec, s: Shard) -> float:
    """A pipeline stage's output, which the runtime keeps (to run its backward from)
    until the micro-batch's B; within a stage, each layer's output is the next one's
    saved input and is counted there."""
    return s.act_bytes * s.sp_tokens * model.hidden_size


def inflight_microbatches(schedule: str, pp: int, vpp: int, rank: int, m: int) -> float:
    """Micro-batches of a whole rank's layers alive at its peak, from the schedule IR's rule.

    GPipe keeps all m; 1F1B keeps min(p − r, m) (Narayanan 2021 §2.2.1); ZB-H1 min(p, m)
    on every rank (Qi et al. 2023 §3.1); DualPipe p + 1 of a block, half the rank's
    layers; interleaving keeps
    (p − r − 1)·2 + (v − 1)·p + 1 model chunks of 1/v of the layers (Megatron-LM schedule),
    i.e. 1 + (p − 1)/(p·v) of the layers' worth on rank 0 (Korthikanti §4.2.3). Tests check
    these against `meshplan.core.schedule.peak_inflight`.
    """
    if schedule == "gpipe":
        return float(m)
    if schedule == "zb":  # ZB-H1: every rank up to 1F1B's first-rank peak (W frees)
        return float(min(pp, m))
    if schedule == "dualpipe":  # p + 1 micro-batches of one of the rank's two blocks
        return (pp + 1) / 2  # (DeepSeek-V3 report Table 2)
    if vpp == 1:
        return float(min(pp - rank, m))
    chunks = min((pp - rank - 1) * 2 + (vpp - 1) * pp + 1, m * vpp)
    return chunks / vpp
