import pytest

from meshplan.core.schedule import (
    PipelineSchedule,
    build_schedule,
    grid,
    makespan,
    peak_inflight,
    peak_inflight_weighted,
)
from meshplan.costmodels.memory import inflight_microbatches


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 3, 1),
                                        ("interleaved", 4, 8, 2), ("interleaved", 4, 12, 3),
                                        ("interleaved", 2, 4, 4)])
def test_every_microbatch_runs_forward_and_backward_once(name, p, m, v):
    s = build_schedule(name, p, m, v)
    for stage in range(s.n_stages):
        acts = s.actions[s.rank_of(stage)]
        for kind in "FB":
            mbs = sorted(a.microbatch for a in acts if a.kind == kind and a.stage == stage)
            assert mbs == list(range(m))
    makespan(s, [1.0] * s.n_stages, [2.0] * s.n_stages)  # raises on deadlock


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (8, 16), (4, 32)])
def test_1f1b_bubble_fraction(p, m):
    # Narayanan et al. 2021 §2.2.1: bubble time fraction (p-1)/(m+p-1) of the step.
    s = build_schedule("1f1b", p, m)
    total = makespan(s, [1.0] * p, [2.0] * p)
    ideal = m * 3.0
    assert (total - ideal) / total == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p,m,v", [(4, 8, 2), (4, 16, 4), (2, 8, 2)])
def test_interleaved_bubble_fraction(p, m, v):
    # Each of v chunks costs 1/v; bubble (p-1)/v of a micro-batch time: (p-1)/(v*m + p - 1).
    s = build_schedule("interleaved", p, m, v)
    n = p * v
    total = makespan(s, [1.0 / v] * n, [2.0 / v] * n)
    ideal = m * 3.0
    assert (total - ideal) / total == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (8, 8), (8, 16), (3, 12)])
def test_zb_h1_bubble(p, m):
    # Qi et al. 2023 §3.1: with T_F = T_B = T_W the ZB-H1 bubble is (p-1)(T_F + T_B - T_W),
    # a third of 1F1B's (p-1)(T_F + T_B + T_W).
    s = build_schedule("zb", p, m)
    total = makespan(s, [1.0] * p, [1.0] * p, [1.0] * p)
    assert total - 3 * m == pytest.approx(p - 1)
    for stage in range(p):
        acts = s.actions[stage]
        for kind in "FBW":
            assert sorted(a.microbatch for a in acts if a.kind == kind) == list(range(m))
    # uneven split: W passes still fill the drain, never lengthen the critical path
    assert makespan(s, [1.0] * p, [1.2] * p, [0.8] * p) < makespan(
        build_schedule("1f1b", p, m), [1.0] * p, [2.0] * p)


def test_zb_needs_w_times():
    with pytest.raises(Exception, match="wgt_s"):
        makespan(build_schedule("zb", 2, 4), [1.0] * 2, [1.0] * 2)


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 4, 6, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 3, 1),
                                        ("interleaved", 4, 8, 2), ("interleaved", 4, 16, 4),
                                        ("zb", 4, 8, 1), ("zb", 4, 2, 1)])
def test_memory_rule_matches_schedule(name, p, m, v):
    s = build_schedule(name, p, m, v)
    for rank in range(p):
        weights = {st: 1.0 / v for st in range(s.n_stages)}
        assert peak_inflight_weighted(s, rank, weights) == pytest.approx(
            inflight_microbatches(name, p, v, rank, m))


def test_1f1b_first_stage_holds_p_microbatches():
    s = build_schedule("1f1b", 4, 8)
    assert peak_inflight(s, 0) == {0: 4} and peak_inflight(s, 3) == {3: 1}


def test_text_round_trip_and_form():
    s = build_schedule("1f1b", 2, 3)
    assert s.text(1, compute_only=True) == "1F0 1B0 1F1 1B1 1F2 1B2"
    assert s.text(0).startswith("0F0 0SF0 0F1 0SF1 0RB0 0B0 0F2 0SF2")
    assert s.text(1).startswith("1RF0 1F0 1B0 1SB0")
    assert s.text(0).endswith("RG OPT")
    again = PipelineSchedule.from_text("1f1b", 1, 3, [s.text(r) for r in range(2)])
    assert again.actions == s.actions


def test_grid_shows_split_backward():
    g = grid(build_schedule("zb", 2, 2))
    assert "0W0" in g and "1W1" in g


def test_grid_shows_pipeline_shape():
    g = grid(build_schedule("1f1b", 2, 2))
    lines = g.splitlines()
    assert len(lines) == 2 and lines[0].startswith("rank  0 | 0F0")
    assert lines[1].split("|")[1].split()[0].startswith(".")  # rank 1 waits one slot


def test_interleaved_needs_divisible_microbatches():
    with pytest.raises(ValueError, match="divisible by pp"):
        build_schedule("interleaved", 4, 6, 2)
