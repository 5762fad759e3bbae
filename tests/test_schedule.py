import pytest

from meshplan.core.schedule import (
    SPLIT_SCHEDULES,
    PipelineSchedule,
    build_schedule,
    grid,
    late_receives,
    makespan,
    peak_inflight,
    peak_inflight_weighted,
    splits_backward,
)
from meshplan.costmodels.memory import (
    inflight_microbatches,
    last_stage_inflight,
    split_backward_pending,
)


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


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 1, 4, 1), ("1f1b", 4, 8, 1),
                                        ("interleaved", 2, 4, 2), ("zb", 1, 4, 1),
                                        ("zb", 4, 8, 1), ("dualpipe", 2, 8, 1)])
def test_the_split_schedules_by_name_are_those_whose_ir_splits(name, p, m, v):
    assert splits_backward(build_schedule(name, p, m, v)) == (name in SPLIT_SCHEDULES)


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


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 4, 6, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 3, 1),
                                        ("interleaved", 4, 8, 2), ("zb", 4, 8, 1),
                                        ("zb", 4, 2, 1), ("zb", 2, 8, 1)])
def test_last_stage_rule_matches_schedule(name, p, m, v):
    s = build_schedule(name, p, m, v)
    last = s.n_stages - 1
    assert peak_inflight(s, s.rank_of(last))[last] == last_stage_inflight(name, p, m)


@pytest.mark.parametrize("p,m", [(2, 8), (4, 8), (4, 2), (8, 5), (3, 12)])
def test_zb_peak_of_activations_and_pending_weight_gradients(p, m):
    # Walk the IR: F keeps a micro-batch's activations (act), B on any stage but the first
    # adds the gradients W needs (grad), W frees both. The closed form must give the peak.
    act, grad = 1.0, 0.37
    s = build_schedule("zb", p, m)
    for rank in range(p):
        held = peak = 0.0
        for a in s.actions[rank]:
            held += {"F": act, "B": grad if rank else 0.0, "W": -act - (grad if rank else 0)
                     }.get(a.kind, 0.0)
            peak = max(peak, held)
        assert peak == pytest.approx(act * inflight_microbatches("zb", p, 1, rank, m)
                                     + grad * split_backward_pending("zb", rank, m))


def test_1f1b_first_stage_holds_p_microbatches():
    s = build_schedule("1f1b", 4, 8)
    assert peak_inflight(s, 0) == {0: 4} and peak_inflight(s, 3) == {3: 1}


def test_late_receives_are_those_after_a_rank_s_first_compute():
    s = build_schedule("1f1b", 2, 3)  # rank 1: 1RF0 1F0 ... 1RF1 ... 1RF2; rank 0: 3 RB
    assert (late_receives(s, 0), late_receives(s, 1)) == (3, 2)
    # interleaved: rank 1 receives stage 1's and 3's inputs and stage 1's gradients
    assert late_receives(build_schedule("interleaved", 2, 4, vpp=2), 1) == 3 * 4 - 1


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


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 10), (6, 12), (8, 16), (8, 20)])
def test_dualpipe_runs_each_direction_through_its_own_pipeline(p, m):
    s = build_schedule("dualpipe", p, m)
    assert s.n_stages == 2 * p and s.n_pipes == 2
    for stage in range(2 * p):
        rank = s.rank_of(stage)
        assert rank == (stage if stage < p else 2 * p - 1 - stage)  # mirrored directions
        assert s.block(stage) == stage % p
        mbs = range(m // 2) if stage < p else range(m // 2, m)
        for kind in "FBW":
            done = sorted(a.microbatch for a in s.actions[rank]
                          if a.kind == kind and a.stage == stage)
            assert done == list(mbs)
    for acts in s.actions:  # a paired B follows an F of the other direction
        compute = [a for a in acts if a.kind in "FBW"]
        for prev, a in zip(compute, compute[1:], strict=False):
            if a.paired:
                assert a.kind == "B" and prev.kind == "F" and (prev.stage < p) != (a.stage < p)
    n = 2 * p
    makespan(s, [1.0] * n, [1.0] * n, [1.0] * n)  # raises on deadlock


@pytest.mark.parametrize("p,m", [(4, 8), (4, 16), (6, 12), (8, 16), (8, 40), (16, 64)])
def test_dualpipe_bubble_and_memory(p, m):
    """DeepSeek-V3 report, Table 2: bubble (p/2 − 1)(F&B + B − 3W) with B the full backward
    and F&B a paired forward and backward (here F + B: no overlap), activations of p + 1
    micro-batches per rank. Its schedule then beats ZB-H1's (p − 1)(F + B − 2W)."""
    s = build_schedule("dualpipe", p, m)
    n = 2 * p
    for f, b, w in [(1.0, 1.0, 1.0), (1.0, 1.2, 0.8), (1.0, 1.5, 0.5), (1.0, 2.0, 0.5)]:
        bubble = makespan(s, [f] * n, [b] * n, [w] * n) - m * (f + b + w)
        full = b + w
        assert bubble <= (p / 2 - 1) * ((f + full) + full - 3 * w) + 1e-9
        assert bubble < (p - 1) * (f + full - 2 * w)
        if f == b == w:  # equal passes: one forward per pair of ranks
            assert bubble == pytest.approx((p / 2 - 1) * f)
    for rank in range(p):
        assert sum(peak_inflight(s, rank).values()) == p + 1
        half = {st: 0.5 for st in range(n)}  # each block is half the rank's layers
        assert peak_inflight_weighted(s, rank, half) == pytest.approx(
            inflight_microbatches("dualpipe", p, 1, rank, m))


def test_dualpipe_pairs_save_what_they_overlap():
    s = build_schedule("dualpipe", 4, 8)
    plain = makespan(s, [1.0] * 8, [1.0] * 8, [1.0] * 8)
    assert makespan(s, [1.0] * 8, [1.0] * 8, [1.0] * 8, lambda f, b: 0.5) < plain
    assert makespan(s, [1.0] * 8, [1.0] * 8, [1.0] * 8, lambda f, b: 0.0) == plain


def test_dualpipe_text_round_trip_and_limits():
    s = build_schedule("dualpipe", 4, 8)
    again = PipelineSchedule.from_text("dualpipe", 2, 8, [s.text(r) for r in range(4)],
                                       n_pipes=2, stage_ranks=s.stage_ranks)
    assert again == s and "+" in s.text(0)
    with pytest.raises(Exception, match="even pp"):
        build_schedule("dualpipe", 3, 12)
    with pytest.raises(Exception, match=r"2\*pp = 8"):
        build_schedule("dualpipe", 4, 6)
