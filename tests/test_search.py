"""Search: equals brute force on small spaces, prunes soundly, explains failures."""

import itertools
from dataclasses import replace

import pytest

import meshplan as mp
from meshplan.planner.search import NoFeasiblePlan, Objective, gpu_counts, search
from meshplan.planner.space import SearchSpace, enumerate_plans

SMALL = SearchSpace(cp=(1, 2), vpp=(1, 2), mbs=(1, 2), recompute=("none", "selective", "full"),
                    zero=(0, 1, 3), offload=("none",), sp=(True,))


def _brute_force(model, cluster, work, space):
    """Every combination of the space's values, with no rule applied but `simulate`'s."""
    best = None
    tps = [t for t in (1, 2, 4, 8) if t <= cluster.node.gpus_per_node]
    for tp, pp, cp, mbs, rc, zero, (vpp, sched) in itertools.product(
            tps, (1, 2, 4, 8), space.cp, space.mbs, space.recompute, space.zero,
            [(1, "1f1b")] + [(v, "interleaved") for v in space.vpp if v > 1]):
        plan = mp.Plan(tp=tp, pp=pp, cp=cp, mbs=mbs, recompute=rc, zero=zero, vpp=vpp,
                       schedule=sched, sp=tp > 1)
        try:
            r = mp.simulate(model, cluster, work, plan)
        except mp.SpecError:
            continue
        if r.fits and (best is None or r.tokens_per_s > best.tokens_per_s):
            best = r
    return best


@pytest.mark.parametrize("model_name,gpus,seq,batch", [
    ("llama3-8b", 16, 4096, 32),
    ("llama2-13b", 8, 2048, 16),
])
def test_search_equals_brute_force(model_name, gpus, seq, batch):
    model = mp.load_model(model_name)
    cluster = mp.load_cluster("h100-sxm", gpus)
    work = mp.TrainWorkload(seq_len=seq, global_batch=batch)
    found = search(model, cluster, work, SMALL, top=3, refine=0)
    brute = _brute_force(model, cluster, work, SMALL)
    assert found.best.tokens_per_s == pytest.approx(brute.tokens_per_s, rel=1e-12)
    ranked = [r.tokens_per_s for r in found.ranked]
    assert ranked == sorted(ranked, reverse=True)
    assert found.stats.timed + found.stats.over_memory == found.stats.enumerated


def test_memory_pruning_only_drops_plans_that_do_not_fit():
    model = mp.load_model("llama3-70b")
    cluster = mp.load_cluster("h100-sxm", 32)
    work = mp.TrainWorkload(seq_len=4096, global_batch=64)
    plans = list(enumerate_plans(model, cluster, work, SMALL))
    fits = [p for p in plans if mp.simulate(model, cluster, work, p).fits]
    found = search(model, cluster, work, SMALL, top=1, refine=0)
    assert found.stats.timed == len(fits)
    assert found.stats.over_memory == len(plans) - len(fits) > 0


def test_refined_split_is_kept_only_when_better():
    model = mp.load_model("deepseek-v3")
    cluster = mp.load_cluster("h100-sxm", 2560)
    work = mp.TrainWorkload(seq_len=4096, global_batch=4096)
    space = SearchSpace(tp=(1,), pp=(20,), cp=(1,), ep=(64,), etp=(1,), vpp=(1,), mbs=(1,),
                        recompute=("full",), zero=(1,), offload=("none",))
    plain = search(model, cluster, work, space, top=1, refine=0).best
    refined = search(model, cluster, work, space, top=1, refine=1)
    assert refined.stats.split_refined == 1
    assert refined.best.plan.stage_layers is not None
    assert refined.best.step_time_s < plain.step_time_s


def test_nothing_fits_names_the_tightest_plan():
    model = mp.load_model("llama3-405b")
    cluster = mp.load_cluster("h100-sxm", 8)
    work = mp.TrainWorkload(seq_len=8192, global_batch=16)
    with pytest.raises(NoFeasiblePlan, match=r"the tightest, dp=\d.*needs \d+\.\d GiB and "
                                             r"misses by \d+\.\d GiB"):
        search(model, cluster, work)


def test_structurally_empty_space_says_so():
    model = mp.load_model("llama3-8b")
    cluster = mp.load_cluster("h100-sxm", 16)
    work = mp.TrainWorkload(seq_len=4096, global_batch=3)  # no dp divides 3 with 16 GPUs
    with pytest.raises(NoFeasiblePlan, match="structural rules"):
        search(model, cluster, work, SearchSpace(tp=(1,), pp=(1,), cp=(1,)))


def test_cost_objective_needs_a_price_and_uses_it():
    model = mp.load_model("llama3-8b")
    cluster = mp.load_cluster("h100-sxm", 16)
    work = mp.TrainWorkload(seq_len=4096, global_batch=32)
    with pytest.raises(mp.SpecError, match="price_per_gpu_hour"):
        search(model, cluster, work, SMALL, Objective(kind="cost"), refine=0)
    priced = replace(cluster, device=replace(cluster.device, price_per_gpu_hour=2.5))
    by_cost = search(model, priced, work, SMALL, Objective(kind="cost"), refine=0).best
    by_speed = search(model, priced, work, SMALL, refine=0).best
    assert by_cost.tokens_per_s == pytest.approx(by_speed.tokens_per_s)  # same GPU count


def test_fewest_gpus_meets_the_target_and_one_step_down_does_not():
    model = mp.load_model("llama3-8b")
    cluster = mp.load_cluster("h100-sxm", 512)
    work = mp.TrainWorkload(seq_len=4096, global_batch=512)
    space = SearchSpace(cp=(1,), vpp=(1,), mbs=(1, 2), recompute=("none", "full"),
                        zero=(1, 3), offload=("none",))
    budget = 1e11
    obj = Objective(kind="gpus", token_budget=budget, target_days=2.0)
    found = mp.search(model, cluster, work, objective=obj, space=space)
    n = found.best.plan.world_size
    assert budget / found.best.tokens_per_s / 86400 <= 2.0
    smaller = [c for c in gpu_counts(cluster) if c < n]
    assert smaller, "the target should need more than one GPU"
    below = search(model, cluster.with_gpus(smaller[-1]), work, space, top=1).best
    assert budget / below.tokens_per_s / 86400 > 2.0
    with pytest.raises(NoFeasiblePlan, match="days over"):
        mp.search(model, cluster.with_gpus(8), work, space=space,
                  objective=Objective(kind="gpus", token_budget=1e13, target_days=1.0))


def test_space_rules():
    model = mp.load_model("llama3-70b")  # 64 heads, 8 KV heads, 80 layers
    cluster = mp.load_cluster("h100-sxm", 64)
    work = mp.TrainWorkload(seq_len=4096, global_batch=128)
    plans = list(enumerate_plans(model, cluster, work))
    assert plans and all(p.tp <= 8 for p in plans)  # tp within a node by default
    assert all(work.global_batch % (p.dp * p.mbs) == 0 for p in plans)
    assert all(p.vpp == 1 or (p.pp > 1 and p.schedule == "interleaved") for p in plans)
    assert all(p.sp == (p.tp > 1) for p in plans)
    wide = list(enumerate_plans(model, cluster, work, SearchSpace(tp=(16,),
                                                                tp_across_nodes=True)))
    assert wide and all(p.tp == 16 for p in wide)


def test_moe_space_places_experts_inside_dp():
    model = mp.load_model("mixtral-8x7b")
    cluster = mp.load_cluster("h100-sxm", 32)
    work = mp.TrainWorkload(seq_len=4096, global_batch=64)
    plans = list(enumerate_plans(model, cluster, work, SearchSpace(cp=(1,), vpp=(1,),
                                                                   mbs=(1,))))
    eps = {p.ep for p in plans}
    assert eps == {1, 2, 4, 8}
    for p in plans:
        assert (p.dp * p.cp * p.tp // p.etp) % p.ep == 0 and 8 % p.ep == 0


def test_refine_retimes_the_best_with_the_event_engine():
    model, cluster = mp.load_model("llama3-8b"), mp.load_cluster("h100-sxm", 16)
    work = mp.TrainWorkload(seq_len=4096, global_batch=32)
    plain = mp.search(model, cluster, work, top=4, space=SMALL)
    refined = mp.search(model, cluster, work, top=4, space=SMALL, refine=2)  # process pool
    assert [r.engine for r in refined.ranked[:2]] == ["des", "des"]
    assert all(r.engine == "analytical" for r in refined.ranked[2:])
    assert {r.plan for r in refined.ranked[:2]} == {r.plan for r in plain.ranked[:2]}
    steps = [r.step_time_s for r in refined.ranked[:2]]
    assert steps == sorted(steps) and refined.stats.des_refined == 2
    serial = search(model, cluster, work, SMALL, top=4, refine_des=2)
    assert serial.ranked == refined.ranked  # deterministic, with or without processes


def test_search_with_routing_places_experts_and_times_the_busiest_rank():
    from meshplan.core.routing import synthetic_routing

    model, cluster = mp.load_model("mixtral-8x7b"), mp.load_cluster("h100-sxm", 64)
    work = mp.TrainWorkload(seq_len=4096, global_batch=256)
    space = SearchSpace(pp=(1,), cp=(1,), tp=(1,), ep=(1, 8), etp=(1,), zero=(3,),
                        recompute=("full",), mbs=(1,), offload=("none",))
    routing = synthetic_routing(n_layers=32, n_experts=8, top_k=2, tokens=4096, skew=0.8)
    even = mp.search(model, cluster, work, space=space, top=8)
    skewed = mp.search(model, cluster, work, space=space, top=8, routing=routing)
    by_ep = {r.plan.ep: r for r in skewed.ranked}
    assert all(r.plan.expert_load is not None for r in skewed.ranked)
    assert all(len(row) == 8 for row in by_ep[8].plan.expert_placement)
    even_ep8 = next(r for r in even.ranked if r.plan.ep == 8)
    assert by_ep[8].step_time_s > even_ep8.step_time_s  # skew costs even after EPLB
    assert by_ep[1].step_time_s == pytest.approx(
        next(r for r in even.ranked if r.plan.ep == 1).step_time_s)  # no EP, no skew
    with pytest.raises(mp.SpecError, match="routing: 32 layers x 4 experts"):
        mp.search(model, cluster, work, space=space, routing=synthetic_routing(
            n_layers=32, n_experts=4, top_k=2, tokens=64))
    with pytest.raises(mp.SpecError, match="routing: llama3-8b has no experts"):
        mp.search(mp.load_model("llama3-8b"), cluster, work, routing=routing)
