"""Failures and checkpoints: the simulated goodput peaks at the Young/Daly interval and
matches the first-order expected waste there."""

import pytest

from meshplan.core.errors import SpecError
from meshplan.simulator.failures import (
    FailureModel,
    best_interval_steps,
    expected_goodput,
    simulate_goodput,
    young_daly_interval_s,
)

FM = FailureModel(mtbf_s=36_000.0, checkpoint_s=60.0, restart_s=300.0)


def test_goodput_peaks_at_the_young_daly_interval():
    step = 4.0
    best = best_interval_steps(step, FM)
    assert best * step == pytest.approx(young_daly_interval_s(FM), abs=step)
    grid = [best // 8, best // 4, best // 2, best, 2 * best, 4 * best, 8 * best]
    # common random numbers: every interval sees the same failure times
    runs = {k: simulate_goodput(step, k, FM, seed=7).goodput for k in grid}
    assert max(runs, key=runs.get) == best
    assert runs[best] == pytest.approx(expected_goodput(FM, best * step), abs=0.01)
    assert runs[best // 8] < runs[best] and runs[8 * best] < runs[best]


def test_same_seed_same_answer_and_no_failures_means_only_checkpoints_cost():
    a = simulate_goodput(2.0, 100, FM, seed=3)
    assert a == simulate_goodput(2.0, 100, FM, seed=3)
    rare = FailureModel(mtbf_s=1e12, checkpoint_s=10.0, restart_s=0.0)
    r = simulate_goodput(1.0, 90, rare, horizon_s=100_000.0)
    assert r.failures == 0 and r.goodput == pytest.approx(0.9, abs=1e-3)


def test_bad_failure_model_is_named():
    with pytest.raises(SpecError, match="failures.mtbf_s"):
        FailureModel(mtbf_s=0.0, checkpoint_s=1.0, restart_s=1.0)
    with pytest.raises(SpecError, match="failures.interval_steps"):
        simulate_goodput(1.0, 0, FM)
