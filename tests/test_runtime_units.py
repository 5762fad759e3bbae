"""Runtime pieces that need no process group: model, data, zigzag split, checkpoint dirs."""

from __future__ import annotations

import numpy as np
import pytest

from meshplan.core.errors import SpecError
from meshplan.core.plan import Plan
from meshplan.loaders import load_model

torch = pytest.importorskip("torch")

from meshplan.runtime.checkpoint import latest  # noqa: E402
from meshplan.runtime.context import zigzag_index  # noqa: E402
from meshplan.runtime.data import SyntheticData, TokenFile, rank_micro_batches  # noqa: E402
from meshplan.runtime.model import MoE, Transformer, init_weights  # noqa: E402
from meshplan.runtime.parallelize import split_stages  # noqa: E402


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_model_parameter_count_matches_spec(name):
    spec = load_model(name)
    model = Transformer(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.params()
    tensors = sum(spec.layer_tensors(i) for i in range(spec.n_layers)) + \
        spec.end_tensors(True, True)
    assert len(list(model.parameters())) == tensors


def test_moe_dispatch_equals_per_token_loop():
    spec = load_model("tiny-moe")
    model = Transformer(spec)
    init_weights(model, 0)
    moe = model.layers["1"].feed_forward
    assert isinstance(moe, MoE)
    x = torch.randn(2, 5, spec.hidden_size)
    out = moe(x)
    flat = x.reshape(-1, spec.hidden_size)
    probs = moe.router(flat).softmax(-1)
    w, ids = probs.topk(moe.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    e = moe.experts
    want = moe.shared(flat).clone()
    for t in range(flat.shape[0]):
        for k in range(moe.top_k):
            i = ids[t, k]
            h = torch.nn.functional.silu(e.w1[i] @ flat[t]) * (e.w3[i] @ flat[t])
            want[t] += w[t, k] * (e.w2[i] @ h)
    torch.testing.assert_close(out.reshape(-1, spec.hidden_size), want, atol=1e-5, rtol=1e-5)


def test_pipeline_chunks_hold_their_layers_and_ends():
    spec = load_model("tiny-dense")
    full = Transformer(spec)
    plan = Plan.parse("pp=2,vpp=2,mbs=1").resolve(2)
    rank0 = split_stages(full, plan, 0)  # stages 0 and 2
    rank1 = split_stages(full, plan, 1)  # stages 1 and 3
    assert [list(c.layers) for c in rank0] == [["0"], ["2"]]
    assert [list(c.layers) for c in rank1] == [["1"], ["3"]]
    assert rank0[0].tok_embeddings is not None and rank0[1].tok_embeddings is None
    assert rank1[1].output is not None and rank1[0].output is None


def test_zigzag_split_covers_the_sequence_and_balances_the_causal_work():
    seq, cp = 32, 4
    parts = [zigzag_index(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    work = [int((p + 1).sum()) for p in parts]  # keys each query attends to
    assert len(set(work)) == 1


def test_synthetic_batches_depend_only_on_seed_and_step():
    a, b = SyntheticData(512, 16, 8, seed=3), SyntheticData(512, 16, 8, seed=3)
    assert torch.equal(a.global_batch(5), b.global_batch(5))
    assert not torch.equal(a.global_batch(5), a.global_batch(6))
    x = a.global_batch(0)
    assert x.shape == (8, 17) and int(x.max()) < 512


def test_micro_batches_split_rows_by_dp_and_columns_by_cp():
    batch = torch.arange(8 * 9).view(8, 9)
    mbs = rank_micro_batches(batch, dp=2, dp_rank=1, cp=2, cp_rank=0, mbs=2,
                             device=torch.device("cpu"))
    assert len(mbs) == 2
    assert mbs[0].positions.tolist() == [0, 1, 6, 7]
    assert mbs[0].tokens[0].tolist() == [36, 37, 42, 43]
    assert mbs[0].labels[0].tolist() == [37, 38, 43, 44]


def test_token_file_is_checked(tmp_path):
    good = tmp_path / "tokens.npy"
    np.save(good, np.arange(1000) % 100)
    data = TokenFile(good, vocab=128, seq_len=16, global_batch=4, seed=0)
    assert data.global_batch(1).shape == (4, 17)
    with pytest.raises(SpecError, match="token id 99 >= vocabulary 64"):
        TokenFile(good, vocab=64, seq_len=16, global_batch=4, seed=0)
    np.save(tmp_path / "f.npy", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(SpecError, match="1-D integer array"):
        TokenFile(tmp_path / "f.npy", vocab=64, seq_len=2, global_batch=1, seed=0)


def test_latest_checkpoint_skips_partial_saves(tmp_path):
    assert latest(tmp_path) is None
    for name in ("step_2", "step_10", "step_12.partial"):
        (tmp_path / name).mkdir()
    assert latest(tmp_path) == (10, tmp_path / "step_10")


@pytest.mark.parametrize("name,layer", [("tiny-dense", "0"), ("tiny-moe", "1")])
def test_eager_activation_model_counts_what_autograd_saves(name, layer):
    """The memory model's eager layer bytes against the tensors autograd keeps for the
    runtime's block (parameters left out), fp32, one micro-batch."""
    from meshplan.costmodels.flops import Shard
    from meshplan.costmodels.memory import layer_activation_bytes
    from meshplan.runtime.model import rope_tables

    spec = load_model(name)
    model = Transformer(spec)
    init_weights(model, 0)
    block, mbs, seq = model.layers[layer], 4, 256
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and not any(t._base is p for p in block.parameters()):
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(mbs, seq, spec.hidden_size, requires_grad=True)
    pos = torch.arange(seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope_tables(spec.head_dim, pos), pos)
    shard = Shard(mbs=mbs, seq=seq, act_bytes=4)
    predicted = layer_activation_bytes(spec, shard, "none", spec.is_moe_layer(int(layer)),
                                       eager=True)
    assert predicted == pytest.approx(sum(saved.values()), rel=0.06)


@pytest.mark.parametrize("plan,world,reason", [
    ("dp=2,pp=2,zero=1,schedule=zb", 4, "past FSDP's hooks"),
    ("dp=2,pp=2,zero=3,schedule=dualpipe", 4, "past FSDP's hooks")])
def test_runtime_refuses_schedules_it_cannot_run(plan, world, reason):
    from meshplan.runtime.support import refuse_unsupported_plan

    with pytest.raises(SpecError, match=reason):
        refuse_unsupported_plan(load_model("tiny-dense"), Plan.parse(plan).resolve(world),
                                False)


def test_routing_recorded_from_tiny_moe_feeds_the_placement():
    """The runtime's routers write a trace that `place-experts` reads; on it the MILP is
    no worse than the baselines."""
    from meshplan.core.routing import routing_from_topk
    from meshplan.planner.placement import PlacementProblem, optimise_placement
    from meshplan.runtime.routing import RoutingRecorder

    spec = load_model("tiny-moe")
    model = Transformer(spec)
    init_weights(model, 0)
    recorder = RoutingRecorder({0: model})
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randint(0, spec.vocab_size, (2, 32), generator=gen), torch.arange(32))
    ids = recorder.topk_ids()
    assert ids.shape == (spec.n_moe_layers, 3 * 2 * 32, spec.moe.top_k)
    routing = routing_from_topk(ids, spec.moe.n_experts)
    pr = PlacementProblem(routing=routing, n_gpus=4, gpus_per_node=2, redundant=4,
                          compute_s_per_token=1e-6, nic_s_per_token=1e-6)
    res = optimise_placement(pr, time_limit_s=4)
    assert res.cost.objective_s <= min(c.objective_s for c in res.baselines.values())
