"""Strict parsers from plain data (TOML text, dicts, HF config.json dicts) to specs.

Pure: these take text or dicts; reading files and the packaged catalog happens in
`meshplan.loaders`. Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

from .cluster import ClusterSpec, DeviceSpec, NetworkSpec, NodeSpec
from .errors import SpecError, require
from .model import MLASpec, ModelSpec, MoESpec


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    require(not unknown, where, f"unknown keys {unknown}; known keys are {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as err:  # missing required keys
        raise SpecError(where, str(err).split("__init__() ")[-1]) from None


def model_from_dict(data: dict[str, Any], name: str = "") -> ModelSpec:
    data = dict(data)
    data.setdefault("name", name or "model")
    if "moe" in data:
        data["moe"] = _build(MoESpec, data["moe"], f"model {name}.moe")
    if "mla" in data:
        data["mla"] = _build(MLASpec, data["mla"], f"model {name}.mla")
    if "head_dim" not in data and "hidden_size" in data and "n_heads" in data:
        data["head_dim"] = data["hidden_size"] // data["n_heads"]
    if "n_kv_heads" not in data and "n_heads" in data:
        data["n_kv_heads"] = data["n_heads"]
    model = _build(ModelSpec, data, f"model {name}")
    check_model(model)
    return model


def model_from_toml(text: str, name: str = "") -> ModelSpec:
    try:
        return model_from_dict(tomllib.loads(text), name)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"model {name}", f"invalid TOML: {err}") from None


def check_model(m: ModelSpec) -> None:
    for field in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        value = getattr(m, field)
        require(value > 0, f"model.{field}", f"must be positive, got {value}")
    require(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        f"n_heads ({m.n_heads}) is not a multiple of n_kv_heads ({m.n_kv_heads})",
    )
    if m.moe:
        require(
            1 <= m.moe.top_k <= m.moe.n_experts,
            "model.moe.top_k",
            f"top_k ({m.moe.top_k}) must be in 1..n_experts ({m.moe.n_experts})",
        )
        require(
            m.moe.first_k_dense < m.n_layers,
            "model.moe.first_k_dense",
            f"{m.moe.first_k_dense} dense-first layers leave no MoE layer of {m.n_layers}",
        )
    if m.position == "learned":
        require(m.max_position > 0, "model.max_position", "learned positions need max_position")


# ---- Hugging Face config.json ---------------------------------------------

def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def model_from_hf_config(cfg: dict[str, Any], name: str = "hf-model") -> ModelSpec:
    """Llama, Mistral, Mixtral, Qwen2/Qwen3(-MoE), DeepSeek-V2/V3, GPT-2 and NeoX keys."""
    mtype = str(cfg.get("model_type", "")).lower()
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    require(hidden and layers and heads, f"model {name}",
            "config.json lacks hidden_size / num_hidden_layers / num_attention_heads")
    gpt_style = mtype in ("gpt2", "gpt_neox", "gptj", "gpt_bigcode")
    ffn = _first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    data: dict[str, Any] = {
        "name": name,
        "n_layers": layers,
        "hidden_size": hidden,
        "n_heads": heads,
        "n_kv_heads": _first(cfg, "num_key_value_heads", default=heads),
        "head_dim": _first(cfg, "head_dim", default=hidden // heads),
        "ffn_hidden_size": ffn,
        "vocab_size": cfg["vocab_size"],
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", gpt_style)),
        "mlp": "gelu" if gpt_style else "swiglu",
        "norm": "layernorm" if gpt_style else "rmsnorm",
        "position": "learned" if mtype == "gpt2" else "rope",
        "bias": mtype in ("gpt2", "gpt_neox"),
        "qkv_bias": bool(cfg.get("attention_bias", mtype == "qwen2" or mtype == "qwen2_moe")),
        "qk_norm": mtype in ("qwen3", "qwen3_moe"),
        "source": "Hugging Face config.json",
    }
    if mtype == "gpt2":
        data["max_position"] = cfg.get("n_positions", 1024)
    if cfg.get("kv_lora_rank"):
        data["mla"] = {
            "q_lora_rank": cfg.get("q_lora_rank") or 0,
            "kv_lora_rank": cfg["kv_lora_rank"],
            "qk_nope_head_dim": cfg["qk_nope_head_dim"],
            "qk_rope_head_dim": cfg["qk_rope_head_dim"],
            "v_head_dim": cfg["v_head_dim"],
        }
        data["head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    n_experts = _first(cfg, "n_routed_experts", "num_local_experts", "num_experts")
    if n_experts:
        data["moe"] = _hf_moe(cfg, n_experts, ffn)
    data["mtp_layers"] = cfg.get("num_nextn_predict_layers", 0) or 0
    return model_from_dict(data, name)


def _hf_moe(cfg: dict[str, Any], n_experts: int, ffn: int) -> dict[str, Any]:
    expert_ffn = _first(cfg, "moe_intermediate_size", default=ffn)
    n_shared = _first(cfg, "n_shared_experts", default=0)
    shared_ffn = 0
    if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one wide shared expert
        n_shared, shared_ffn = 1, cfg["shared_expert_intermediate_size"]
    first_dense = _first(cfg, "first_k_dense_replace", default=0)
    if cfg.get("mlp_only_layers"):
        first_dense = len(cfg["mlp_only_layers"])
    return {
        "n_experts": n_experts,
        "top_k": _first(cfg, "num_experts_per_tok", "num_experts_per_token", default=2),
        "expert_ffn_hidden_size": expert_ffn,
        "n_shared_experts": n_shared,
        "shared_ffn_hidden_size": shared_ffn,
        "first_k_dense": first_dense,
        "router_bias": cfg.get("topk_method") == "noaux_tc",
    }


# ---- clusters ---------------------------------------------------------------

def cluster_from_dict(data: dict[str, Any], name: str = "") -> ClusterSpec:
    data = dict(data)
    where = f"cluster {name or data.get('name', '')}"
    if isinstance(data.get("device"), dict) and "gemm_tile" in data["device"]:
        data["device"] = dict(data["device"], gemm_tile=tuple(data["device"]["gemm_tile"]))
    for key, cls in (("device", DeviceSpec), ("node", NodeSpec), ("network", NetworkSpec)):
        require(key in data, where, f"missing table [{key}]")
        data[key] = _build(cls, data[key], f"{where}.{key}")
    data.setdefault("name", name)
    cluster = _build(ClusterSpec, data, where)
    cluster.check()
    return cluster


def cluster_from_toml(text: str, name: str = "") -> ClusterSpec:
    try:
        return cluster_from_dict(tomllib.loads(text), name)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"cluster {name}", f"invalid TOML: {err}") from None
