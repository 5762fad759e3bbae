"""What the runtime records beside its step times: the host's stolen CPU time, and the
peak of tensor memory on CPU from the profiler's allocator records."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from meshplan.runtime.measure import (  # noqa: E402
    MemoryMeter,
    host_cpu_ticks,
    peak_growth,
    steal_fraction,
)


def test_steal_is_read_from_proc_stat_and_taken_as_a_share_of_all_ticks():
    before = host_cpu_ticks("cpu  100 0 50 800 10 0 5 35 0 0")
    after = host_cpu_ticks("cpu  160 0 60 900 10 0 5 65 0 0")
    assert before == (35, 1000) and after == (65, 1200)
    assert steal_fraction(before, after) == pytest.approx(30 / 200)
    assert host_cpu_ticks("intr 1 2 3") is None
    assert steal_fraction(None, after) is None
    assert steal_fraction(after, after) is None  # no time passed: no share to give


def test_this_machine_reports_ticks_where_linux_has_proc_stat():
    import sys

    ticks = host_cpu_ticks()
    if sys.platform.startswith("linux"):
        assert ticks is not None and 0 <= ticks[0] <= ticks[1]


def test_a_free_without_a_record_is_entered_where_its_address_is_allocated_again():
    records = [(0, 0xA, 100), (1, 0xB, 50), (2, 0xB, -50), (3, 0xA, 100), (4, 0xC, 30),
               (5, 0xD, -20)]  # 0xA freed unseen before t=3; 0xD was alive before t=0
    peak, final, inferred = peak_growth(records)
    assert (peak, final, inferred) == (150, 110, 1)
    assert peak_growth([(0, 1, 10), (1, 2, 10)]) == (20, 20, 0)


def test_the_cpu_meter_sees_a_step_s_temporaries_above_what_lives_before_it():
    keep = torch.ones(1 << 16)  # 256 KiB alive before and after the step
    meter = MemoryMeter(torch.device("cpu"))

    def step():
        tmp = [torch.ones(1 << 18) for _ in range(4)]  # 4 MiB at once, then freed
        return sum(float(t[0]) for t in tmp)

    meter.measure_step(step)
    assert meter.method.startswith("cpu: tensor bytes alive")
    assert 4 * 2**20 + keep.nbytes <= meter.peak_bytes() < 6 * 2**20
