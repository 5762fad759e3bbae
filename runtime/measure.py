"""Peak memory per rank, by the best measure the device offers (the method is recorded).

CUDA: the caching allocator's peak of allocated bytes. CPU: there is no allocator
statistic, so the peak resident set (getrusage's ru_maxrss) minus the resident set
when the meter started (after torch and the process group came up) stands in; it
includes allocator slack and anything else the process touched.
"""

from __future__ import annotations

import resource

import torch


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.method = "cuda: torch.cuda.max_memory_allocated"
            self.base = 0
        else:
            self.base = resident_bytes()
            self.method = ("cpu: peak resident set (getrusage ru_maxrss) minus the resident "
                           "set after torch and the process group started")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return max(peak - self.base, 0)
