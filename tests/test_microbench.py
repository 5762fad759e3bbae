"""The profile's timing loop: kernels are timed with their operands out of the cache."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from meshplan.validate import microbench as mb  # noqa: E402


def test_private_cache_is_read_from_the_machine():
    assert mb._parse_size("2048K") == 2 * 2**20
    assert mb._parse_size("32M") == 32 * 2**20
    assert mb._parse_size("4096") == 4096
    size = mb.private_cache_bytes(torch.device("cpu"))
    assert 2**16 <= size <= 2**30  # an L2 between 64 KiB and 1 GiB
    scrub = mb.Scrub(torch.device("cpu"))
    assert scrub.buf.numel() * 4 == 2 * size


def test_every_timed_call_follows_a_scrub():
    events = []

    def scrub():
        events.append("scrub")

    def fn():
        events.append("call")

    mb.time_s(fn, torch.device("cpu"), min_s=0.0, min_reps=5, scrub=scrub)
    assert events[0] == "call"  # the warm-up
    timed = events[1:]
    assert timed == ["scrub", "call"] * 5
    events.clear()
    mb.mean_time_s(fn, torch.device("cpu"), min_s=0.0, scrub=scrub)
    assert events[1:] == ["scrub", "call"] * 4


def test_alternating_calls_take_turns_and_each_gets_its_median():
    order = []
    fns = [lambda: order.append("a"), lambda: order.append("b")]
    times = mb.alternating_time_s(fns, torch.device("cpu"), min_s=0.0, min_reps=3)
    assert order == ["a", "b"] * 4  # one warm-up each, then three turns
    assert len(times) == 2 and all(t >= 0 for t in times)
