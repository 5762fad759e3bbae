"""What is trained: the architecture of a decoder-only transformer, dense or MoE.

`ModelSpec` holds shapes only; FLOPs, bytes and memory live in `meshplan.costmodels`.
Parameter counts here are exact for the architectures listed in the design notes and are
tested against the published sizes of the catalog models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mlp = Literal["swiglu", "gelu"]
Norm = Literal["rmsnorm", "layernorm"]
Position = Literal["rope", "learned"]


@dataclass(frozen=True, kw_only=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1)."""

    q_lora_rank: int  # 0: queries projected directly from the hidden state
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    """Mixture of experts in the MLP of every layer after the first `first_k_dense`."""

    n_experts: int
    top_k: int
    expert_ffn_hidden_size: int
    n_shared_experts: int = 0
    shared_ffn_hidden_size: int = 0  # per shared expert; 0 means expert_ffn_hidden_size
    first_k_dense: int = 0  # dense-first layers (DeepSeek-V3: 3)
    capacity_factor: float | None = None  # None: dropless
    router_bias: bool = False  # DeepSeek-V3 aux-loss-free bias, one per expert

    @property
    def shared_ffn(self) -> int:
        return self.shared_ffn_hidden_size or self.expert_ffn_hidden_size


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden_size: int  # dense MLP width (dense layers of an MoE model too)
    vocab_size: int
    mlp: Mlp = "swiglu"
    norm: Norm = "rmsnorm"
    position: Position = "rope"
    max_position: int = 0  # learned position table size (position="learned")
    tied_embeddings: bool = False
    bias: bool = False  # biases on every linear layer (GPT-2/3)
    qkv_bias: bool = False  # biases on Q, K, V only (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    dropout: bool = False  # dropout after attention and MLP (GPT-3-era Megatron)
    mla: MLASpec | None = None
    moe: MoESpec | None = None
    mtp_layers: int = 0  # DeepSeek-V3 multi-token-prediction modules (not in `params`)
    published_params: float | None = None
    source: str = ""

    # ---- derived shapes -------------------------------------------------
    @property
    def attention_kind(self) -> str:
        if self.mla is not None:
            return "mla"
        if self.n_kv_heads == self.n_heads:
            return "mha"
        return "mqa" if self.n_kv_heads == 1 else "gqa"

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (= hidden for most models, not Qwen3)."""
        if self.mla:
            return self.n_heads * (self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim)
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token as the attention core sees it."""
        if self.mla:
            return self.n_heads * (self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim)
        return self.n_kv_heads * self.head_dim

    @property
    def v_dim(self) -> int:
        if self.mla:
            return self.n_heads * self.mla.v_head_dim
        return self.n_kv_heads * self.head_dim

    @property
    def attn_out_dim(self) -> int:
        return self.n_heads * (self.mla.v_head_dim if self.mla else self.head_dim)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.first_k_dense

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.moe is None else self.n_layers - self.moe.first_k_dense

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    # ---- parameter counts -----------------------------------------------
    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def attention_params(self) -> int:
        h = self.hidden_size
        if self.mla:
            m = self.mla
            qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank:
                q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * self.n_heads * qk_head
            else:
                q = h * self.n_heads * qk_head
            kv_down = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            kv_up = m.kv_lora_rank * self.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
            return q + kv_down + kv_up + self.n_heads * m.v_head_dim * h
        qkv_out = self.q_dim + 2 * self.n_kv_heads * self.head_dim
        p = h * qkv_out + self.q_dim * h
        if self.bias or self.qkv_bias:
            p += qkv_out
        if self.bias:
            p += h
        if self.qk_norm:
            p += 2 * self.head_dim
        return p

    def mlp_params(self, ffn: int) -> int:
        h = self.hidden_size
        if self.mlp == "swiglu":
            return 3 * h * ffn + (2 * ffn + h if self.bias else 0)
        return 2 * h * ffn + (ffn + h if self.bias else 0)

    def moe_params(self, active: bool = False) -> int:
        moe = self.moe
        assert moe is not None
        experts = moe.top_k if active else moe.n_experts
        router = self.hidden_size * moe.n_experts + (moe.n_experts if moe.router_bias else 0)
        return (
            router
            + experts * self.mlp_params(moe.expert_ffn_hidden_size)
            + moe.n_shared_experts * self.mlp_params(moe.shared_ffn)
        )

    def layer_params(self, layer: int, active: bool = False) -> int:
        mlp = (
            self.moe_params(active)
            if self.is_moe_layer(layer)
            else self.mlp_params(self.ffn_hidden_size)
        )
        return self.attention_params() + mlp + 2 * self.norm_params()

    def layer_tensors(self, layer: int) -> int:
        """Parameter tensors of a layer (as built by meshplan's runtime: experts stacked
        into three tensors), which per-tensor optimizer costs scale with."""
        biased = 2 if self.bias else 1
        attn = 4 * biased if not self.qkv_bias or self.bias else 4 + 3
        attn += 2 if self.qk_norm else 0
        if self.is_moe_layer(layer):
            assert self.moe is not None
            mlp = 1 + 3 + (3 if self.moe.n_shared_experts else 0)
        else:
            mlp = (3 if self.mlp == "swiglu" else 2) * biased
        return attn + mlp + 2

    def end_tensors(self, first: bool, last: bool) -> int:
        """Embedding (first stage); final norm and untied output (last stage)."""
        return (first * (2 if self.position == "learned" else 1)
                + last * (1 + (not self.tied_embeddings)))

    def embedding_params(self) -> int:
        pos = self.max_position * self.hidden_size if self.position == "learned" else 0
        return self.vocab_size * self.hidden_size + pos

    def head_params(self) -> int:
        """Final norm plus the output projection (zero extra when tied)."""
        out = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.norm_params() + out

    def params(self, active: bool = False) -> int:
        """Total parameters (or those active per token for MoE), excluding MTP modules."""
        return self.embedding_params() + self._layers_params(active) + self.head_params()

    def _layers_params(self, active: bool) -> int:
        dense = self.n_dense_layers * self.layer_params(0, active) if self.n_dense_layers else 0
        moe = self.n_moe_layers * self.layer_params(self.n_layers - 1, active) \
            if self.n_moe_layers else 0
        return dense + moe

    def matmul_params_per_token(self) -> int:
        """Parameters a token multiplies against (active experts, logits; no lookups).

        The `N` of the 6·N FLOPs-per-token rule in PaLM (Chowdhery et al. 2022, App. B).
        """
        layers = self._layers_params(active=True)
        norms = 2 * self.norm_params() * self.n_layers
        return layers - norms + self.vocab_size * self.hidden_size
