"""Peak memory per rank, by the best measure the device offers (the method is recorded).

CUDA: the caching allocator's peak of allocated bytes over the run. CPU: there is no
allocator statistic, and the resident set keeps what glibc, gloo and lazily loaded
libraries hold, so one extra training step runs under torch.profiler with
`profile_memory=True`: the peak is the tensor bytes alive when the step starts (every
tensor storage the garbage collector can reach: weights, optimizer state) plus the
highest running sum of the allocator's allocation (+) and free (−) records during the
step (activations, gradients, temporaries, communication buffers). Some frees go
unrecorded (blocks that DTensor's functional collectives and gloo's threads release
where the profiler does not look); an allocation at the address of a block still
counted live proves that block was freed before it, so the free is entered there. What
stays unaccounted after that (the live bytes after the step tell how much) is said in
the method: the peak may be up to that much lower. Without records, the peak resident
set above the start-up one stands in.
"""

from __future__ import annotations

import gc
import resource
from collections.abc import Callable

import torch

_RSS = ("cpu: peak resident set (getrusage ru_maxrss) minus the resident set after torch "
        "and the process group started")
_ALLOCS = ("cpu: tensor bytes alive at the start of one extra training step plus the peak "
           "running sum of the allocator's records during it (torch.profiler)")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_cpu_ticks(stat: str | None = None) -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs so far, from the first line of /proc/stat
    (user nice system idle iowait irq softirq steal ...); None where there is none.
    Steal is time a virtual CPU was ready to run while the hypervisor ran another guest."""
    if stat is None:
        try:
            with open("/proc/stat") as f:
                stat = f.readline()
        except OSError:
            return None
    fields = stat.split()
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]
    return ticks[7], sum(ticks)


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None
                   ) -> float | None:
    """The share of the CPUs' time between two `host_cpu_ticks` readings that was stolen."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU tensor storages the garbage collector can reach."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        # the type, not isinstance: that reads `__class__`, which deprecated objects
        # (torch.distributed.reduce_op) answer with a warning
        if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu" or \
                obj.is_sparse:
            continue
        try:
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses (DTensor) and
            continue  # freed storages: the local tensors are reachable themselves
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def allocation_records(roots) -> list[tuple[int, int, int]]:
    """(time ns, address, bytes: + allocated, − freed) of the allocator events under the
    profiler's event tree, in time order."""
    from torch._C._profiler import _EventType
    out, stack = [], list(roots)
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation:
            out.append((ev.start_time_ns, ev.extra_fields.ptr, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    return sorted(out)


def peak_growth(records: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(peak, final) running sum of allocation records and the number of frees inferred.

    A free of a block allocated before the records began counts at its record. An
    allocation at the address of a block still counted live means that block was freed
    without a record (no allocator hands out one address twice), so it is freed there."""
    live: dict[int, int] = {}
    running = peak = inferred = 0
    for _, ptr, nbytes in records:
        if nbytes > 0:
            if ptr in live:
                running -= live.pop(ptr)
                inferred += 1
            live[ptr] = nbytes
            running += nbytes
            peak = max(peak, running)
        else:
            running -= live.pop(ptr, -nbytes)
    return peak, running, inferred


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.allocs_peak: int | None = None
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
        """Run `step` under the memory profiler; keep live bytes at start + peak growth."""
        from torch.profiler import ProfilerActivity, profile
        start = live_tensor_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        records = allocation_records(prof.profiler.kineto_results.experimental_event_tree())
        if not records:
            return  # no allocator records: the resident set stands in
        peak, running, inferred = peak_growth(records)
        self.allocs_peak = start + peak
        self.method = _ALLOCS
        if inferred:
            self.method += (f"; {inferred} frees went unrecorded and were entered where "
                            "their address was allocated again")
        missed = running - (live_tensor_bytes() - start)  # records of frees that never came
        if missed > 0.05 * peak:
            self.method += (f"; {missed / 2**20:.1f} MiB of frees went unrecorded, so the peak "
                            "may be up to that much lower")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base  # KiB
        if self.allocs_peak is not None:
            return self.allocs_peak
        return max(rss, 0)
