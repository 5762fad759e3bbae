"""What the runtime records beside its step times: the host's stolen CPU time."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from meshplan.runtime.measure import host_cpu_ticks, steal_fraction  # noqa: E402


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
