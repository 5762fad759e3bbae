"""The event engine: agreement with the analytical engine, schedule bubbles, determinism,
monotonicity in link bandwidth, stragglers, links shared max-min fairly, and the trace."""

import dataclasses
import json

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.api import simulate_run
from meshplan.core.errors import SpecError
from meshplan.core.plan import Plan
from meshplan.core.schedule import build_schedule, makespan
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels.costs import NominalCosts
from meshplan.loaders import load_cluster, load_model
from meshplan.simulator.analytical import CostCache, simulate_analytical
from meshplan.simulator.des import DesOptions, simulate_des
from meshplan.simulator.fluid import Fluid, Job, max_min_speeds
from meshplan.simulator.trace import chrome_trace

GEMM_S = 1e-3


class PassCosts:
    """Every layer GEMM takes GEMM_S, everything else is free: equal stages with
    F = B = W (a backward runs each forward GEMM twice, input and weight gradients)."""

    name = "test"

    def __init__(self, vocab: int, send_s: float = 0.0, late_s: float = 0.0,
                 rendezvous: bool = False):
        self.vocab, self.send_s, self.late_s = vocab, send_s, late_s
        self.rendezvous = rendezvous

    def gemm_s(self, dtype, m, n, k, batch=1):
        return 0.0 if self.vocab in (m, n, k) else GEMM_S

    def attention_s(self, dtype, flops, kv_len, backward=False):
        return 0.0

    def memory_s(self, traffic_bytes, kernels=1):
        return 0.0

    def overhead_s(self, unit, backward, work_s=0.0):
        return 0.0

    def split_backward_s(self, backward_s):
        return 0.0

    def optimizer_s(self, optimizer, params, tensors):
        return 0.0

    def overlap_slowdown(self):
        return 0.0

    def shared_cores(self):
        return None

    def time_slicing(self):
        return None

    def reduce_scatter_overlaps(self):
        return True

    def shared_fabric_bytes_per_s(self):
        return None

    def mem_op_s(self, dtype, name, nbytes, eager):
        return 0.0

    def collective_s(self, group, op, size_bytes):
        return 0.0

    def p2p_s(self, crosses_node, size_bytes):
        return self.send_s

    def ring_hop_s(self, group, size_bytes):
        return 0.0

    def stage_send_s(self, crosses_node, size_bytes):
        return self.send_s

    def late_receive_s(self):
        return self.late_s

    def sends_on_receive(self):
        return self.rendezvous


@pytest.mark.parametrize("schedule,split", [("1f1b", "2:3"), ("gpipe", "2:3"),
                                            ("interleaved,vpp=2", "1:1:1:2")])
def test_a_receive_posted_after_its_send_waits_for_the_busy_sender(schedule, split):
    """With a late-receive wait L (a CPU host's gloo), the heavier last rank of a
    two-rank pipeline finds every activation after its first sent already: the event
    engine pays L per receive that finds its message waiting, the analytical engine per
    receive of its slowest rank after that rank's first compute; both grow by at least
    (m - 1) L and agree."""
    late, m = 2e-3, 8
    model = dataclasses.replace(load_model("tiny-dense"), n_layers=5)
    cluster, work = load_cluster("h100-sxm", 2), TrainWorkload(seq_len=128, global_batch=m)
    plan = Plan.parse(f"pp=2,mbs=1,schedule={schedule},stage_layers={split}")

    def steps(late_s: float) -> tuple[float, float]:
        def cache():
            return CostCache(costs=PassCosts(model.vocab_size, late_s=late_s))
        return (simulate_analytical(model, cluster, work, plan, cache()).step_time_s,
                simulate_des(model, cluster, work, plan, cache()).result.step_time_s)

    (ana0, des0), (ana, des) = steps(0.0), steps(late)
    assert des - des0 >= (m - 1) * late * 0.99
    assert ana - ana0 >= (m - 1) * late * 0.99
    assert ana == pytest.approx(des, rel=0.05)


def test_a_late_receive_waits_for_the_whole_transfer_where_sends_wait_for_it():
    """Where a message moves only once its receive is posted (gloo), the heavier last
    rank's receives each wait the hand-over L and then the transfer X: both engines grow
    by (m - 1)(L + X) or more over sends that cost nothing, and agree."""
    late, send, m = 2e-3, 1e-3, 8
    model = dataclasses.replace(load_model("tiny-dense"), n_layers=5)
    cluster, work = load_cluster("h100-sxm", 2), TrainWorkload(seq_len=128, global_batch=m)
    plan = Plan.parse("pp=2,mbs=1,stage_layers=2:3")

    def steps(costs: PassCosts) -> tuple[float, float]:
        return (simulate_analytical(model, cluster, work, plan, CostCache(costs=costs)
                                    ).step_time_s,
                simulate_des(model, cluster, work, plan, CostCache(costs=costs)
                             ).result.step_time_s)

    ana0, des0 = steps(PassCosts(model.vocab_size))
    eager = steps(PassCosts(model.vocab_size, send, late))
    ana, des = steps(PassCosts(model.vocab_size, send, late, rendezvous=True))
    assert des - des0 >= (m - 1) * (late + send) * 0.99
    assert ana - ana0 >= (m - 1) * (late + send) * 0.99
    assert des - eager[1] >= (m - 1) * send * 0.99  # the eager message was there already
    assert ana == pytest.approx(des, rel=0.05)


class _NoInterference(NominalCosts):
    def overlap_slowdown(self):
        return 0.0


def _passes(n_layers: int, gpus: int, global_batch: int, plan: str):
    model = dataclasses.replace(load_model("tiny-dense"), n_layers=n_layers)
    cluster = load_cluster("h100-sxm", gpus)
    work = TrainWorkload(seq_len=128, global_batch=global_batch)
    return model, cluster, work, Plan.parse(plan), CostCache(costs=PassCosts(model.vocab_size))


@pytest.mark.parametrize("model,gpus,batch,plan", [
    ("llama3-70b", 64, 64, "tp=8,pp=4,mbs=1,dp_overlap=off"),
    ("llama3-70b", 64, 64, "tp=8,pp=4,vpp=2,mbs=1,recompute=full,dp_overlap=off"),
    ("llama3-70b", 64, 64, "tp=8,pp=8,mbs=1,schedule=zb,dp_overlap=off"),
    ("llama3-8b", 16, 32, "dp=16,zero=3,mbs=1,dp_overlap=off"),
    ("llama3-8b", 16, 32, "dp=8,tp=2,sp=on,zero=1,mbs=2,dp_overlap=off"),
    ("mixtral-8x7b", 64, 64, "tp=2,ep=4,pp=2,mbs=1,zero=1,dp_overlap=off"),
    ("llama3-8b", 8, 16, "dp=8,mbs=2,offload=optimizer,zero=2,dp_overlap=off"),
    # DualPipe pairs always overlap; here their TP traffic fits under the compute
    ("llama3-8b", 32, 256, "tp=2,pp=4,mbs=1,schedule=dualpipe,dp_overlap=off"),
])
def test_without_overlap_des_agrees_with_analytical(model, gpus, batch, plan):
    m, c = load_model(model), load_cluster("h100-sxm", gpus)
    w = TrainWorkload(seq_len=4096, global_batch=batch)
    a = simulate_analytical(m, c, w, Plan.parse(plan), CostCache(costs=_NoInterference(c)))
    d = simulate_des(m, c, w, Plan.parse(plan), options=DesOptions(interference=0.0))
    assert d.result.step_time_s == pytest.approx(a.step_time_s, rel=0.01)
    assert d.result.peak_memory_bytes == a.peak_memory_bytes
    t = d.result.time
    total = t.compute + t.recompute + t.exposed_comm + t.bubble + t.offload + t.optimizer
    assert total == pytest.approx(d.result.step_time_s, rel=1e-9)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16)])
def test_1f1b_bubble_fraction(p, m):
    model, cluster, work, plan, cache = _passes(8, p, m, f"pp={p},mbs=1")
    r = simulate_des(model, cluster, work, plan, cache).result
    assert r.time.bubble / r.step_time_s == pytest.approx((p - 1) / (m + p - 1), rel=1e-9)


@pytest.mark.parametrize("p", [2, 4])
def test_1f1b_waits_a_send_per_micro_batch_where_messages_are_slow(p):
    """Stages of W = 24 ms (F 8 + B 16); a send of 3 ms. Rank r + 1's B(i) waits on the
    gradient's trip back, rank r's B and F, and the activation's trip out, two
    micro-batches on: the period grows from W to W + one send. GPipe keeps every forward
    in flight and pays the sends in its fill only."""
    send, m = 3e-3, 8
    model = dataclasses.replace(load_model("tiny-dense"), n_layers=2 * p)
    cluster, work = load_cluster("h100-sxm", p), TrainWorkload(seq_len=128, global_batch=m)

    def steps(text: str, send_s: float) -> tuple[float, float]:
        def cache():
            return CostCache(costs=PassCosts(model.vocab_size, send_s))
        plan = Plan.parse(text)
        return (simulate_analytical(model, cluster, work, plan, cache()).step_time_s,
                simulate_des(model, cluster, work, plan, cache()).result.step_time_s)

    ana0, des0 = steps(f"pp={p},mbs=1", 0.0)
    ana, des = steps(f"pp={p},mbs=1", send)
    assert des - des0 >= m * send  # every steady-state micro-batch waits one send
    assert ana == pytest.approx(des, rel=0.03)
    assert ana - ana0 == pytest.approx((m + 2 * (p - 1)) * send, rel=1e-9)
    gpipe0, _ = steps(f"pp={p},mbs=1,schedule=gpipe", 0.0)
    gpipe, gpipe_des = steps(f"pp={p},mbs=1,schedule=gpipe", send)
    assert gpipe - gpipe0 == pytest.approx(2 * (p - 1) * send, rel=1e-9)
    assert gpipe == pytest.approx(gpipe_des, rel=1e-9)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (2, 8, 4)])
def test_interleaved_bubble_fraction(p, m, v):
    model, cluster, work, plan, cache = _passes(16, p, m, f"pp={p},vpp={v},mbs=1")
    r = simulate_des(model, cluster, work, plan, cache).result
    assert r.time.bubble / r.step_time_s == pytest.approx((p - 1) / (v * m + p - 1), rel=1e-9)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 12)])
def test_zb_h1_bubble(p, m):
    # F = B = W = t: step m·3t + (p−1)(F + B − W) (Qi et al. 2023 §3.1)
    model, cluster, work, plan, cache = _passes(8, p, m, f"pp={p},mbs=1,schedule=zb")
    r = simulate_des(model, cluster, work, plan, cache).result
    t = r.step_time_s / (3 * m + p - 1)
    assert r.time.bubble == pytest.approx((p - 1) * t, rel=1e-9)
    one_f1b = simulate_des(model, cluster, work, Plan.parse(f"pp={p},mbs=1"), cache).result
    assert one_f1b.time.bubble == pytest.approx(3 * (p - 1) * t, rel=1e-9)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 12)])
def test_dualpipe_step_is_the_schedule_makespan(p, m):
    model, cluster, work, plan, cache = _passes(8, p, m, f"pp={p},mbs=1,schedule=dualpipe")
    r = simulate_des(model, cluster, work, plan, cache).result
    one_f1b = simulate_des(model, cluster, work, Plan.parse(f"pp={p},mbs=1"), cache).result
    t = one_f1b.step_time_s / (3 * (m + p - 1))  # F = B = W of one block
    expected = makespan(build_schedule("dualpipe", p, m), *[[t] * (2 * p)] * 3)
    assert r.step_time_s == pytest.approx(expected, rel=1e-9)
    assert r.time.bubble == pytest.approx((p / 2 - 1) * t, abs=1e-12)
    assert r.step_time_s == pytest.approx(simulate_analytical(
        model, cluster, work, plan, cache).step_time_s, rel=1e-9)


def test_dualpipe_pairs_hide_expert_all_to_all():
    """DeepSeek-V3's reason for DualPipe: a forward's all-to-all runs under the paired
    backward's compute and the other way round (report §3.2.1)."""
    m, c = load_model("deepseek-v3"), load_cluster("h100-sxm", 2048)
    w = TrainWorkload(seq_len=4096, global_batch=4096)
    base = "tp=1,pp=16,ep=64,mbs=1,zero=1,recompute=full"
    one = simulate_analytical(m, c, w, Plan.parse(f"{base},schedule=1f1b"))
    dual = simulate_analytical(m, c, w, Plan.parse(f"{base},schedule=dualpipe"))
    assert dual.comm_s["layers_exposed"] < 0.8 * one.comm_s["layers_exposed"]
    assert dual.step_time_s < one.step_time_s
    assert dual.memory.weights > 1.9 * one.memory.weights  # two copies of every block
    run = simulate_des(m, c, w, Plan.parse(f"{base},schedule=dualpipe"))
    assert run.result.step_time_s < simulate_des(m, c, w, Plan.parse(
        f"{base},schedule=1f1b")).result.step_time_s


def test_straggler_slows_the_step_as_the_schedule_dictates():
    p, m = 4, 8
    model, cluster, work, plan, cache = _passes(8, 2 * p, 2 * m, f"dp=2,pp={p},mbs=1")
    base = simulate_des(model, cluster, work, plan, cache)
    stage = base.result.step_time_s / (m + p - 1)  # F + B of one stage
    # global rank 5 = pipeline stage 2 of replica 1 (tp = cp = 1: rank = pp·dp + dp index)
    slow = simulate_des(model, cluster, work, plan, cache,
                        DesOptions(stragglers=((5, 0.5),)))
    costs = [stage / 3] * p
    costs[2] *= 1.5
    expected = makespan(build_schedule("1f1b", p, m), costs, [2 * c for c in costs])
    assert slow.result.step_time_s == pytest.approx(expected, rel=1e-9)
    assert slow.result.step_time_s > base.result.step_time_s
    assert len(slow.ranks) == 2 * p  # the straggler's replica is simulated beside the rest


def test_an_ep_all_to_all_across_replicas_waits_for_each_of_them():
    # dp=2, ep=2: one EP group spans both replicas. With replica 1 slowed by half, its
    # every dispatch and combine holds replica 0 back: the two start each all-to-all
    # together, where each replica's own would start as its layer ends.
    model = load_model("tiny-moe")
    cluster = load_cluster("h100-sxm", gpus=2)
    work = TrainWorkload(seq_len=256, global_batch=4, dtype="bf16")
    run = simulate_des(model, cluster, work, Plan.parse("dp=2,ep=2,mbs=1"),
                       options=DesOptions(stragglers=((1, 0.5),)))
    starts = {r: [s.start_s for s in run.spans if s.rank == r and s.stream == "ep"]
              for r in (0, 1)}
    assert len(starts[0]) == len(starts[1]) > 0
    assert starts[0] == pytest.approx(starts[1], rel=1e-9)


def test_bad_options_are_named():
    model, cluster, work, plan, cache = _passes(8, 4, 8, "pp=4,mbs=1")
    with pytest.raises(SpecError, match="options.stragglers"):
        simulate_des(model, cluster, work, plan, cache, DesOptions(stragglers=((99, 0.1),)))
    with pytest.raises(SpecError, match="options.link_scale"):
        simulate_des(model, cluster, work, plan, cache, DesOptions(link_scale=(("wifi", 2),)))


def test_identical_inputs_give_identical_results():
    m, c = load_model("mixtral-8x7b"), load_cluster("h100-sxm", 32)
    w = TrainWorkload(seq_len=4096, global_batch=32)
    plan = Plan.parse("tp=2,ep=8,pp=2,mbs=1,zero=1")
    a, b = simulate_des(m, c, w, plan), simulate_des(m, c, w, plan)
    assert a.result == b.result and a.spans == b.spans and a.events == b.events


_PLANS = [("llama3-8b", 16, "dp=16,zero=3,mbs=1"), ("llama3-8b", 16, "dp=8,tp=2,mbs=1"),
          ("llama3-70b", 32, "dp=2,tp=8,pp=2,mbs=1,zero=1"),
          ("llama3-8b", 16, "dp=4,cp=2,tp=2,mbs=1,tp_overlap=on"),
          ("mixtral-8x7b", 16, "ep=8,tp=2,mbs=1"),
          ("llama3-8b", 8, "dp=8,mbs=1,zero=2,offload=optimizer")]
_LINKS = ["intra_bw_bytes_per_s", "nic_bw_bytes_per_s", "pcie_bw_bytes_per_s"]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(case=st.sampled_from(_PLANS), link=st.sampled_from(_LINKS),
       nodes_per_gpu=st.sampled_from([8, 4]))
def test_doubling_a_link_never_slows_a_step(case, link, nodes_per_gpu):
    name, gpus, plan = case
    model = load_model(name)
    base = load_cluster("h100-sxm", gpus)
    base = dataclasses.replace(base, node=dataclasses.replace(
        base.node, gpus_per_node=nodes_per_gpu, nics_per_node=nodes_per_gpu))
    fast = dataclasses.replace(base, node=dataclasses.replace(
        base.node, **{link: 2 * getattr(base.node, link)},
        intra_allreduce_busbw_bytes_per_s=base.node.intra_allreduce_busbw_bytes_per_s * (
            2 if link == "intra_bw_bytes_per_s" else 1)))
    work = TrainWorkload(seq_len=2048, global_batch=32)
    slow_t = simulate_des(model, base, work, Plan.parse(plan)).result.step_time_s
    fast_t = simulate_des(model, fast, work, Plan.parse(plan)).result.step_time_s
    assert fast_t <= slow_t * (1 + 1e-9)


def test_overlap_slows_overlapped_compute_and_hides_fsdp_traffic():
    m, c = load_model("llama3-8b"), load_cluster("h100-sxm", 16)
    w = TrainWorkload(seq_len=4096, global_batch=32)
    plan = Plan.parse("dp=16,zero=3,mbs=1")
    none = simulate_des(m, c, w, plan, options=DesOptions(interference=0.0)).result
    some = simulate_des(m, c, w, plan, options=DesOptions(interference=0.2)).result
    assert some.time.compute > none.time.compute
    off = simulate_des(m, c, w, dataclasses.replace(plan, dp_overlap=False)).result
    assert none.step_time_s < off.step_time_s


class _BlockingReduceScatter(NominalCosts):
    """A device without a side stream: FSDP's reduce-scatters block the backward."""

    def reduce_scatter_overlaps(self):
        return False


@pytest.mark.parametrize("plan", ["dp=16,zero=3,mbs=1", "dp=8,pp=2,zero=1,mbs=1"])
def test_blocking_reduce_scatters_are_exposed_in_both_engines(plan):
    """Where FSDP's reduce-scatters block (a CPU device), every one of them adds to the
    step in both engines; the gathers still hide. Without pipelining the engines agree;
    with it the event engine also sees the last stage's blocking delay the gradients it
    sends back, which the analytical engine, charging the slowest rank, does not."""
    m, c = load_model("llama3-8b"), load_cluster("h100-sxm", 16)
    w, p = TrainWorkload(seq_len=4096, global_batch=32), Plan.parse(plan)
    costs = _BlockingReduceScatter(c)
    a = simulate_analytical(m, c, w, p, CostCache(costs=costs))
    d = simulate_des(m, c, w, p, CostCache(costs=costs)).result
    free = simulate_analytical(m, c, w, p)
    from meshplan.simulator.analytical import prepare
    cm = prepare(m, c, w, p, CostCache(costs=costs))
    worst = max(range(p.pp), key=lambda r: cm.rank_phases[r].total)
    scatters = sum(u.units * costs.collective_s(u.group, u.grad_op, u.unit_bytes)
                   for u in cm.dp_units(worst))
    assert a.time.exposed_comm >= scatters
    assert d.time.exposed_comm >= 0.99 * scatters
    if p.pp == 1:
        assert d.step_time_s == pytest.approx(a.step_time_s, rel=0.01)
    else:
        assert a.step_time_s <= d.step_time_s <= 1.05 * a.step_time_s
    assert a.step_time_s > free.step_time_s


def test_one_ddp_bucket_waits_for_the_embeddings_gradient():
    """A model whose gradients fill one DDP bucket reduces them after the whole backward,
    the embedding's included: none of the all-reduce hides, in either engine."""
    m, c = load_model("tiny-dense"), load_cluster("h100-sxm", 2)
    w, p = TrainWorkload(seq_len=256, global_batch=16), Plan.parse("dp=2,mbs=4")
    a = simulate_analytical(m, c, w, p)
    d = simulate_des(m, c, w, p).result
    from meshplan.simulator.analytical import prepare
    cm = prepare(m, c, w, p, None)
    (unit,) = cm.dp_units(0)
    assert unit.units == 1
    reduce = cm.costs.collective_s(unit.group, "all_reduce", unit.unit_bytes)
    assert d.time.exposed_comm == pytest.approx(reduce, rel=1e-6)
    assert a.time.exposed_comm == pytest.approx(reduce, rel=1e-6)


def test_smaller_ddp_buckets_start_reducing_earlier_but_end_with_the_embedding():
    """tiny-dense's fp32 gradients (3.4 MB) in 1 MiB buckets: four all-reduces, the
    first launched once two of the four layers' backward is done, the last after the
    embedding's gradient. On a 0.1 GB/s link they take longer than the backward, so the
    event engine's step ends no earlier than the first bucket's start plus all four,
    which the analytical engine's one overlap window does not see."""
    m, c = load_model("tiny-dense"), load_cluster("cpu", 2)
    w = TrainWorkload(seq_len=256, global_batch=16, dtype="fp32")
    c = dataclasses.replace(c, node=dataclasses.replace(c.node, intra_bw_bytes_per_s=0.2e9))
    p = Plan.parse("dp=2,mbs=4,bucket_mb=1")
    from meshplan.simulator.analytical import prepare
    cm = prepare(m, c, w, p, None)
    (unit,) = cm.dp_units(0)
    assert unit.units == 4
    run = simulate_des(m, c, w, p)
    grads = sorted((s for s in run.spans if s.stream == "dp"), key=lambda s: s.start_s)
    assert len(grads) == 4
    reduce = cm.costs.collective_s(unit.group, "all_reduce", unit.unit_bytes)
    assert run.result.step_time_s >= grads[0].start_s + 4 * reduce * (1 - 1e-9)
    assert simulate_analytical(m, c, w, p).step_time_s < run.result.step_time_s


def test_links_are_shared_max_min_fairly():
    a = Job(work_s=1.0, rank=0, demands={("nic", 0, "out"): 10.0})
    b = Job(work_s=1.0, rank=0, demands={("nic", 0, "out"): 10.0, ("nic", 1, "in"): 10.0})
    c = Job(work_s=1.0, rank=1, demands={("nic", 1, "in"): 10.0})
    cap = {("nic", 0, "out"): 10.0, ("nic", 1, "in"): 5.0}
    # link 1 (capacity 5) splits 2.5 / 2.5 between b and c; a takes what b leaves on link 0
    assert max_min_speeds([a, b, c], cap) == pytest.approx([0.75, 0.25, 0.25])
    assert max_min_speeds([a], cap) == [1.0]


def test_two_flows_on_one_link_take_twice_as_long():
    env = simpy.Environment()
    fluid = Fluid(env, {("nic", 0, "out"): 1.0}, interference=0.0)
    ends = []
    for _ in range(2):
        ev = fluid.run(Job(work_s=1.0, rank=0, demands={("nic", 0, "out"): 1.0}))
        ev.callbacks.append(lambda _e: ends.append(env.now))
    env.run()
    assert ends == pytest.approx([2.0, 2.0])


def test_processes_sharing_cores_split_them_while_they_compute():
    # 3 processes (rank 1 stands for 2) on 2 cores: 2/3 of a core each while all three
    # compute; when rank 0's job of 1 s is done (t = 1.5), rank 1's two get a core each.
    env = simpy.Environment()
    fluid = Fluid(env, {}, interference=0.0, shared_cores=2, weight={0: 1.0, 1: 2.0})
    ends = {}
    for rank, work in ((0, 1.0), (1, 2.0)):
        ev = fluid.run(Job(work_s=work, rank=rank))
        ev.callbacks.append(lambda _e, r=rank: ends.setdefault(r, env.now))
    env.run()
    assert ends[0] == pytest.approx(1.5)
    assert ends[1] == pytest.approx(1.5 + (2.0 - 1.0))
    alone = Fluid(simpy.Environment(), {}, interference=0.0, shared_cores=2)
    ev = alone.run(Job(work_s=1.0, rank=0))
    alone.env.run()
    assert ev.processed and alone.env.now == pytest.approx(1.0)  # one process: one core


def test_time_shared_cores_run_whole_slices_in_a_seeded_order():
    # 2 processes on 1 core, 10 s each, 4 s slices: the core is never idle, so the last
    # ends at 20 s; the first ends at the end of a slice or of its last 2 s (10, 14 or
    # 18 s: the queue order decides which), where shared fluidly both end at 20 s. The
    # same seed, the same order. A process alone keeps its core past its slice.
    firsts = set()
    for seed in range(8):
        runs = []
        for _ in range(2):
            env = simpy.Environment()
            fluid = Fluid(env, {}, interference=0.0, shared_cores=1, slice_s=4.0, seed=seed)
            ends = []
            for rank in (0, 1):
                fluid.run(Job(work_s=10.0, rank=rank)).callbacks.append(
                    lambda _e, ends=ends, env=env: ends.append(env.now))
            env.run()
            runs.append(ends)
        assert runs[0] == runs[1] and runs[0][1] == pytest.approx(20.0)
        assert min(abs(runs[0][0] - t) for t in (10.0, 14.0, 18.0)) < 1e-9
        firsts.add(round(runs[0][0]))
    assert len(firsts) > 1  # the order is the seed's, not fixed
    alone = Fluid(simpy.Environment(), {}, interference=0.0, shared_cores=1, slice_s=4.0)
    ends = []
    alone.run(Job(work_s=10.0, rank=0)).callbacks.append(
        lambda _e: ends.append(alone.env.now))
    alone.env.run()
    assert ends == pytest.approx([10.0])


def test_a_communicating_rank_takes_its_core_share_from_those_computing():
    # 1 core: rank 0 exchanges for 10 s without computing while rank 1 computes 10 s.
    # Keeping half a core busy, the exchange leaves rank 1 half speed for 10 s: it ends
    # at 15 s; at no share, at 10 s. On 2 cores with rank 0 computing beside its own
    # flow, both hold a core and no share is taken (rank 0's own slowdown is the
    # interference, measured that way): rank 1 ends at 10 s.
    def end_s(share: float, cores: int = 1, talker_computes: bool = False) -> float:
        env = simpy.Environment()
        fluid = Fluid(env, {("fabric", 0, "out"): 1.0}, interference=0.0,
                      shared_cores=cores, slice_s=4.0, comm_share=share)
        fluid.run(Job(work_s=10.0, rank=0, demands={("fabric", 0, "out"): 1.0}, ranks=(0,)))
        if talker_computes:
            fluid.run(Job(work_s=30.0, rank=0))
        ends = []
        fluid.run(Job(work_s=10.0, rank=1)).callbacks.append(
            lambda _e: ends.append(env.now))
        env.run()
        return ends[0]

    assert end_s(0.5) == pytest.approx(15.0)
    assert end_s(0.0) == pytest.approx(10.0)
    assert end_s(0.5, cores=2, talker_computes=True) == pytest.approx(10.0)


def _two_pairs_s(slice_s: float | None, seed: int = 0) -> float:
    """Two pairs of processes on 2 cores, each pair 10 rounds of 10 s of compute per
    process, then an exchange of 17 s alone over one shared link (`desync.py`'s shape)."""
    env = simpy.Environment()
    fluid = Fluid(env, {("fabric", 0, "both"): 1.0}, interference=0.0, shared_cores=2,
                  slice_s=slice_s, seed=seed)

    ends = []

    def rank(r: int):
        for _ in range(10):
            yield fluid.run(Job(work_s=10.0, rank=r))
            yield fluid.run(Job(work_s=17.0, rank=r, demands={("fabric", 0, "both"): 0.5}))
        ends.append(env.now)

    for r in range(4):
        env.process(rank(r))
    env.run()  # past the last end: a slice's timer may still be pending
    return max(ends)


def test_time_shared_pairs_drift_apart_and_overlap_each_others_exchanges():
    # Shared fluidly the pairs stay in lockstep: every round both compute at half speed,
    # then both exchanges share the link: 10 x (20 + 34) s. Time-shared, one pair gets
    # the cores first and computes while the other exchanges; never better than one
    # pair's exchanges back to back with the other's (10 x 2 x 17 s) plus a compute.
    lockstep = _two_pairs_s(None)
    assert lockstep == pytest.approx(10 * (20 + 34))
    for seed in range(3):
        drifted = _two_pairs_s(4.0, seed)
        assert 10 * 34 + 10 <= drifted < 0.9 * lockstep
        assert drifted == _two_pairs_s(4.0, seed)  # the seed fixes the run queue's order


def test_a_crowded_pipeline_gives_its_bubble_to_the_other_replica():
    # 4 processes on 2 cores cost 2x; priced as a fair share of 2 cores (the profile
    # measured up to 2) or as a measured 2x slowdown (no sharing), every op costs alike.
    # dp=4 keeps every process computing together: the same step either way. With pp=2
    # the idle fill and drain let the other replica's ranks run faster, in the
    # analytical bound and in the event engine.
    from dataclasses import replace

    from meshplan.api import simulate
    from meshplan.costmodels.calibrated import CalibratedCosts, HardwareProfile

    rate = 1e10
    rows = [[m, n, k, 2 * m * n * k / rate] for m in (64, 256, 1024) for n in (64, 256, 1024)
            for k in (64, 256, 1024)]
    shared = HardwareProfile(device="t", gemm={"fp32": rows}, attention={},
                             memory_bw_bytes_per_s=1e10, kernel_overhead_s=0.0,
                             collectives={}, concurrency={"1": 1.0, "2": 1.0})
    measured = replace(shared, concurrency={"1": 1.0, "2": 1.0, "4": 2.0})
    model, cluster = load_model("tiny-dense"), load_cluster("cpu", gpus=4)
    assert CalibratedCosts(cluster, shared).shared_cores() == (2, 2.0)
    assert CalibratedCosts(cluster, measured).shared_cores() is None
    work = TrainWorkload(seq_len=256, global_batch=16, dtype="fp32")

    def step(text, prof, engine):
        plan = Plan.parse(f"kernels=eager,attn=unfused,{text}")
        return simulate(model, cluster, work, plan, profile=prof, engine=engine).step_time_s

    dp = "dp=4,mbs=2,dp_overlap=off"
    assert step(dp, shared, "analytical") == pytest.approx(step(dp, measured, "analytical"))
    assert step(dp, shared, "des") == pytest.approx(step(dp, measured, "des"), rel=1e-6)
    pp = "dp=2,pp=2,mbs=2"
    for engine in ("analytical", "des"):
        assert step(pp, shared, engine) < 0.95 * step(pp, measured, engine)


@pytest.mark.parametrize("model,gpus,plan", [
    ("llama3-70b", 64, "tp=8,pp=4,mbs=1,zero=1"),
    ("mixtral-8x7b", 32, "tp=2,ep=8,pp=2,mbs=1"),
])
def test_chrome_trace_has_one_process_per_simulated_rank(model, gpus, plan):
    run = simulate_run(load_model(model), load_cluster("h100-sxm", gpus),
                       TrainWorkload(seq_len=4096, global_batch=32), plan)
    trace = json.loads(json.dumps(chrome_trace(run)))
    events = trace["traceEvents"]
    pids = {e["pid"] for e in events}
    assert pids == set(range(len(run.ranks)))
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    names = {e["name"] for e in spans}
    assert any(n.startswith("all_gather tp(") or n.startswith("all_reduce tp(") for n in names)
    assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in events)


def test_mixed_gpu_types_run_at_the_slower_replicas_pace():
    """A data-parallel replica on A100s among H100 replicas: synchronous DP waits for it
    every step, so the step takes what an all-A100 job takes; MFU counts each GPU's own
    peak; a device whose memory the plan overflows is reported."""
    m, w = load_model("llama3-8b"), TrainWorkload(seq_len=4096, global_batch=64)
    h100, a100 = load_cluster("h100-sxm", 32), load_cluster("a100-80gb", 32)
    plan = Plan.parse("dp=4,tp=2,pp=4,mbs=1,zero=1,sp=on")
    fast = simulate_des(m, h100, w, plan).result
    slow = simulate_des(m, a100, w, plan).result
    run = simulate_des(m, h100, w, plan, options=DesOptions(replica_clusters=((1, a100),)))
    mixed = run.result
    assert fast.step_time_s < 0.5 * mixed.step_time_s
    assert mixed.step_time_s == pytest.approx(slow.step_time_s, rel=1e-3)
    assert len(run.ranks) == 2 * plan.pp and "A100" in run.ranks[-1]
    peak = 8 * (3 * 989e12 + 312e12)
    assert mixed.mfu == pytest.approx(fast.mfu * fast.step_time_s / mixed.step_time_s
                                      * 32 * 989e12 / peak)
    big = Plan.parse("dp=4,tp=2,pp=4,mbs=4,zero=1,sp=on")  # ~45 GB per GPU
    small = load_cluster("a100-40gb", 32)
    crowded = simulate_des(m, h100, w, big,
                           options=DesOptions(replica_clusters=((2, small),))).result
    assert crowded.peak_memory_bytes > small.device.hbm_bytes
    assert not crowded.fits
    assert any(small.device.name in v for v in crowded.violations), crowded.violations


def test_replica_cluster_errors_name_the_field():
    m, w = load_model("llama3-8b"), TrainWorkload(seq_len=4096, global_batch=64)
    plan = Plan.parse("dp=4,tp=2,pp=4,mbs=1,zero=1,sp=on")
    h100 = load_cluster("h100-sxm", 32)
    with pytest.raises(SpecError, match="dp=4 replicas"):
        simulate_des(m, h100, w, plan, options=DesOptions(
            replica_clusters=((4, load_cluster("a100-80gb", 32)),)))
    with pytest.raises(SpecError, match="layouts must match"):
        simulate_des(m, h100, w, plan, options=DesOptions(
            replica_clusters=((1, load_cluster("cpu", 32)),)))


def test_mixed_gpu_types_under_fsdp_gather_at_the_slowest_pace():
    """FSDP all-gathers span every replica too (each starts at the last arrival and ends
    with the slowest part): with an A100 replica among H100 ones the step is the
    all-A100 one, with and without prefetching."""
    m, w = load_model("llama3-8b"), TrainWorkload(seq_len=4096, global_batch=32)
    h100, a100 = load_cluster("h100-sxm", 16), load_cluster("a100-80gb", 16)
    for text in ("dp=16,zero=3,mbs=1", "dp=16,zero=3,mbs=1,dp_overlap=off"):
        plan = Plan.parse(text)
        mixed = simulate_des(m, h100, w, plan,
                             options=DesOptions(replica_clusters=((1, a100),))).result
        slow = simulate_des(m, a100, w, plan).result
        assert mixed.step_time_s == pytest.approx(slow.step_time_s, rel=1e-3)


class _SharedFabric(PassCosts):
    """Pass costs on a node whose devices share one medium of `fabric` bytes/s, with
    gloo's sends that wait for their receive."""

    def __init__(self, vocab, send_s, fabric):
        super().__init__(vocab, send_s, rendezvous=True)
        self.fabric = fabric

    def shared_fabric_bytes_per_s(self):
        return self.fabric


def test_flows_on_a_shared_fabric_slow_each_other_and_never_a_lone_one():
    """Sends of 3 ms. In 1F1B's steady state activations go out while gradients come
    back, so a fabric narrower than two sends at once slows the step, and a narrower one
    never speeds it up; one wider than all traffic together changes nothing. GPipe at
    pp=2 sends one way at a time: a fabric as wide as one send changes nothing."""
    send, m = 3e-3, 8
    model = dataclasses.replace(load_model("tiny-dense"), n_layers=8)
    cluster, work = load_cluster("h100-sxm", 4), TrainWorkload(seq_len=128, global_batch=m)
    rate = 128 * model.hidden_size * 2 / send  # one micro-batch's activation, bf16

    def run(text, fabric):
        cache = CostCache(costs=_SharedFabric(model.vocab_size, send, fabric))
        return simulate_des(model, cluster, work, Plan.parse(text), cache)

    free = run("pp=4,mbs=1", None).result.step_time_s
    assert run("pp=4,mbs=1", 1e18).result.step_time_s == pytest.approx(free, rel=1e-12)
    steps = [run("pp=4,mbs=1", k * rate).result.step_time_s for k in (4, 1.5, 0.5)]
    assert free <= steps[0] * (1 + 1e-9) and steps == sorted(steps)
    assert steps[-1] > free * 1.05
    narrow = run("pp=4,mbs=1", 0.5 * rate)
    assert all(u <= 1 + 1e-9 for k, u in narrow.link_utilisation.items()
               if k.startswith("fabric"))
    gpipe = "pp=2,mbs=1,schedule=gpipe"
    assert run(gpipe, rate).result.step_time_s == pytest.approx(
        run(gpipe, None).result.step_time_s, rel=1e-12)


def test_a_calibrated_fabric_is_the_most_the_node_carried_at_once():
    """Under a 1 Gbit/s tc-throttled loopback: one send 132 MB/s, ring shifts of 2 and
    4 ranks 70 and 33 MB/s each (141 and 132 MB/s in all)."""
    from meshplan.costmodels.calibrated import CalibratedCosts, HardwareProfile

    fits = {"2": {"p2p": [3e-5, 1 / 132e6], "ring_shift": [2e-4, 1 / 70.3e6]},
            "4": {"ring_shift": [3e-4, 1 / 33e6]}}
    prof = HardwareProfile(device="cpu", gemm={}, attention={}, memory_bw_bytes_per_s=1e10,
                           kernel_overhead_s=0.0, collectives=fits, concurrency={})
    cluster = load_cluster("cpu", gpus=4)
    costs = CalibratedCosts(cluster, prof)
    assert costs.shared_fabric_bytes_per_s() == pytest.approx(140.6e6)
    assert costs.sends_on_receive()
    unshifted = dataclasses.replace(prof, collectives={"2": {"p2p": fits["2"]["p2p"]}})
    assert CalibratedCosts(cluster, unshifted).shared_fabric_bytes_per_s() is None
