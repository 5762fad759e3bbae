"""Peak memory per rank, by the best measure the device offers (the method is recorded).

CUDA: the caching allocator's peak of allocated bytes over the run. CPU: there is no
allocator statistic, and the resident set keeps what glibc and lazily loaded libraries
hold, so one extra training step runs under torch.profiler with `profile_memory=True` and
the peak of live tensor bytes on its memory timeline is the measure (weights, gradients,
optimizer state, activations and temporaries; not the gloo buffers). If the profiler's
timeline is unavailable, or claims more than the resident set ever grew (it then missed
frees, as seen with DTensor's functional collectives), the peak resident set above the
start-up one stands in, and the method says so.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import torch

_RSS = ("cpu: peak resident set (getrusage ru_maxrss) minus the resident set after torch "
        "and the process group started")
_TIMELINE = ("cpu: peak live tensor bytes in one extra training step (torch.profiler memory "
             "timeline)")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.timeline_peak: int | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.method = "cuda: torch.cuda.max_memory_allocated"
            self.base = 0
        else:
            self.base = resident_bytes()
            self.method = _RSS

    @property
    def needs_extra_step(self) -> bool:
        return self.device.type == "cpu"

    def measure_step(self, step: Callable[[], object]) -> None:
        """Run `step` under the memory profiler and keep its peak of live tensor bytes."""
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=True, with_stack=True) as prof:
            step()
        try:
            from torch.profiler._memory_profiler import MemoryProfileTimeline
            timeline = MemoryProfileTimeline(prof._memory_profile())
            _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
        except Exception:  # private API: fall back to the resident set
            return
        if sizes:
            self.timeline_peak = int(max(sum(s) for s in sizes))
            self.method = _TIMELINE

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base  # KiB
        if self.timeline_peak is not None:
            if self.timeline_peak <= rss:
                return self.timeline_peak
            self.method = (f"{_RSS} (the profiler's timeline said "
                           f"{self.timeline_peak / 2**20:.0f} MiB, more than the resident set "
                           "grew, and was discarded)")
        return max(rss, 0)
