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


def test_the_loss_keeps_fp32_log_probabilities_over_the_whole_vocabulary_when_eager():
    # Eager: TP gathers the logits (no loss_parallel), so every TP rank keeps 4sbv bytes of
    # log-probabilities and its backward briefly holds two more; fused: the rank's shard.
    from meshplan.costmodels.memory import head_activation_bytes, loss_backward_bytes
    one, two = (Shard(mbs=B, seq=S, tp=t, sp=True, act_bytes=2) for t in (1, 2))
    logits = 4 * B * S * GPT.vocab_size
    norm = 3 * 2 * B * S * H
    assert head_activation_bytes(GPT, one, eager=True) == pytest.approx(norm + logits)
    assert head_activation_bytes(GPT, two, eager=True) == pytest.approx(norm / 2 + logits)
    assert loss_backward_bytes(GPT, two, eager=True) == pytest.approx(2 * logits)
    fused = head_activation_bytes(GPT, two) - 2 * B * S * H / 2 - 4 * B * S
    assert fused == pytest.approx(2 * B * S * GPT.vocab_size / 2)
    assert loss_backward_bytes(GPT, two) == 0.0


def test_full_recompute_and_the_loss_backward_do_not_peak_together():
    # Full recompute: the checkpoints and the loss are kept; the loss's backward comes and
    # goes before the first layer is recomputed, so the larger of the two is added.
    from meshplan.api import simulate
    from meshplan.core.plan import Plan
    from meshplan.core.workload import TrainWorkload
    from meshplan.costmodels.memory import head_activation_bytes, loss_backward_bytes
    from meshplan.costmodels.memory import layer_activation_bytes as layer
    from meshplan.loaders import load_cluster, load_model

    model, cluster = load_model("tiny-dense"), load_cluster("cpu").with_gpus(1)
    work = TrainWorkload(seq_len=256, global_batch=4, dtype="fp32")
    full = simulate(model, cluster, work, Plan.parse("mbs=4,recompute=full,kernels=eager"))
    s = Shard(mbs=4, seq=256, act_bytes=4)
    kept = model.n_layers * layer(model, s, "full", False) + head_activation_bytes(model, s, True)
    brief = max(layer(model, s, "none", False, eager=True), loss_backward_bytes(model, s, True))
    assert full.memory.activations == pytest.approx(kept + brief)


def test_a_split_backward_holds_what_b_recomputed_until_w():
    # torch.distributed.pipelining's B retains the graph for W: under full recompute the
    # layers' recomputed activations stay too. ZB-H1's last stage peaks after the B of
    # every micro-batch it holds (p of them), so there full recompute saves nothing;
    # under 1F1B it saves the one micro-batch's dropped activations, less the layer it
    # briefly recomputes in backward.
    from meshplan.core.plan import Plan
    from meshplan.core.workload import TrainWorkload
    from meshplan.costmodels.memory import layer_activation_bytes as layer
    from meshplan.loaders import load_cluster, load_model
    from meshplan.simulator.analytical import prepare

    model, cluster = load_model("tiny-dense"), load_cluster("cpu").with_gpus(2)
    work = TrainWorkload(seq_len=256, global_batch=16, dtype="fp32")

    def acts(text):  # the last stage's rank
        return prepare(model, cluster, work, Plan.parse(text), None).rank_memory(1).activations

    s = Shard(mbs=2, seq=256, act_bytes=4)
    dropped = 2 * (layer(model, s, "none", False) - layer(model, s, "full", False))
    assert acts("pp=2,mbs=2,recompute=full,schedule=zb") == acts("pp=2,mbs=2,schedule=zb")
    assert acts("pp=2,mbs=2") - acts("pp=2,mbs=2,recompute=full") == pytest.approx(
        dropped - layer(model, s, "none", False))
