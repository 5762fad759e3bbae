"""Pipeline split: ILP against the exact DP and brute force; better than even on uneven models."""

import itertools
import random
from dataclasses import replace

import pytest

import meshplan as mp
from meshplan.core.loaders import model_from_dict
from meshplan.core.plan import default_stage_layers
from meshplan.planner import split as split_module
from meshplan.planner.split import (
    DeviceKind,
    SplitProblem,
    dp_split,
    ilp_split,
    optimise_split,
    pipeline_objective,
    rank_memory_bytes,
    split_problem,
)

GB = 1e9


def _random_problem(rng: random.Random, pp: int, vpp: int = 1, devices=None) -> SplitProblem:
    n = rng.randint(pp * vpp, pp * vpp + 8)
    heavy = rng.randint(0, n - 1)
    layer_s = [1.0 + (2.0 if i < heavy and rng.random() < 0.5 else 0.0) for i in range(n)]
    return SplitProblem(
        layer_s=tuple(layer_s), first_s=rng.uniform(0, 4), last_s=rng.uniform(0, 6),
        layer_state_bytes=tuple(1 * GB for _ in range(n)),
        layer_act_bytes=tuple(0.5 * GB for _ in range(n)),
        first_bytes=rng.uniform(0, 3) * GB, last_bytes=rng.uniform(0, 3) * GB,
        base_bytes=1 * GB, inflight=tuple(float(pp - r) for r in range(pp)),
        pp=pp, vpp=vpp, micro_batches=rng.randint(pp, 4 * pp),
        devices=devices or (DeviceKind(name="gpu", ranks=pp,
                                       memory_bytes=rng.uniform(8, 20) * GB),))


def _compositions(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(k))


def _brute(pr: SplitProblem) -> float:
    best = float("inf")
    names = [d.name for d in pr.devices for _ in range(d.ranks)]
    for split in _compositions(pr.n_layers, pr.n_stages):
        if min(split) < pr.min_layers:
            continue
        used = rank_memory_bytes(pr, split)
        for assign in set(itertools.permutations(names, pr.pp)):
            kinds = [next(d for d in pr.devices if d.name == a) for a in assign]
            if any(u > k.memory_bytes for u, k in zip(used, kinds, strict=True)):
                continue
            scales = tuple(k.time_scale for k in kinds)
            best = min(best, pipeline_objective(pr, split, scales))
    return best


@pytest.mark.parametrize("solver", ["auto", "cbc"])
def test_ilp_equals_dp_on_uniform_devices(solver, monkeypatch):
    monkeypatch.setattr(split_module, "SOLVER", solver)
    rng = random.Random(7)
    checked = 0
    for _ in range(40):
        pr = _random_problem(rng, pp=rng.randint(2, 5))
        try:
            dp = dp_split(pr)
        except mp.SpecError:
            with pytest.raises(mp.SpecError, match="over by"):
                ilp_split(pr)
            continue
        ilp = ilp_split(pr)
        assert ilp.objective_s == pytest.approx(dp.objective_s, rel=1e-9)
        checked += 1
    assert checked >= 15  # most instances are feasible


@pytest.mark.parametrize("vpp", [1, 2])
def test_ilp_equals_brute_force_with_mixed_devices(vpp):
    rng = random.Random(3 + vpp)
    for _ in range(6):
        devices = (DeviceKind(name="fast", ranks=1, memory_bytes=10 * GB, time_scale=1.0),
                   DeviceKind(name="big", ranks=2, memory_bytes=30 * GB, time_scale=1.6))
        pr = _random_problem(rng, pp=3, vpp=vpp, devices=devices)
        best = _brute(pr)
        if best == float("inf"):
            with pytest.raises(mp.SpecError):
                ilp_split(pr)
            continue
        split = ilp_split(pr)
        assert split.objective_s == pytest.approx(best, rel=1e-9)
        assert split.rank_devices.count("fast") <= 1


def test_infeasible_split_says_by_how_much():
    pr = _random_problem(random.Random(1), pp=2)
    pr = replace(pr, devices=(DeviceKind(name="gpu", ranks=2, memory_bytes=2 * GB),))
    with pytest.raises(mp.SpecError, match=r"memory_rank_\d.*over by \d+\.\d+ GiB"):
        ilp_split(pr)


def _step(model, cluster, work, plan):
    return mp.simulate(model, cluster, work, plan).step_time_s


def test_split_beats_even_on_heavy_head():
    """A big vocabulary on a thin model: the last stage's head costs several layers."""
    model = model_from_dict({"name": "wide-vocab", "n_layers": 16, "hidden_size": 2048,
                             "n_heads": 16, "n_kv_heads": 8, "ffn_hidden_size": 5632,
                             "vocab_size": 256000})
    cluster = mp.load_cluster("h100-sxm", 8)
    work = mp.TrainWorkload(seq_len=4096, global_batch=64)
    plan = mp.Plan.parse("tp=1,pp=4,mbs=1,zero=1").resolve(8)
    split = optimise_split(model, cluster, work, plan)
    assert split is not None and split[-1] < split[1]  # the head's stage gets fewer layers
    tuned = _step(model, cluster, work, replace(plan, stage_layers=split))
    assert tuned < 0.97 * _step(model, cluster, work, plan)
    ilp = ilp_split(split_problem(model, cluster, work, plan))
    assert ilp.stage_layers == split or ilp.objective_s == pytest.approx(
        dp_split(split_problem(model, cluster, work, plan)).objective_s, rel=1e-9)


def test_split_beats_even_on_dense_first_moe():
    """DeepSeek-V3: 3 dense layers then 58 MoE layers over 20 stages. The even split
    (spare layer in the middle) leaves one stage with 4 MoE layers; the optimum gives
    the spare layers to the stage of cheap dense layers."""
    model = mp.load_model("deepseek-v3")
    cluster = mp.load_cluster("h100-sxm", 2560)
    work = mp.TrainWorkload(seq_len=4096, global_batch=4096)
    plan = mp.Plan.parse("tp=1,pp=20,ep=64,etp=1,mbs=1,zero=1,recompute=full").resolve(2560)
    pr = split_problem(model, cluster, work, plan)
    assert len(set(pr.layer_s)) == 2  # dense-first layers cost differently
    tuned = ilp_split(pr)
    assert tuned.stage_layers[0] >= 4 and max(tuned.stage_layers[1:]) == 3
    default = default_stage_layers(model.n_layers, plan.n_stages)
    assert tuned.objective_s < 0.97 * pipeline_objective(pr, default)
    assert _step(model, cluster, work, replace(plan, stage_layers=tuned.stage_layers)) < \
        0.97 * _step(model, cluster, work, plan)
