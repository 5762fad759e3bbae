"""The offloading LP: capacities in every phase, what it chooses when room is ample or
short, infeasibility with its shortfall, and the per-layer form the runtime executes."""

import dataclasses

import pytest

import meshplan as mp
from meshplan.core.errors import SpecError
from meshplan.planner.offload import (
    PHASES,
    TIERS,
    capacity,
    offload_problem,
    phase_times,
    quantise,
    solve_offload,
    tier_bytes,
)


def _holds(pr, sol, tiers=TIERS):
    used = tier_bytes(pr, sol)
    for phase in PHASES:
        for tier in tiers:
            assert used[phase, tier] <= capacity(pr, tier) * (1 + 1e-6) + 1, (phase, tier)


def _case(model, cluster, gpus, plan, batch=64):
    m, c = mp.load_model(model), mp.load_cluster(cluster, gpus)
    w = mp.TrainWorkload(seq_len=4096, global_batch=batch)
    return m, c, w, mp.Plan.parse(plan)


def test_llama3_70b_on_one_a100_40gb_node_fits_only_with_offload():
    m, c, w, plan = _case("llama3-70b", "a100-40gb", 8, "dp=8,zero=3,mbs=1")
    for recompute in ("none", "full"):
        assert not mp.simulate(m, c, w, dataclasses.replace(plan, recompute=recompute)).fits
    pr = offload_problem(m, c, w, plan)
    sol = solve_offload(pr)
    _holds(pr, sol)
    assert sol.states["optimizer"][:, 0].mean() < 0.5  # most optimizer state leaves the GPU
    assert (sol.fb_s, sol.optimizer_s) == pytest.approx(phase_times(pr, sol), rel=1e-6)
    q, fixed = quantise(pr, sol)
    _holds(pr, fixed, tiers=("gpu", "cpu"))
    assert any(q.host) and fixed.states["weights"][:, 2].sum() == 0  # no NVMe at runtime
    assert fixed.step_s >= sol.step_s * (1 - 1e-9)  # the LP is a bound on its rounding


def test_with_room_to_spare_compute_is_untouched():
    """Weights stay, nothing is recomputed and forward/backward is pure compute; only the
    optimizer step may hand a slice of the update to the host, which then runs beside the
    GPU's (ZeRO-Offload's split), never slower than the GPU alone."""
    m, c, w, plan = _case("llama3-8b", "h100-sxm", 8, "dp=8,zero=1,mbs=1", batch=8)
    pr = offload_problem(m, c, w, plan)
    sol = solve_offload(pr)
    assert sol.states["weights"][:, 0].min() == pytest.approx(1.0)
    assert sol.acts[:, 2].max() == pytest.approx(0.0, abs=1e-9)
    compute = pr.micro_batches * sum(u.fwd_s + u.bwd_s for u in pr.units)
    assert sol.fb_s == pytest.approx(compute)
    on_gpu = sum(u.params for u in pr.units) * pr.gpu_update_s_per_param
    assert sol.optimizer_s <= on_gpu * (1 + 1e-9)


def test_no_room_anywhere_names_the_tier_and_the_shortfall():
    m, c, w, plan = _case("llama3-70b", "a100-40gb", 8, "dp=8,zero=3,mbs=1")
    pr = dataclasses.replace(offload_problem(m, c, w, plan), cpu_bytes=10e9, nvme_bytes=0.0)
    with pytest.raises(SpecError, match=r"offload\.(cpu|gpu): even with everything offloaded "
                       r"and recomputed, the \w+ tier misses its capacity in the .* phase by "
                       r"[0-9.]+ GB"):
        solve_offload(pr)


def test_405b_beyond_the_host_says_what_the_runtime_lacks():
    m, c, w, plan = _case("llama3-405b", "h100-sxm", 8, "dp=8,zero=3,mbs=1")
    pr = offload_problem(m, c, w, plan)
    assert len(pr.units) == 127  # 126 layers and the embedding/head
    sol = solve_offload(pr)
    _holds(pr, sol)
    assert sol.states["optimizer"][:, 2].sum() > 0  # the LP needs NVMe here
    with pytest.raises(SpecError, match=r"offload\.cpu: the runtime's per-layer offload "
                       r"needs [0-9.]+ GB"):
        quantise(pr, sol)


def test_search_offloads_layers_when_nothing_fits_without_offloading():
    from meshplan.costmodels.offload import Quantised, runtime_solution
    from meshplan.planner.space import SearchSpace
    from meshplan.simulator.analytical import prepare

    m, c, w, _ = _case("llama3-70b", "a100-40gb", 8, "dp=8")
    space = SearchSpace(tp=(1, 2), pp=(1,), cp=(1,), mbs=(1,), zero=(3,),
                        recompute=("none", "full"), offload=("none", "optimizer"))
    found = mp.search(m, c, w, space=space, top=3)
    best = found.best
    assert best.plan.offload == "layers" and best.fits and best.plan.host_layers
    # the plan the runtime would run holds on every tier in every phase
    cm = prepare(m, c, w, dataclasses.replace(best.plan, offload="none", host_layers=None,
                                              recompute="none"), None)
    pr = cm.offload_problem(0)
    host = set(best.plan.host_layers)
    q = Quantised(host=tuple(i in host for i in range(len(pr.units))),
                  recompute=(best.plan.recompute == "full",) * len(pr.units))
    _holds(pr, runtime_solution(pr, q), tiers=("gpu", "cpu"))
    assert best.peak_memory_bytes <= c.device.hbm_bytes
    # beats the coarse optimizer offload the space also offers, in both engines
    coarse = [r for r in found.ranked if r.plan.offload == "optimizer"]
    assert not coarse or best.step_time_s < coarse[0].step_time_s
    des = mp.simulate(m, c, w, best.plan, engine="des")
    assert des.step_time_s == pytest.approx(best.step_time_s, rel=0.05)


def test_offload_layers_is_checked():
    from meshplan.core.check import check_plan

    m, c, w, _ = _case("llama3-70b", "a100-40gb", 8, "dp=8")
    fields = {v.field: v.message for v in check_plan(
        m, c, w, mp.Plan.parse("dp=4,pp=2,offload=layers").resolve(8))}
    assert "pp=2" in fields["plan.offload"]
    bad = dataclasses.replace(mp.Plan.parse("dp=8,zero=3"), host_layers=(0, 99))
    fields = {v.field: v.message for v in check_plan(m, c, w, bad.resolve(8))}
    assert "only with offload=layers" in fields["plan.host_layers"]
    bad = dataclasses.replace(mp.Plan.parse("dp=8,zero=3,offload=layers"), host_layers=(0, 99))
    fields = {v.field: v.message for v in check_plan(m, c, w, bad.resolve(8))}
    assert "units [99] outside 0..80" in fields["plan.host_layers"]
    assert mp.Plan.from_json(bad.to_json()).host_layers == (0, 99)
