"""The calibrated cost model: the `CostModel` protocol answered from measured tables.

`meshplan profile` measures this machine (GEMMs over a grid of shapes and dtypes, causal
attention over sequence lengths, an elementwise kernel over sizes, collectives over
sizes and process counts, host copies on GPUs) and fits the hardware profile read here.
Every kernel is timed with its operands outside the private cache (L2), as a training
step finds them (`validate.microbench.Scrub`); timed hot, the tables priced a 1-process
tiny-dense step 24% fast on a CPU. The tables and fits:
- GEMM time interpolates the measured FLOP rate linearly in (log m, log n, log k); shapes
  beyond the grid take the nearest edge's rate (big GEMMs sit at the roof).
- Attention interpolates the measured forward and backward FLOP rates in log key length.
- Memory-bound work is `kernels · launch + bytes / bandwidth`, both fitted.
- Collectives interpolate the measured times linearly in bytes, per operation and group
  size; a group size not measured takes α + β · bus bytes (NCCL's convention,
  `collectives.BUS_FACTOR`) fitted at the nearest one; groups that span nodes, which one
  machine cannot measure, fall back to the nominal model. A group smaller than the job slows as
  the job's processes crowd the machine (the concurrency ratio below). A ring hop, every
  rank sending to the next at once (ring attention), has a fit of its own: where the two
  directions share a link it takes longer than one send.
- Ops inside a training step run slower than the tables, timed one kernel at a time,
  price them (operands in the last-level cache or memory rather than just written, code
  and branch history cold): every op's time is multiplied by the profile's
  `in_situ_factor`, measured on a reference model that the validation suite does not
  run (`validate.opbench.in_situ_factor`; 1.08-1.17 on this VM).
- Host time beyond the ops is a table of per-unit overheads: per layer and per model
  chunk call of the plain model (`validate/opbench.py`), and what each parallel mechanism
  adds per layer, a fixed part and a share of the layer's work, fitted at two sizes
  (`validate/mechbench.py`). A message between pipeline stages takes the
  p2p fit plus the latency a running pipeline adds to it (mechbench, `pp_message_s`), and
  a receive posted after its message was sent waits for the busy sender's transport
  thread (mechbench, `pp_late_receive_s`); a backward split into input and weight
  passes, a fixed part per layer plus a share of the layer's backward (mechbench,
  `split_backward`).
- Compute shares the machine when several processes run at once (CPU processes on
  shared cores, memory bandwidth and the last-level cache): every compute time is scaled
  by the slowdown measured with that many processes running the same GEMMs together; past
  the largest count measured (the core count on a CPU), by that slowdown times the
  processes per measured process, the share a fair scheduler gives each. For an
  engine that follows the processes in time, `time_slicing` says how the kernel shares
  the cores: its time slice (`validate.microbench.scheduler_slice_s`) and the share of a
  core a process's communication keeps busy (`validate.commbench.comm_core_share`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from meshplan.core.cluster import ClusterSpec
from meshplan.core.errors import SpecError, require

from . import collectives as coll
from .costs import OPTIMIZER_BYTES_PER_PARAM, OVERLAP_SLOWDOWN, NominalCosts, TimeSlicing
from .flops import eager_factor

FORMAT, VERSION = "meshplan-profile", 1


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    device: str
    gemm: dict[str, list[list[float]]]  # dtype -> rows [m, n, k, seconds]
    attention: dict[str, list[list[float]]]  # dtype -> rows [seq, head_dim, flops, fwd_s, bwd_s]
    memory_bw_bytes_per_s: float
    kernel_overhead_s: float
    collectives: dict[str, dict[str, list[float]]]  # str(n) -> op -> [alpha_s, s_per_bus_byte]
    concurrency: dict[str, float]  # str(processes) -> compute slowdown (1.0 alone)
    host_copy_bytes_per_s: float | None = None
    # dtype -> op name -> rows [nominal bytes, forward s, backward s] of the runtime's own
    # implementation of that op (validate/opbench.py)
    elementwise: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    # optimizer -> [seconds per tensor, seconds per parameter] of the runtime's torch.optim
    optimizer: dict[str, list[float]] = field(default_factory=dict)
    # "layer" | "stage" | "stage:pp" | "layer:<mechanism>" -> [forward s, backward s] the
    # runtime spends beyond its ops and messages (`CostModel.overhead_s`)
    overheads: dict[str, list[float]] = field(default_factory=dict)
    # "layer:<mechanism>" -> [forward, backward] fraction of the layer's work (its ops and
    # the plain layer's overhead) that the mechanism adds beside its fixed overhead
    overhead_shares: dict[str, list[float]] = field(default_factory=dict)
    # str(processes) -> how much slower compute runs while its rank communicates
    overlap_slowdown: dict[str, float] = field(default_factory=dict)
    # how much slower ops run inside a training step than the tables price them
    # (`validate.opbench.in_situ_factor`); multiplies every op's time
    in_situ_factor: float = 1.0
    # seconds a message between pipeline stages takes in a running pipeline beyond the
    # idle p2p fit (`validate.mechbench.time_pipeline_messages`)
    pp_message_s: float = 0.0
    # seconds a pipeline receive posted after its message was sent takes, the sender
    # computing (`validate.mechbench.late_receive_waits`): gloo hands a message over only
    # once the receiver asks, on a thread of the sender that must get a core from its
    # compute
    pp_late_receive_s: float = 0.0
    # [seconds per layer, fraction of the layer's backward] that the runtime's split
    # backward (input pass, then weight pass) adds (`validate.mechbench.time_split_backward`)
    split_backward: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # str(n) -> op -> rows [buffer bytes, seconds] the fits above were made from; where a
    # profile has them, a collective of n ranks interpolates them (`CalibratedCosts._link_s`)
    collective_rows: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    # seconds a process computes before the kernel gives its core to another waiting, with
    # twice as many busy processes as cores (`validate.microbench.scheduler_slice_s`)
    scheduler_slice_s: float | None = None
    # str(processes) -> cores one process keeps busy while its collectives run
    # (`validate.commbench.comm_core_share`)
    comm_core_share: dict[str, float] = field(default_factory=dict)
    source: str = ""


def profile_from_dict(data: dict[str, Any]) -> HardwareProfile:
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    require(found == FORMAT, "profile", f"not a meshplan hardware profile (format {found!r})")
    require(data.get("version") == VERSION, "profile.version",
            f"this meshplan reads profile version {VERSION}, got {data.get('version')}")
    fields = {k: v for k, v in data.items() if k not in ("format", "version", "peaks")}
    try:
        prof = HardwareProfile(**fields)
    except TypeError as err:
        raise SpecError("profile", str(err)) from None
    require(prof.gemm, "profile.gemm", "no GEMM table")
    for dtype, rows in prof.gemm.items():
        require(all(len(r) == 4 and r[3] > 0 for r in rows), f"profile.gemm.{dtype}",
                "rows must be [m, n, k, seconds > 0]")
    require(prof.memory_bw_bytes_per_s > 0, "profile.memory_bw_bytes_per_s",
            f"must be positive, got {prof.memory_bw_bytes_per_s}")
    require(prof.in_situ_factor > 0, "profile.in_situ_factor",
            f"must be positive, got {prof.in_situ_factor}")
    require(prof.pp_message_s >= 0, "profile.pp_message_s",
            f"must be at least 0, got {prof.pp_message_s}")
    require(prof.pp_late_receive_s >= 0, "profile.pp_late_receive_s",
            f"must be at least 0, got {prof.pp_late_receive_s}")
    require(len(prof.split_backward) == 2 and min(prof.split_backward) >= 0,
            "profile.split_backward",
            f"must be [seconds per layer >= 0, fraction >= 0], got {prof.split_backward}")
    require(prof.scheduler_slice_s is None or prof.scheduler_slice_s > 0,
            "profile.scheduler_slice_s", f"must be positive, got {prof.scheduler_slice_s}")
    for n, share in prof.comm_core_share.items():
        require(0 <= share, f"profile.comm_core_share.{n}", f"must be at least 0, got {share}")
    for n, ops in prof.collective_rows.items():
        for op, rows in ops.items():
            require(all(len(r) == 2 and r[0] > 0 and r[1] > 0 for r in rows),
                    f"profile.collective_rows.{n}.{op}", "rows must be [bytes > 0, seconds > 0]")
    for unit, pair in prof.overhead_shares.items():
        require(len(pair) == 2 and min(pair) >= 0, f"profile.overhead_shares.{unit}",
                f"must be [forward >= 0, backward >= 0], got {pair}")
    return prof


def profile_to_dict(p: HardwareProfile) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **asdict(p)}


class _GemmTable:
    """log FLOP rate on the (log2 m, log2 n, log2 k) grid of one dtype."""

    def __init__(self, rows: list[list[float]]):
        axes = [sorted({int(r[i]) for r in rows}) for i in range(3)]
        grid = np.full([len(a) for a in axes], np.nan)
        index = [{v: j for j, v in enumerate(a)} for a in axes]
        for m, n, k, t in rows:
            grid[index[0][int(m)], index[1][int(n)], index[2][int(k)]] = \
                math.log(2.0 * m * n * k / t)
        grid[np.isnan(grid)] = np.nanmax(grid)  # unmeasured shapes: the biggest, at the roof
        self.lo = [math.log2(a[0]) for a in axes]
        self.hi = [math.log2(a[-1]) for a in axes]
        self.interp = RegularGridInterpolator([np.log2(a) for a in axes], grid)

    def rate(self, m: int, n: int, k: int) -> float:
        point = [min(max(math.log2(x), lo), hi)
                 for x, lo, hi in zip((m, n, k), self.lo, self.hi, strict=True)]
        return math.exp(float(self.interp(point)[0]))


class _AttentionTable:
    """log forward and backward FLOP rates against log2 key length (head dims averaged)."""

    def __init__(self, rows: list[list[float]]):
        seqs = sorted({int(r[0]) for r in rows})
        self.x = np.log2(seqs)
        fwd = {s: [] for s in seqs}
        bwd = {s: [] for s in seqs}
        for seq, _, flops, f_s, b_s in rows:
            fwd[int(seq)].append(math.log(flops / f_s))
            bwd[int(seq)].append(math.log(2.5 * flops / max(b_s, 1e-12)))
        self.fwd = np.array([np.mean(fwd[s]) for s in seqs])
        self.bwd = np.array([np.mean(bwd[s]) for s in seqs])

    def rate(self, kv_len: int, backward: bool) -> float:
        y = self.bwd if backward else self.fwd
        return math.exp(float(np.interp(math.log2(max(kv_len, 1)), self.x, y)))


class CalibratedCosts:
    name = "calibrated"

    def __init__(self, cluster: ClusterSpec, profile: HardwareProfile):
        self.cluster, self.profile = cluster, profile
        self.nominal = NominalCosts(cluster)
        self.gemm_tables = {d: _GemmTable(rows) for d, rows in profile.gemm.items() if rows}
        self.attn_tables = {d: _AttentionTable(rows) for d, rows in profile.attention.items()
                            if rows}
        procs = min(cluster.n_gpus, cluster.node.gpus_per_node)
        self.slowdown = _nearest(profile.concurrency, procs, default=1.0)
        cores = max((int(k) for k in profile.concurrency), default=procs)
        self._shared = (cores, procs / cores) if procs > cores else None
        self.op_scale = self.slowdown * profile.in_situ_factor  # every op's time

    def _table(self, tables: dict, dtype: str, what: str):
        for d in (dtype, "bf16" if dtype == "fp8" else dtype):
            if d in tables:
                return tables[d]
        raise SpecError("profile", f"no {what} measurements for {dtype} "
                        f"(profiled: {sorted(tables)})")

    def gemm_s(self, dtype: str, m: int, n: int, k: int, batch: int = 1) -> float:
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        rate = self._table(self.gemm_tables, dtype, "GEMM").rate(m, n, k)
        return batch * 2.0 * m * n * k / rate * self.op_scale

    def attention_s(self, dtype: str, flops: float, kv_len: int,
                    backward: bool = False) -> float:
        if flops <= 0:
            return 0.0
        table = self._table(self.attn_tables, dtype, "attention")
        return flops / table.rate(kv_len, backward) * self.op_scale

    def memory_s(self, traffic_bytes: float, kernels: int = 1) -> float:
        p = self.profile
        return (kernels * p.kernel_overhead_s
                + traffic_bytes / p.memory_bw_bytes_per_s) * self.op_scale

    def overhead_s(self, unit: str, backward: bool, work_s: float = 0.0) -> float:
        pair = self.profile.overheads.get(unit)
        share = self.profile.overhead_shares.get(unit)
        return (pair[int(backward)] * self.slowdown if pair else 0.0) + \
            (share[int(backward)] * work_s if share else 0.0)

    def split_backward_s(self, backward_s: float) -> float:
        per_layer, fraction = self.profile.split_backward
        return per_layer * self.slowdown + fraction * backward_s

    def optimizer_s(self, optimizer: str, params: float, tensors: int) -> float:
        fit = self.profile.optimizer.get(optimizer)
        if fit is None:
            return self.memory_s(params * OPTIMIZER_BYTES_PER_PARAM[optimizer], kernels=4)
        per_tensor, per_param = fit
        return (tensors * per_tensor + params * per_param) * self.slowdown

    def shared_cores(self) -> tuple[int, float] | None:
        """Past the largest process count the profile measured (on a CPU, the core
        count: `meshplan profile` records no more), the fair share of `_nearest`."""
        return self._shared

    def time_slicing(self) -> TimeSlicing | None:
        """The profile's slice where processes outnumber the cores, with the core share
        of a communicating process measured with as many processes as cores (more would
        share the cores among themselves); 0 where the profile did not measure it."""
        p = self.profile
        if self._shared is None or p.scheduler_slice_s is None:
            return None
        fits = [int(n) for n in p.comm_core_share if int(n) <= self._shared[0]]
        share = p.comm_core_share[str(max(fits))] if fits else 0.0
        return TimeSlicing(slice_s=p.scheduler_slice_s, comm_core_share=share)

    def reduce_scatter_overlaps(self) -> bool:
        return self.profile.device != "cpu"

    def shared_fabric_bytes_per_s(self) -> float | None:
        """The most the node was measured to carry with every rank sending at once: the
        ring shifts' aggregate (ranks x bytes per second each) and one send's rate, the
        largest of them. Measured where the profile has ring shifts, else None. On a CPU
        host the aggregate stays put as ranks are added, so messages in flight together
        share it: under a 1 Gbit/s `tc` throttle on the loopback one send moved 132 MB/s
        and ring shifts of 2 and 4 ranks 141 and 132 MB/s in all. On full-duplex
        per-device links the aggregate grows with the ranks and never binds before a
        device's own link does."""
        rates = [size / fit[1] for size, fit in self._fits("ring_shift") if fit[1] > 0]
        if not rates:
            return None
        return max(rates + [1.0 / fit[1] for _, fit in self._fits("p2p") if fit[1] > 0])

    def overlap_slowdown(self) -> float:
        """Measured with this job's process count (`commbench.overlap_slowdown`: a GEMM
        loop with all-reduces in flight); the published average where not measured. A
        measured speed-up (below 0: the machine drifted between the two loops) is read as
        no slowdown, since traffic cannot make compute faster."""
        table = self.profile.overlap_slowdown
        if not table:
            return OVERLAP_SLOWDOWN
        counts = sorted(int(k) for k in table)
        n = max([k for k in counts if k <= self.cluster.n_gpus] or counts[:1])
        return max(0.0, table[str(n)])

    def mem_op_s(self, dtype: str, name: str, nbytes: float, eager: bool) -> float:
        """The measured time of the runtime's implementation of the op when profiled (it
        is what runs, whatever `eager` says), else bytes over the measured bandwidth."""
        base = name.removesuffix("_bwd")
        rows = self.profile.elementwise.get(dtype, {}).get(base)
        if not rows:
            traffic = nbytes * (eager_factor(name) if eager else 1.0)
            return self.memory_s(traffic)
        backward = name != base
        x = nbytes / 2 if backward else nbytes  # `flops.backward` doubles the bytes
        return _loglog(rows, x, 2 if backward else 1) * self.op_scale

    def collective_s(self, group: coll.Group, op: coll.Collective, size_bytes: float) -> float:
        if group.size <= 1 or size_bytes <= 0:
            return 0.0
        measured = self._link_s(op, group.size, size_bytes)
        if group.nodes > 1 or measured is None:
            return self.nominal.collective_s(group, op, size_bytes)
        return measured * self._crowding(group.size)

    def p2p_s(self, crosses_node: bool, size_bytes: float) -> float:
        measured = self._link_s("p2p", 2, size_bytes)
        if crosses_node or measured is None:
            return self.nominal.p2p_s(crosses_node, size_bytes)
        return measured * self._crowding(2)

    def ring_hop_s(self, group: coll.Group, size_bytes: float) -> float:
        """The measured ring shift (`commbench`: every rank sends to the next and receives
        from the previous at once) where the profile has one; else, or across nodes, a
        send. Under `tc` on a loopback both directions share one queue: a 1 MB shift
        took 17.2 ms there against 8.5 ms for one send."""
        measured = self._link_s("ring_shift", group.size, size_bytes)
        if group.nodes > 1 or measured is None:
            return self.p2p_s(group.nodes > 1, size_bytes)
        return measured * self._crowding(group.size)

    def stage_send_s(self, crosses_node: bool, size_bytes: float) -> float:
        return self.p2p_s(crosses_node, size_bytes) + \
            self.profile.pp_message_s * self._crowding(2)

    def late_receive_s(self) -> float:
        return self.profile.pp_late_receive_s * self._crowding(2)

    def sends_on_receive(self) -> bool:
        return self.profile.device == "cpu"  # the runtime's gloo; NCCL on a GPU

    def _crowding(self, group_size: int) -> float:
        """A collective of `group_size` ranks was measured with that many processes; in a
        job of more processes sharing the machine its ranks get the cores as often as the
        job's compute does, so it slows by the job's slowdown over the measured one."""
        measured = _nearest(self.profile.concurrency, group_size, default=1.0)
        return max(1.0, self.slowdown / measured)

    def _fits(self, op: str) -> list[tuple[int, tuple[float, float]]]:
        """(group size, (alpha, beta)) of every measured group size of `op`."""
        return [(int(k), tuple(v[op])) for k, v in self.profile.collectives.items() if op in v]

    def _link_s(self, op: str, n: int, size_bytes: float) -> float | None:
        """Seconds of `op` over `n` ranks of one node on a `size_bytes` buffer, as
        measured: the profile's rows for `n` ranks interpolated linearly in bytes (each
        segment between two measured sizes its own α + β line; the smallest size's time
        below it, the last segment's line beyond the largest), else the α-β fit of the
        nearest measured group size with `n` ranks' bus bytes. One line over 1 KiB-16 MiB
        cannot follow gloo: latency-bound up to 64 KiB, then bandwidth-bound, so the fit
        priced a 4-rank all-reduce of 0.86 MB on the throttled loopback 13% below its
        measured 41.5 ms."""
        rows = self.profile.collective_rows.get(str(n), {}).get(op)
        if rows:
            return _linear(rows, size_bytes)
        fit = self._comm(op, n)
        if fit is None:
            return None
        return fit[0] + fit[1] * fit_factor(op, n) * size_bytes

    def _comm(self, op: str, n: int) -> tuple[float, float] | None:
        sizes = dict(self._fits(op))
        if not sizes:
            return None
        best = min(sizes, key=lambda s: (abs(math.log2(s) - math.log2(n)), -s))
        return sizes[best]


def _loglog(rows: list[list[float]], x: float, col: int) -> float:
    """Interpolate column `col` against column 0 in log-log; linear in x beyond the ends."""
    pts = sorted((r[0], r[col]) for r in rows)
    xs = np.log([p[0] for p in pts])
    ys = np.log([max(p[1], 1e-9) for p in pts])
    if x <= pts[0][0]:
        return pts[0][1]  # launch-bound below the smallest measured size
    if x >= pts[-1][0]:
        return pts[-1][1] * x / pts[-1][0]
    return float(np.exp(np.interp(math.log(x), xs, ys)))


def fit_factor(op: str, n: int) -> float:
    """What a collective's α-β fit multiplies the buffer's bytes by: NCCL's bus factor
    for `n` ranks; 1 for a send and a ring shift, whose buffer is the message."""
    return 1.0 if op in ("p2p", "ring_shift") else coll.BUS_FACTOR[op](n)


def _linear(rows: list[list[float]], x: float) -> float:
    """Column 1 against column 0, linear between rows; the first row's value below them,
    the last two rows' line beyond them (one row: proportional beyond it), flat where
    that line falls: a larger buffer never takes less time, so a last row below the one
    before it (timing noise) is not carried on."""
    pts = sorted(rows)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if x <= xs[-1]:
        return float(np.interp(x, xs, ys))  # the first row's value below it
    x0, y0 = pts[-2] if len(pts) > 1 else (0.0, 0.0)
    return ys[-1] + max((ys[-1] - y0) / (xs[-1] - x0), 0.0) * (x - xs[-1])


def _nearest(table: dict[str, float], n: int, default: float) -> float:
    if not table:
        return default
    keys = sorted(int(k) for k in table)
    below = [k for k in keys if k <= n] or keys[:1]
    k = below[-1]
    if k == n or k == keys[-1]:
        return table[str(k)] * (n / k if n > k else 1.0)  # more processes than measured: share
    above = min(x for x in keys if x > n)
    w = (n - k) / (above - k)
    return table[str(k)] * (1 - w) + table[str(above)] * w


def costs_for(cluster: ClusterSpec, profile: HardwareProfile | None):
    """The cost model for `cluster`: calibrated when a profile is given, else nominal."""
    return NominalCosts(cluster) if profile is None else CalibratedCosts(cluster, profile)
