from dataclasses import replace

import pytest

import meshplan as mp
from meshplan.core.schedule import build_schedule, makespan
from meshplan.costmodels.flops import model_flops_per_token

KEYS = {"step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_bytes", "fits",
        "memory_breakdown_bytes", "time_breakdown_s", "plan"}


def _sim(model="llama3-70b", cluster="h100-sxm", gpus=64, seq=8192, batch=512,
         plan="tp=8,pp=2,mbs=1,recompute=selective,zero=1,sp=on", **kw):
    c = mp.load_cluster(cluster, gpus)
    w = mp.TrainWorkload(seq_len=seq, global_batch=batch, **kw)
    return mp.simulate(mp.load_model(model), c, w, plan)


def test_result_has_contract_keys():
    d = _sim().to_dict()
    assert KEYS <= set(d)
    assert set(d["memory_breakdown_bytes"]) == {"weights", "gradients", "optimizer",
                                                "activations", "kv_cache", "buffers"}
    assert set(d["time_breakdown_s"]) == {"compute", "recompute", "exposed_comm", "bubble",
                                          "offload", "optimizer"}


def test_breakdowns_add_up():
    r = _sim()
    assert r.time.total == pytest.approx(r.step_time_s)
    assert r.memory.total == pytest.approx(r.peak_memory_bytes)
    assert 0 < r.mfu < r.hfu < 1


def test_mfu_definition():
    r = _sim()
    flops = model_flops_per_token(mp.load_model("llama3-70b"), 8192) * 8192 * 512
    assert r.mfu == pytest.approx(flops / r.step_time_s / (64 * 989e12))
    assert r.tflops_per_gpu == pytest.approx(r.mfu * 989)


def test_narayanan_eq3_for_gpt():
    # eq. 3 without recompute: 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)) per iteration.
    m = mp.load_model("gpt3-175b")
    s, h, nl, v = 2048, 12288, 96, m.vocab_size
    eq3 = 72 * s * nl * h * h * (1 + s / (6 * h) + v / (12 * nl * h))
    assert model_flops_per_token(m, s) * s == pytest.approx(eq3, rel=1e-3)


def test_pipeline_closed_form_matches_schedule_ir():
    r = _sim(plan="tp=8,pp=4,mbs=1,zero=1,sp=on", batch=64)
    m = 64 // 2
    c = r.time
    per_mb = (c.compute + c.recompute + c.exposed_comm - r.comm_s["dp_exposed"]
              - r.comm_s["pp_p2p"]) / m
    # Stages differ only by embedding/head; the IR with equal stages bounds it.
    s = build_schedule("1f1b", 4, m)
    equal = makespan(s, [per_mb / 3] * 4, [2 * per_mb / 3] * 4)
    assert (c.bubble + m * per_mb) == pytest.approx(equal, rel=0.05)


def test_more_pipeline_microbatches_shrink_the_bubble():
    small = _sim(plan="tp=8,pp=4,mbs=4,zero=1,sp=on", batch=256)
    big = _sim(plan="tp=8,pp=4,mbs=1,zero=1,sp=on", batch=256)
    assert big.time.bubble / big.step_time_s < small.time.bubble / small.step_time_s


def test_recompute_trades_time_for_memory():
    none = _sim(plan="tp=8,pp=2,zero=1,sp=on,recompute=none")
    full = _sim(plan="tp=8,pp=2,zero=1,sp=on,recompute=full")
    assert full.peak_memory_bytes < none.peak_memory_bytes
    assert full.step_time_s > none.step_time_s
    assert full.hfu > full.mfu


def test_zero_shards_model_states():
    results = [_sim(plan=f"tp=8,pp=2,zero={z},sp=on") for z in range(4)]
    states = [r.memory.weights + r.memory.gradients + r.memory.optimizer for r in results]
    assert states[0] > states[1] > states[2] > states[3]


def test_faster_network_is_never_slower():
    base = mp.load_cluster("h100-sxm", 64)
    fast = replace(base, node=replace(base.node, nic_bw_bytes_per_s=100e9))
    w = mp.TrainWorkload(seq_len=4096, global_batch=256)
    m = mp.load_model("llama3-8b")
    for plan in ("tp=1,zero=1", "tp=2,pp=2,zero=3", "tp=8,cp=2"):
        assert mp.simulate(m, fast, w, plan).step_time_s <= mp.simulate(m, base, w,
                                                                         plan).step_time_s


def test_does_not_fit_is_reported():
    r = _sim(model="llama3-405b", gpus=8, batch=8, plan="tp=8")
    assert not r.fits and "memory" in r.violations[0]


def test_moe_models_simulate():
    r = _sim(model="mixtral-8x7b", gpus=64, seq=4096, batch=256,
             plan="tp=2,ep=8,pp=2,zero=1,sp=on")
    assert r.fits and r.step_time_s > 0
    r = _sim(model="deepseek-v3", gpus=2048, seq=4096, batch=4096,
             plan="pp=16,ep=64,zero=1,recompute=full")
    assert r.step_time_s > 0 and r.mfu < 0.6


def test_tiny_models_on_cpu():
    for name in ("tiny-dense", "tiny-moe"):
        r = _sim(model=name, cluster="cpu", gpus=4, seq=64, batch=8, plan="dp=2,pp=2",
                 dtype="fp32")
        assert r.fits and r.step_time_s > 0


def test_bad_plan_raises_spec_error():
    with pytest.raises(mp.SpecError, match="does not divide 64 GPUs"):
        _sim(plan="tp=8,pp=3")


def test_exposed_beside_is_the_fluid_pair():
    from meshplan.costmodels.costs import exposed_beside
    assert exposed_beside(2.0, 1.0, 0.0) == 0.0  # no interference: fully hidden
    assert exposed_beside(0.0, 1.0, 0.25) == 1.0  # nothing to hide behind
    assert exposed_beside(1.0, 3.0, 0.25) == pytest.approx(2.0)  # outlasts the compute
    # hidden: 1 s of communication slows 2 s of compute by 1 - 1/1.25 of a second
    assert exposed_beside(2.0, 1.0, 0.25) == pytest.approx(0.2)
    # continuous where the communication just covers the slowed compute
    assert exposed_beside(1.0, 1.25, 0.25) == pytest.approx(0.25)


def _with_slowdown(plan: str, slowdown: float):
    from meshplan.costmodels.costs import NominalCosts
    from meshplan.simulator.analytical import CostCache, simulate_analytical

    class Costs(NominalCosts):
        def overlap_slowdown(self):
            return slowdown

    c = mp.load_cluster("h100-sxm", 16)
    return simulate_analytical(mp.load_model("llama3-8b"), c,
                               mp.TrainWorkload(seq_len=4096, global_batch=32),
                               mp.Plan.parse(plan), CostCache(costs=Costs(c)))


@pytest.mark.parametrize("plan", ["dp=16,zero=3,mbs=1", "dp=4,cp=4,mbs=1",
                                  "dp=8,tp=2,sp=on,zero=1,mbs=2,tp_overlap=on"])
def test_overlapped_communication_slows_the_compute_under_it(plan):
    """FSDP gathers, the CP ring and async TP all run beside compute: a larger interference
    factor makes the step longer, and with none the overlap is free where it fits."""
    times = [_with_slowdown(plan, s).step_time_s for s in (0.0, 0.189, 0.4)]
    assert times[0] < times[1] < times[2]


def test_async_tp_pays_for_its_chunked_gemms():
    """With the TP collectives made free the only difference tp_overlap makes is the
    decomposition of the GEMMs beside them into tp pieces, which is never faster."""
    from meshplan.costmodels.costs import NominalCosts
    from meshplan.costmodels.flops import Shard, layer_ops, tp_chunked
    from meshplan.simulator.analytical import ops_time_s
    m, c = mp.load_model("llama3-405b"), mp.load_cluster("h100-sxm", 8)
    ops = layer_ops(m, Shard(mbs=1, seq=8192, tp=8, sp=True), False)
    chunked = tp_chunked(ops, 8)
    assert {o.name for o in chunked if o.chunks == 8} == {"qkv", "attn_out", "mlp_gate_up",
                                                         "mlp_down"}
    costs = NominalCosts(c)
    assert ops_time_s(costs, "bf16", chunked) > ops_time_s(costs, "bf16", ops)


def test_learned_positions_have_no_rope():
    from meshplan.costmodels.flops import Shard, layer_ops
    gpt, llama = mp.load_model("gpt3-175b"), mp.load_model("llama3-8b")
    s = Shard(mbs=1, seq=2048)
    assert "rope" not in {o.name for o in layer_ops(gpt, s, False)}
    assert "rope" in {o.name for o in layer_ops(llama, s, False)}


@pytest.mark.parametrize("sp", [True, False])
def test_embedding_and_head_pay_their_tp_collectives(sp):
    """Under TP the embedding's partial sums and the head's input cross the TP group once
    each way per micro-batch (SP: reduce-scatter and all-gather; else one all-reduce each
    way), and an eager head gathers its vocabulary-sharded logits (as meshplan's runtime
    does: `gloo:all_gather` of [mbs, seq, vocab/tp] per micro-batch in its trace)."""
    from meshplan.simulator.analytical import prepare
    m, c = mp.load_model("llama3-8b"), mp.load_cluster("h100-sxm", 8)
    w = mp.TrainWorkload(seq_len=4096, global_batch=8)
    cm = prepare(m, c, w, mp.Plan.parse(f"tp=2,dp=4,mbs=1,sp={'on' if sp else 'off'},"
                                        "kernels=eager"), None)
    act, logits = cm.tp_bytes, 4096 * m.vocab_size * 2
    fwd, bwd = cm.ends_tp(True, True)
    if sp:
        assert fwd == [("reduce_scatter", act), ("all_gather", act), ("all_gather", logits)]
        assert bwd == [("all_gather", act), ("reduce_scatter", act)]
    else:
        assert fwd == [("all_reduce", act), ("all_gather", logits)]
        assert bwd == [("all_reduce", act)]
    f, b = cm.ends_phase(True, True)
    assert f.comm > 0 and b.comm > 0
    fused = prepare(m, c, w, replace(cm.plan, kernels="fused"), None)
    assert fused.ends_tp(False, True)[0][-3:] == [("all_reduce", 4 * 4096)] * 3
    plain = prepare(m, c, w, mp.Plan.parse("dp=8,mbs=1,kernels=eager"), None)
    assert plain.ends_tp(True, True) == ([], [])


def test_event_engine_runs_the_ends_tp_collectives():
    """The event engine runs the same ends traffic, exposed: with overlap off the two
    engines still agree within 1% on a TP plan."""
    from meshplan.simulator.des import simulate_des
    m, c = mp.load_model("llama3-8b"), mp.load_cluster("h100-sxm", 8)
    w = mp.TrainWorkload(seq_len=4096, global_batch=8)
    plan = mp.Plan.parse("tp=8,mbs=1,sp=on,dp_overlap=off,kernels=eager")
    a = mp.simulate(m, c, w, plan)
    d = simulate_des(m, c, w, plan).result
    assert d.step_time_s == pytest.approx(a.step_time_s, rel=0.01)


def test_sp_norm_gradients_are_reduced_once_per_step():
    """Under SP each rank's norm-weight gradients are partial sums over its sequence shard:
    one fp32 all-reduce over TP per step of two norms a layer and the final norm."""
    from meshplan.simulator.analytical import prepare
    m, c = mp.load_model("llama3-8b"), mp.load_cluster("h100-sxm", 8)
    w = mp.TrainWorkload(seq_len=4096, global_batch=8)
    sp = prepare(m, c, w, mp.Plan.parse("tp=2,dp=4,mbs=1,sp=on"), None)
    assert sp.sp_grads_bytes(0) == 4 * m.hidden_size * (2 * m.n_layers + 1)
    assert sp.sp_grads_s(0) > 0
    off = prepare(m, c, w, mp.Plan.parse("tp=2,dp=4,mbs=1,sp=off"), None)
    assert off.sp_grads_bytes(0) == 0.0
    pp = prepare(m, c, w, mp.Plan.parse("tp=2,pp=2,dp=2,mbs=1,sp=on"), None)
    assert pp.sp_grads_bytes(0) == 4 * m.hidden_size * m.n_layers  # no final norm
    assert pp.sp_grads_bytes(1) == 4 * m.hidden_size * (m.n_layers + 1)


def test_ring_backward_returns_the_gradients_home():
    """Backward sends K/V cp−1 hops under the compute, each block's fp32 gradient one hop
    behind, and the gradients' last hop home after it: for bf16 at cp=4, 3 hops of kv
    and 3 of 2kv hidden, one of 2kv exposed, against the forward's 3 of kv."""
    from meshplan.simulator.analytical import prepare
    m, c = mp.load_model("llama3-8b"), mp.load_cluster("h100-sxm", 8)
    cm = prepare(m, c, mp.TrainWorkload(seq_len=8192, global_batch=2),
                 mp.Plan.parse("cp=4,dp=2,mbs=1"), None)
    kv = cm.cp_step_bytes
    assert cm.cp_ring_messages(False) == [kv] * 3
    assert cm.cp_ring_messages(True) == [kv] * 3 + [2 * kv] * 3
    assert cm.cp_home_bytes == 2 * kv
    parts = cm.layer_parts(False)
    p2p = cm.costs.p2p_s
    assert parts.cp_ring == pytest.approx(3 * p2p(False, kv))
    assert parts.cp_ring_b == pytest.approx(3 * p2p(False, kv) + 3 * p2p(False, 2 * kv))
    assert parts.cp_home == pytest.approx(p2p(False, 2 * kv))
    assert parts.exposed()[1] >= parts.cp_home


def test_dropless_dispatch_exchanges_counts_first():
    """Each MoE layer's forward exchanges the routed-token counts (one int64 per expert
    slot of the EP group) before dispatching; backward reuses them."""
    from meshplan.simulator.analytical import prepare
    m, c = mp.load_model("mixtral-8x7b"), mp.load_cluster("h100-sxm", 8)
    w = mp.TrainWorkload(seq_len=4096, global_batch=8)
    cm = prepare(m, c, w, mp.Plan.parse("dp=8,ep=8,mbs=1"), None)
    assert cm.ep_counts_bytes == 8 * m.moe.n_experts
    parts = cm.layer_parts(True)
    assert parts.ep_counts == pytest.approx(
        cm.costs.collective_s(cm.ep_group, "all_to_all", 8 * m.moe.n_experts))
    f, b = parts.exposed()
    assert f - b == pytest.approx(parts.ep_counts)  # no other one-way difference here
    assert prepare(m, c, w, mp.Plan.parse("dp=8,mbs=1"), None).layer_parts(True).ep_counts == 0
