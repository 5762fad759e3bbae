import pytest

import meshplan as mp
from meshplan.core.loaders import model_from_hf_config, model_from_toml

PUBLISHED = [n for n in mp.model_names() if not n.startswith("tiny")]


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_matches_published_size(name):
    m = mp.load_model(name)
    assert m.published_params, f"{name} has no published size"
    assert m.params() == pytest.approx(m.published_params, rel=0.01)


@pytest.mark.parametrize("name,active", [("mixtral-8x7b", 12.9e9), ("qwen3-30b-a3b", 3.3e9),
                                         ("deepseek-v3", 37e9), ("mixtral-8x22b", 39e9)])
def test_active_parameters_of_moe_models(name, active):
    # Published rounded active sizes; within 2% of the rounding.
    assert mp.load_model(name).params(active=True) == pytest.approx(active, rel=0.02)


def test_tiny_models_are_cpu_sized():
    for name in ("tiny-dense", "tiny-moe"):
        assert mp.load_model(name).params() < 5e6


def test_attention_kinds():
    assert mp.load_model("llama2-7b").attention_kind == "mha"
    assert mp.load_model("llama3-8b").attention_kind == "gqa"
    assert mp.load_model("deepseek-v3").attention_kind == "mla"


LLAMA3_8B_HF = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
}
MIXTRAL_HF = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    "tie_word_embeddings": False,
}
DEEPSEEK_V3_HF = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "vocab_size": 129280, "tie_word_embeddings": False, "topk_method": "noaux_tc",
    "num_nextn_predict_layers": 1,
}
QWEN3_MOE_HF = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
    "vocab_size": 151936, "tie_word_embeddings": False,
}
GPT2_HF = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
           "n_positions": 1024, "vocab_size": 50257}


@pytest.mark.parametrize("cfg,catalog", [(LLAMA3_8B_HF, "llama3-8b"),
                                         (MIXTRAL_HF, "mixtral-8x7b"),
                                         (DEEPSEEK_V3_HF, "deepseek-v3"),
                                         (QWEN3_MOE_HF, "qwen3-30b-a3b")])
def test_hf_config_matches_catalog(cfg, catalog):
    assert model_from_hf_config(cfg).params() == mp.load_model(catalog).params()


def test_gpt2_small_from_hf_config():
    # GPT-2 small: 124.4M parameters (tied embeddings, learned positions, biases).
    assert model_from_hf_config(GPT2_HF).params() == pytest.approx(124.44e6, rel=0.001)


def test_unknown_key_is_an_error():
    with pytest.raises(mp.SpecError, match="unknown keys.*n_layer"):
        model_from_toml('name="x"\nn_layer=2\nhidden_size=8\nn_heads=2\nffn_hidden_size=8\n'
                        'vocab_size=8')


def test_kv_heads_must_divide_heads():
    with pytest.raises(mp.SpecError, match="n_kv_heads"):
        model_from_toml('n_layers=2\nhidden_size=8\nn_heads=4\nn_kv_heads=3\n'
                        'ffn_hidden_size=8\nvocab_size=8')


def test_model_from_files(tmp_path):
    import json
    cfg = tmp_path / "llama" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(LLAMA3_8B_HF))
    assert mp.load_model(str(cfg)).name == "llama"
    with pytest.raises(mp.SpecError, match="neither a catalog model"):
        mp.load_model("no-such-model")
