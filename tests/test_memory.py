"""Formulas that must match their papers exactly (validation ring 1)."""

import pytest

from meshplan.core.loaders import model_from_dict
from meshplan.costmodels.flops import Shard
from meshplan.costmodels.memory import layer_activation_bytes, model_state_bytes


@pytest.mark.parametrize("zero,expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_paper_example(zero, expected_gb):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, N_d = 64, K = 12.
    total = sum(model_state_bytes(7.5e9, 64, zero, 12))
    assert total / 1e9 == pytest.approx(expected_gb, rel=0.01)


S, B, H, A, L = 2048, 4, 12288, 96, 96  # GPT-3 175B shapes as in Korthikanti et al.
GPT = model_from_dict({"name": "gpt", "n_layers": L, "hidden_size": H, "n_heads": A,
                       "ffn_hidden_size": 4 * H, "vocab_size": 51200, "mlp": "gelu",
                       "norm": "layernorm", "position": "learned", "max_position": S,
                       "tied_embeddings": True, "bias": True, "dropout": True})


def _acts(t, sp, recompute):
    shard = Shard(mbs=B, seq=S, tp=t, sp=sp, attn="unfused")
    return layer_activation_bytes(GPT, shard, recompute, moe_layer=False)


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_korthikanti_table2(t):
    sbh = S * B * H
    attn = 5 * A * S / H
    # Korthikanti et al. 2022, Table 2 (per layer, bytes).
    assert _acts(t, False, "none") == pytest.approx(sbh * (10 + 24 / t + attn / t))
    assert _acts(t, True, "none") == pytest.approx(sbh / t * (34 + attn))
    assert _acts(t, False, "selective") == pytest.approx(sbh * (10 + 24 / t))
    assert _acts(t, True, "selective") == pytest.approx(sbh / t * 34)
    assert _acts(t, False, "full") == pytest.approx(2 * sbh)
    assert _acts(t, True, "full") == pytest.approx(2 * sbh / t)


def test_no_parallelism_formula():
    assert _acts(1, False, "none") == pytest.approx(S * B * H * (34 + 5 * A * S / H))


def test_flash_attention_stores_no_scores():
    shard = Shard(mbs=B, seq=S, tp=8, sp=True, attn="flash")
    flash = layer_activation_bytes(GPT, shard, "none", moe_layer=False)
    assert flash < _acts(8, True, "none")
    # Only the fp32 log-sum-exp per query and head is added to the selective layout.
    assert flash == pytest.approx(_acts(8, True, "selective") + 4 * B * (A // 8) * S)
