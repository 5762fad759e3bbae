"""Routing statistics and expert placement: counts, bad data, baselines, the MILP."""

import itertools
import json

import numpy as np
import pytest

from meshplan.cli import main
from meshplan.core.errors import SpecError
from meshplan.core.routing import RoutingStats, routing_from_topk, synthetic_routing
from meshplan.planner.placement import (
    BASELINES,
    Placement,
    PlacementProblem,
    evaluate,
    optimise_placement,
    replica_counts,
)


def test_trace_counts_loads_and_inter_layer_pairs():
    ids = np.array([[[0, 1], [1, 2], [0, 3]],  # layer 0: three tokens, top-2
                    [[2, 3], [2, 0], [1, 3]]])  # layer 1
    r = routing_from_topk(ids, 4)
    assert r.expert_tokens.tolist() == [[2, 2, 1, 1], [1, 1, 2, 2]]
    # token 0 goes {0,1} -> {2,3}: pairs (0,2),(0,3),(1,2),(1,3), each weighing 1/k
    assert r.pair_tokens[0, 0, 2] == pytest.approx(0.5)  # token 0 only
    assert r.pair_tokens[0, 1, 2] == pytest.approx(1.0)  # tokens 0 and 1
    np.testing.assert_allclose(r.pair_tokens[0].sum(axis=1), r.expert_tokens[0])


@pytest.mark.parametrize("ids,n,match", [
    (np.zeros((3, 4), dtype=int), 8, r"shape \[layers, tokens, top_k\]"),
    (np.full((2, 3, 2), 0.5), 8, "integer expert ids"),
    (np.array([[[0, 9]], [[1, 2]]]), 8, r"expert id 9 at \[layer, token, slot\] = \[0, 0, 1\] "
                                        r"is outside 0..7"),
    (np.array([[[0, -1]]]), 8, "expert id -1"),
])
def test_bad_traces_are_named(ids, n, match):
    with pytest.raises(SpecError, match=match):
        routing_from_topk(ids, n)


def test_bad_counts_are_named():
    with pytest.raises(SpecError, match=r"negative count -3 at \[1, 2\]"):
        RoutingStats(expert_tokens=np.array([[1.0, 2, 3], [1, 2, -3]]))
    with pytest.raises(SpecError, match=r"routing.pair_tokens: needs shape \[1, 3, 3\]"):
        RoutingStats(expert_tokens=np.ones((2, 3)), pair_tokens=np.ones((2, 3, 3)))
    with pytest.raises(SpecError, match="NaN"):
        RoutingStats(expert_tokens=np.array([[1.0, np.nan]]))


def test_synthetic_routing_is_seeded_and_skewed():
    kw = dict(n_layers=3, n_experts=16, top_k=2, tokens=2000)
    a = synthetic_routing(**kw, skew=1.0, seed=3)
    b = synthetic_routing(**kw, skew=1.0, seed=3)
    assert np.array_equal(a.expert_tokens, b.expert_tokens)
    flat = synthetic_routing(**kw, skew=0.0, seed=3)
    assert a.imbalance().mean() > 2 * flat.imbalance().mean()
    # with affinity, one partner per expert carries most of a row's pair tokens
    tied = synthetic_routing(**kw, skew=0.0, affinity=0.9, seed=3)
    def partner_share(r):
        return (r.pair_tokens[0].max(axis=1) / r.pair_tokens[0].sum(axis=1)).mean()

    # each of a token's k x k pairs weighs 1/k: a followed pair carries 0.9 / k of a row
    assert partner_share(tied) > 0.4 > 3 * partner_share(flat)


def _problem(seed=0, skew=1.0, affinity=0.0, layers=4, experts=16, gpus=8, gpn=4, r=4,
             nic=0.0, **kw):
    routing = synthetic_routing(n_layers=layers, n_experts=experts, top_k=2, tokens=1024,
                                skew=skew, affinity=affinity, seed=seed)
    return PlacementProblem(routing=routing, n_gpus=gpus, gpus_per_node=gpn, redundant=r,
                            compute_s_per_token=1e-6, nic_s_per_token=nic, **kw)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_method_fills_the_slots_it_has(name):
    pr = _problem(r=6)
    placement = BASELINES[name](pr)
    counts = placement.replica_counts(16)
    for layer, gpus in enumerate(placement.gpu_experts):
        assert len(gpus) == 8 and all(len(g) <= pr.slots for g in gpus)
        assert sum(len(g) for g in gpus) == 16 + 6
        assert counts[layer].min() >= 1
        assert counts[layer].tolist() == replica_counts(
            pr, pr.routing.expert_tokens[layer]).tolist()


def test_water_filling_is_exact_for_the_hottest_replica():
    pr = _problem(r=3, experts=5, gpus=4, gpn=4, layers=1)
    w = np.array([9.0, 7.0, 2.0, 1.0, 1.0])
    best = min(max(w / (1 + np.array(extra)))
               for extra in itertools.product(range(4), repeat=5) if sum(extra) == 3)
    assert max(w / replica_counts(pr, w)) == pytest.approx(best)


@pytest.mark.parametrize("seed,skew,affinity,nic", [
    (0, 1.2, 0.0, 0.0), (1, 0.6, 0.0, 0.0), (2, 0.8, 0.7, 4e-6), (3, 0.3, 0.9, 4e-6)])
def test_milp_is_never_worse_than_the_baselines(seed, skew, affinity, nic):
    pr = _problem(seed=seed, skew=skew, affinity=affinity, nic=nic)
    res = optimise_placement(pr, time_limit_s=8)
    best = min(c.objective_s for c in res.baselines.values())
    assert res.cost.objective_s <= best * (1 + 1e-9)
    assert res.lower_bound_s <= res.cost.objective_s
    assert evaluate(pr, res.placement).objective_s == pytest.approx(res.cost.objective_s)


def test_milp_keeps_tokens_on_their_node_when_crossing_costs():
    pr = _problem(seed=4, skew=0.2, affinity=0.9, nic=2e-5, layers=3)
    res = optimise_placement(pr, time_limit_s=10)
    eplb = res.baselines["eplb"]
    assert res.layers_improved >= 1
    assert res.cost.cross_node_tokens.sum() < 0.9 * eplb.cross_node_tokens.sum()
    assert res.cost.objective_s < eplb.objective_s


def test_migration_cost_keeps_the_current_placement():
    base = _problem(seed=5, skew=0.8)
    current = BASELINES["round-robin"](base)
    pr = _problem(seed=5, skew=0.8, current=current, migration_s_per_expert=1.0)
    res = optimise_placement(pr, time_limit_s=4)
    assert res.cost.moved.sum() == 0
    assert res.baselines["round-robin"].moved.sum() == 0


def test_maps_are_eplb_shaped():
    placement = Placement(gpu_experts=(((0, 1), (2,), (3, 0)),))
    m = placement.maps(4)
    assert m["physical_to_logical"] == [[0, 1, 2, -1, 3, 0]]
    assert m["logical_to_physical"] == [[[0, 5], [1, -1], [2, -1], [4, -1]]]
    assert m["replica_counts"] == [[2, 1, 1, 1]]


def test_place_experts_cli(tmp_path, capsys):
    out = tmp_path / "maps.json"
    code = main(["place-experts", "--model", "mixtral-8x7b", "--cluster", "h100-sxm",
                 "--gpus", "8", "--redundant", "8", "--synthetic", "zipf:0.8",
                 "--tokens", "512", "--time-limit", "4", "--json", "--out", str(out)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["objective_s"] <= min(b["objective_s"] for b in data["baselines"].values())
    assert len(json.loads(out.read_text())["physical_to_logical"]) == 32  # MoE layers
    again = main(["place-experts", "--model", "mixtral-8x7b", "--cluster", "h100-sxm",
                  "--gpus", "8", "--redundant", "8", "--synthetic", "zipf:0.8",
                  "--tokens", "512", "--time-limit", "4", "--json", "--current", str(out),
                  "--migration-s", "1"])
    assert again == 0 and json.loads(capsys.readouterr().out)["moved"] == 0
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"topk_ids": [[[0, 9]]]}))
    assert main(["place-experts", "--model", "mixtral-8x7b", "--cluster", "h100-sxm",
                 "--gpus", "8", "--trace", str(trace)]) == 2
    assert "expert id 9" in capsys.readouterr().err
    assert main(["place-experts", "--model", "llama3-8b", "--cluster", "h100-sxm",
                 "--gpus", "8", "--synthetic", "zipf"]) == 2
    assert "no experts" in capsys.readouterr().err


def _moe_case():
    import dataclasses

    import meshplan as mp

    model, cluster = mp.load_model("mixtral-8x7b"), mp.load_cluster("h100-sxm", 64)
    work = mp.TrainWorkload(seq_len=4096, global_batch=256)
    routing = synthetic_routing(n_layers=model.n_moe_layers, n_experts=8, top_k=2,
                                tokens=4096, skew=0.8, seed=0)
    load = tuple(tuple(float(x) for x in row) for row in routing.expert_tokens)
    base = mp.Plan.parse("tp=1,ep=8,pp=2,mbs=1,zero=1,recompute=full")
    pr = PlacementProblem(routing=routing, n_gpus=8, gpus_per_node=8, redundant=8)
    eplb = BASELINES["eplb"](pr).maps(8)["physical_to_logical"]
    plans = {"even": base, "skewed": dataclasses.replace(base, expert_load=load),
             "placed": dataclasses.replace(base, expert_load=load,
                                           expert_placement=tuple(map(tuple, eplb)))}
    return model, cluster, work, plans


@pytest.mark.parametrize("engine", ["analytical", "des"])
def test_simulators_time_the_busiest_ep_rank_of_a_placement(engine):
    import meshplan as mp

    model, cluster, work, plans = _moe_case()
    r = {k: mp.simulate(model, cluster, work, p, engine=engine) for k, p in plans.items()}
    # skewed routing on the contiguous placement: the hottest rank sets every MoE layer
    assert r["skewed"].step_time_s > 1.5 * r["even"].step_time_s
    # EPLB with one redundant slot per rank brings it back near even routing, for twice
    # the expert weights
    assert r["placed"].step_time_s < 1.15 * r["even"].step_time_s
    assert r["placed"].memory.weights > 1.5 * r["even"].memory.weights


def test_expert_load_is_checked():
    import dataclasses

    import meshplan as mp
    from meshplan.core.check import check_plan

    model, cluster, work, plans = _moe_case()
    bad = dataclasses.replace(plans["even"], expert_load=((1.0, 2.0, -1.0),)).resolve(64)
    fields = {(v.field, v.message) for v in check_plan(model, cluster, work, bad)}
    assert ("plan.expert_load[0]", "3 entries for 8 experts") in fields
    assert any("must be >= 0, got [-1.0]" in m for _, m in fields)
    again = mp.Plan.from_json(plans["placed"].to_json())
    assert again.expert_load == plans["placed"].expert_load
