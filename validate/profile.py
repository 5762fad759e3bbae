"""`meshplan profile`: measure this machine and fit its hardware profile.

Compute is measured in this process with one thread (each runtime process on a CPU gets
one core), collectives and shared-machine slowdowns under torchrun with 2..N processes
(`commbench.py`). The fits are least squares with non-negative coefficients:
`t = α + β · bus bytes` per collective and group size (NCCL's bus-bandwidth convention),
`t = launch + bytes / bandwidth` for the elementwise kernel. GEMM and attention stay
tables; `costmodels.calibrated` interpolates them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from meshplan.core.errors import require
from meshplan.costmodels.calibrated import HardwareProfile, fit_factor, profile_to_dict

GEMM_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
ATTN_SEQS = (64, 128, 256, 512, 1024, 2048)
ATTN_HEAD_DIMS = (32, 64, 128)
MEMORY_SIZES = tuple(2**i for i in range(10, 27, 2))
COMM_SIZES = tuple(4**i for i in range(5, 13))  # 1 KiB .. 16 MiB


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    device: str = "cpu"  # or "cuda"
    processes: tuple[int, ...] = (2, 4)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    gemm_sizes: tuple[int, ...] = GEMM_SIZES
    max_gemm_flops: float = 4e9
    comm_sizes: tuple[int, ...] = COMM_SIZES
    mechanisms: bool = True  # time each parallel mechanism's layer (the slowest part)
    sweeps: int = 3  # single-process tables: measured this many times, median per row;
    # after each, one pass of the multi-process benchmarks (each keeps its fastest pass)


QUICK = {"gemm_sizes": GEMM_SIZES[:6], "comm_sizes": COMM_SIZES[:6], "mechanisms": False,
         "sweeps": 1}


def fit_line(x: list[float], t: list[float]) -> tuple[float, float]:
    """(intercept, slope) >= 0 minimising the squared *relative* error of t = a + b·x."""
    xs, ts = np.asarray(x, float), np.asarray(t, float)
    design = np.stack([np.ones_like(xs), xs], axis=1) / ts[:, None]
    coef, _ = nnls(design, np.ones_like(ts))
    return float(coef[0]), float(coef[1])


def fit_plane(x: list[float], y: list[float], t: list[float]) -> tuple[float, float]:
    """(a, b) >= 0 minimising the squared relative error of t = a·x + b·y."""
    ts = np.asarray(t, float)
    design = np.stack([np.asarray(x, float), np.asarray(y, float)], axis=1) / ts[:, None]
    coef, _ = nnls(design, np.ones_like(ts))
    return float(coef[0]), float(coef[1])


def rows_by_op(rows: list[list]) -> dict[str, list[list[float]]]:
    """commbench's rows [op, bytes, seconds] as op -> rows [bytes, seconds]."""
    return {op: [[b, t] for o, b, t in rows if o == op] for op in sorted({r[0] for r in rows})}


def fit_collectives(rows: list[list], n: int) -> dict[str, list[float]]:
    return {op: list(fit_line([fit_factor(op, n) * b for b, _ in pts], [t for _, t in pts]))
            for op, pts in rows_by_op(rows).items()}


def concurrency_slowdown(rows: list[list]) -> float:
    """Median over shapes of (time with every rank running, time with one rank alone),
    rows [m, n, k, together s, alone s] (`commbench.concurrent_gemm_rows`); the median
    resists a shape caught by interference from outside."""
    return float(np.median([t / alone for *_, t, alone in rows])) if rows else 1.0


def measure(opts: ProfileOptions, say=print) -> dict:
    """Run every benchmark; returns the profile as a JSON-ready dict."""
    import torch

    from meshplan.costmodels.calibrated import CalibratedCosts
    from meshplan.loaders import load_cluster

    from .opbench import in_situ_factor, overheads

    torch.set_num_threads(1)
    device = torch.device("cuda" if opts.device == "cuda" else "cpu")
    passes: list[dict] = []
    prof = _single_process(opts, device, say, after_sweep=lambda: passes.append(
        _shared_pass(opts, device, len(passes) + 1, say)))
    say("per-layer host overhead ...")  # what the tables just measured leave unexplained
    one = load_cluster("cpu", gpus=1)
    prof = replace(prof, overheads=overheads(CalibratedCosts(one, prof), opts.dtypes[0], device,
                                             say))
    say("ops inside a training step against the tables ...")
    prof = replace(prof, in_situ_factor=in_situ_factor(CalibratedCosts(one, prof),
                                                       opts.dtypes[0], device))
    cores = _cores(opts, device)
    prof = replace(prof, **_shared_machine(opts, [p["comm"] for p in passes], cores))
    if device.type == "cpu":
        from .microbench import scheduler_slice_s

        say("the scheduler's time slice ...")
        prof = replace(prof, scheduler_slice_s=scheduler_slice_s(2 * cores))
    prof = replace(prof, source=f"{prof.source}; collectives and mechanisms the fastest of "
                                f"{len(passes)} passes")
    mechanisms = [p["mech"] for p in passes if p["mech"] is not None]
    if mechanisms:
        prof = mechanism_overheads(prof, fastest_pass(mechanisms), say)
    return {**profile_to_dict(prof), "peaks": peaks(prof)}


def relink(base: dict[str, Any], opts: ProfileOptions, say=print) -> dict:
    """`base` (a profile's JSON) with its collectives and its compute slowdown under
    communication measured anew, `opts.sweeps` passes, the rest kept: the profile of the
    same machine on links that changed since, e.g. throttled to test how the engines
    price overlap on slow links."""
    from meshplan.costmodels.calibrated import profile_from_dict

    prof = profile_from_dict(base)
    passes = []
    for k in range(opts.sweeps):
        say(f"collectives with {', '.join(map(str, opts.processes))} processes: pass "
            f"{k + 1} of {opts.sweeps} ...")
        passes.append({n: _commbench(n, opts, gemm=False) for n in opts.processes})
    links = _shared_machine(opts, passes, cores=0)
    prof = replace(prof, collectives=links["collectives"],
                   collective_rows=links["collective_rows"],
                   overlap_slowdown=links["overlap_slowdown"],
                   comm_core_share=links["comm_core_share"],
                   source=f"{prof.source}; collectives re-measured ({opts.sweeps} passes)")
    return {**profile_to_dict(prof), "peaks": peaks(prof)}


def _shared_pass(opts: ProfileOptions, device, k: int, say) -> dict:
    """One pass of the benchmarks that run several processes at once: the collectives and
    shared compute at each process count and, on a CPU, each parallel mechanism's layer.
    The passes follow the compute sweeps, so they fall minutes apart."""
    mech = opts.mechanisms and device.type == "cpu" and 2 in opts.processes
    say(f"collectives and shared compute with {', '.join(map(str, opts.processes))} "
        f"processes{', each parallel mechanism with 2' if mech else ''}: pass {k} of "
        f"{opts.sweeps} ...")
    cores = _cores(opts, device)
    comm = {n: _commbench(n, opts, gemm=n <= cores) for n in opts.processes}
    return {"comm": comm, "mech": _mechbench() if mech else None}


def _mechbench() -> dict:
    """Every part of `mechbench`, each timed with 2 processes of its own."""
    from .mechbench import PARTS

    return {key: rec for part in PARTS
            for key, rec in _torchrun(2, "mechbench", ["--parts", part]).items()}


def fastest_pass(passes: list[dict]) -> dict:
    """Per mechanism, its record from the pass whose calls took least in all. What a
    shared machine does to a measurement only adds time (the rule `validate --rounds`
    keeps each plan's fastest round by), and on this VM one mechanism's layer moved 10x
    between passes minutes apart (TP: 28 / 40 ms forward / backward, then 2.7 / 4.6 ms,
    over what the messages cost). A record's 1- and 3-layer times at both sizes stay
    together, so their differences come from one moment."""
    def total(rec) -> float:
        if isinstance(rec, dict):
            return sum(total(v) for v in rec.values())
        return sum(rec) if isinstance(rec, list) else rec

    return {key: min((p[key] for p in passes), key=total) for key in passes[0]}


KERNEL_TABLE = "meshplan-kernel-table"  # benchmarks/bench_kernels.py


def merge_kernel_table(profile: dict, table: dict) -> dict:
    """The profile with the kernel benchmark's rows as its elementwise ops: the calibrated
    model then prices the norms, SwiGLU and the loss at our Triton kernels' measured times
    (what the runtime runs on CUDA with kernels=fused)."""
    found = table.get("format") if isinstance(table, dict) else type(table).__name__
    require(found == KERNEL_TABLE, "kernel_table",
            f"not a kernel table from benchmarks/bench_kernels.py (format {found!r})")
    section = table.get("elementwise")
    require(isinstance(section, dict) and section, "kernel_table.elementwise",
            "holds no rows (was the benchmark run with --kernels that include rmsnorm, "
            "swiglu or cross_entropy?)")
    for dtype, ops in section.items():
        for op, rows in ops.items():
            require(all(len(r) == 3 and r[0] > 0 and min(r[1:]) >= 0 for r in rows),
                    f"kernel_table.elementwise.{dtype}.{op}",
                    "rows must be [nominal bytes > 0, forward s >= 0, backward s >= 0]")
    merged = {d: dict(ops) for d, ops in profile.get("elementwise", {}).items()}
    for dtype, ops in section.items():
        merged.setdefault(dtype, {}).update(ops)
    return {**profile, "elementwise": merged}


def host_residual_s(residual_s: float, what: str,
                    say: Callable[[str], None] | None = None) -> float:
    """A fitted host time: what ran less what the tables price. Below zero the tables
    price the work above its measured time; that is said (on stderr unless `say` is
    given), and no host time is fitted, since time spent cannot be negative."""
    return _said_floor(residual_s, f"{what}: the tables price it {-residual_s * 1e3:.3f} ms "
                       "above its measured time; no host overhead fitted", say)


def backward_s(both_s: float, forward_s: float, what: str,
               say: Callable[[str], None] | None = None) -> float:
    """A backward's seconds: forward and backward timed together less the forward timed
    in turn with them. On a drifting machine the pair can come out below the forward
    alone; that is said (which op, by how much), and the backward is taken as none."""
    diff = both_s - forward_s
    return _said_floor(diff, f"{what}: forward and backward timed {-diff * 1e3:.3f} ms below "
                       "the forward alone; backward taken as 0", say)


def _said_floor(seconds: float, message: str, say: Callable[[str], None] | None) -> float:
    """`seconds`, or 0 with `message` said (on stderr unless `say`) when below zero."""
    if seconds < 0:
        (say or _stderr)(message)
    return max(seconds, 0.0)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def mechanism_overheads(prof: HardwareProfile, record: dict, say=None) -> HardwareProfile:
    """Fold mechbench's per-layer times into `prof.overheads["layer:<mechanism>"]` and
    `prof.overhead_shares`: per size measured, the layer less what the profile prices for
    it (ops, messages, the overheads fitted so far), against the layer's work (its ops
    and the plain layer's overhead); the line through the two sizes gives a share of the
    work and a fixed part, the latter as seconds of one process alone (the slowdown of
    sharing the machine is divided out; the cost model multiplies it back). The pipeline
    message latency goes into `prof.pp_message_s`, the split backward into
    `prof.split_backward`."""
    for mech, points in record.items():
        if mech in ("pp", "split_w"):
            continue
        fixed, share = _mechanism_line(prof, mech, points, say)
        prof = replace(prof, overheads={**prof.overheads, f"layer:{mech}": fixed},
                       overhead_shares={**prof.overhead_shares, f"layer:{mech}": share})
    if "pp" in record:
        prof = _pipeline_message(prof, record["pp"], say)
    if "split_w" in record:
        prof = _split_backward(prof, record["split_w"], say)
    return prof


def _mechanism_line(prof: HardwareProfile, mech: str, points: dict[str, dict],
                    say) -> tuple[list[float], list[float]]:
    """([forward, backward] fixed seconds, [forward, backward] share of the work) of one
    mechanism's residual: the line through its residuals at the smallest and the largest
    size measured (one size: all fixed)."""
    from .mechbench import plan_file

    bare = replace(prof, overheads={k: v for k, v in prof.overheads.items()
                                    if not k.startswith("layer:")}, overhead_shares={})
    sizes = []  # per size, smallest first: ([work f, work b], [residual f, residual b])
    for seq, mbs, times in sorted(((*map(int, key.split("x")), times)
                                   for key, times in points.items()),
                                  key=lambda s: s[0] * s[1]):
        pf = plan_file(mech, 1, 2, seq, mbs)
        costs, priced = _priced(prof, pf)
        moe = pf.model.is_moe
        work = [p.compute for p in _priced(bare, pf)[1].layer_phase(moe)]
        per_layer = [(t3 - t1) / 2 for t1, t3 in zip(times["1"], times["3"], strict=True)]
        sizes.append((work, [t - p.total for t, p in
                             zip(per_layer, priced.layer_phase(moe), strict=True)]))
    (w1, r1), (w2, r2) = sizes[0], sizes[-1]
    fixed, share = [], []
    for i, way in enumerate(("forward", "backward")):
        what = f"{mech} layer, {way}"
        if len(sizes) == 1:
            f, k = host_residual_s(r1[i], what, say), 0.0
        else:
            f, k = _line_through((w1[i], r1[i]), (w2[i], r2[i]), what, "the layer's work", say)
        fixed.append(f / costs.slowdown)
        share.append(k)
    return fixed, share


def _line_through(small: tuple[float, float], large: tuple[float, float], what: str,
                  against: str, say) -> tuple[float, float]:
    """(fixed seconds, share) of the line through two sizes' (work s, extra s): a share
    below 0 is said and taken as 0 (the extra does not grow with the work), then a fixed
    part below 0 likewise (time spent cannot be negative)."""
    (x1, y1), (x2, y2) = small, large
    share = _said_floor((y2 - y1) / (x2 - x1), f"{what}: {y2 * 1e3:.3f} ms extra at the larger "
                        f"size, {y1 * 1e3:.3f} ms at the smaller; taken as not growing with "
                        f"{against}", say)
    fixed = _said_floor(y1 - share * x1, f"{what}: the line through {y1 * 1e3:.3f} and "
                        f"{y2 * 1e3:.3f} ms is below 0 at no work; no fixed part fitted", say)
    return fixed, share


def _split_backward(prof: HardwareProfile, record: dict[str, list[float]],
                    say) -> HardwareProfile:
    """`split_backward`: the line through what splitting adds to a layer's backward at
    two sequence lengths, against the layer's priced backward there: [seconds per layer
    (of one process alone), fraction of the backward]."""
    from meshplan.costmodels.calibrated import CalibratedCosts
    from meshplan.loaders import load_cluster

    from .mechbench import SPLIT_LAYERS, split_plan_file

    shared = CalibratedCosts(load_cluster("cpu", gpus=2), prof).slowdown  # mechbench ran 2
    points = []
    for seq, (whole, split) in sorted(record.items(), key=lambda kv: int(kv[0])):
        _, priced = _priced(prof, split_plan_file(int(seq)))
        points.append((priced.layer_phase(False)[1].total,
                       (split - whole) / SPLIT_LAYERS / shared))
    per_layer, fraction = _line_through(*points, "split backward, a layer", "the backward",
                                        say)
    return replace(prof, split_backward=[per_layer, fraction])


def _pipeline_message(prof: HardwareProfile, record: dict[str, float],
                      say) -> HardwareProfile:
    """`pp_message_s`: a pipeline message's measured latency in a running pipeline less
    what the idle p2p fit prices for its size; `pp_late_receive_s` the same for a
    receive posted after its message was sent (a record without it: none)."""
    from .mechbench import PP_MICRO_BATCHES, pp_plan_file

    costs, priced = _priced(prof, pp_plan_file(PP_MICRO_BATCHES, 2))
    idle = costs.p2p_s(False, priced.stage_send_bytes)

    def beyond_idle(key: str, what: str) -> float:
        return _said_floor(record.get(key, idle) - idle,
                           f"{what}: {record.get(key, idle) * 1e3:.3f} ms, under the idle p2p "
                           f"fit's {idle * 1e3:.3f} ms; taken as no extra latency", say)

    return replace(prof, pp_message_s=beyond_idle("message_s", "pipeline message"),
                   pp_late_receive_s=beyond_idle("late_receive_s", "late pipeline receive"))


def _priced(prof: HardwareProfile, pf):
    """(calibrated costs, the analytical engine's costs of this plan file) under `prof`."""
    from meshplan.costmodels.calibrated import CalibratedCosts
    from meshplan.simulator.analytical import CostCache, prepare

    costs = CalibratedCosts(pf.cluster, prof)
    return costs, prepare(pf.model, pf.cluster, pf.work, pf.plan, CostCache(costs=costs))


def _single_process(opts: ProfileOptions, device, say,
                    after_sweep: Callable[[], None] = lambda: None) -> HardwareProfile:
    """GEMM, attention, the runtime's memory-bound ops, optimizer steps, bandwidth: each
    table measured `opts.sweeps` times, one whole sweep after another (`after_sweep`
    runs between), each row the median over the sweeps. A shared machine drifts over
    seconds (on this VM a table measured five times in a row moved by up to 40%), and a
    row timed once catches one moment of it."""
    import torch

    sweeps = []
    for i in range(opts.sweeps):
        say(f"compute tables, sweep {i + 1} of {opts.sweeps} ...")
        sweeps.append(_sweep(opts, device, say))
        after_sweep()
    t = {name: reduce_rows([sw[name] for sw in sweeps], keys)
         for name, keys in SWEEP_KEYS.items()}
    gemm = {d: [r[1:] for r in t["gemm"] if r[0] == d] for d in opts.dtypes}
    attention = {d: [r[1:] for r in t["attention"] if r[0] == d] for d in opts.dtypes}
    elementwise: dict[str, dict[str, list]] = {}
    for dtype, op, *row in t["elementwise"]:
        elementwise.setdefault(dtype, {}).setdefault(op, []).append(row)
    optimizer = {name: list(fit_plane(*zip(*[r[1:] for r in t["optimizer"] if r[0] == name],
                                            strict=True)))
                 for name in OPTIMIZERS}
    launch, s_per_byte = fit_line(*zip(*t["memory"], strict=True))
    host = None
    if device.type == "cuda":
        from .microbench import host_copy_rows
        copies = host_copy_rows([2**26], device)
        host = copies[0][0] / max(copies[0][1], copies[0][2])
    return HardwareProfile(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        gemm=gemm, attention=attention,
        memory_bw_bytes_per_s=1.0 / s_per_byte if s_per_byte else float("inf"),
        kernel_overhead_s=launch, collectives={}, concurrency={"1": 1.0},
        host_copy_bytes_per_s=host, elementwise=elementwise, optimizer=optimizer,
        source=f"meshplan profile, torch {torch.__version__}, {os.cpu_count()} CPUs, "
               f"tables the median of {opts.sweeps} sweeps")


OPTIMIZERS = ("adam", "sgd")
# table -> how many leading columns name the row (the rest are seconds)
SWEEP_KEYS = {"gemm": 4, "attention": 4, "elementwise": 3, "optimizer": 3, "memory": 1}


def _sweep(opts: ProfileOptions, device, say: Callable[[str], None] | None = None
           ) -> dict[str, list[list]]:
    """Every single-process table once, as flat rows in a fixed order."""
    from . import microbench as mb
    from .opbench import op_rows

    with _bar(len(opts.gemm_sizes) ** 3 * len(opts.dtypes), "GEMM") as tick:
        gemm = mb.gemm_rows(opts.gemm_sizes, opts.dtypes, device, opts.max_gemm_flops, tick)
    ops = op_rows(opts.dtypes, device, say) if device.type == "cpu" else {}
    return {
        "gemm": gemm,
        "attention": mb.attention_rows(ATTN_SEQS, ATTN_HEAD_DIMS, opts.dtypes, device,
                                       say=say),
        "elementwise": [[d, op, *row] for d, table in ops.items()
                        for op, rows in table.items() for row in rows],
        "optimizer": [[name, *row] for name in OPTIMIZERS
                      for row in mb.optimizer_rows(name, device)],
        "memory": mb.memory_rows(MEMORY_SIZES, device)}


def reduce_rows(sweeps: list[list[list]], keys: int, reduce=np.median) -> list[list]:
    """Row by row over sweeps that list the same rows in the same order: the `keys`
    leading columns, then the median (or `reduce`) of each timed column."""
    out = []
    for rows in zip(*sweeps, strict=True):
        require(all(r[:keys] == rows[0][:keys] for r in rows), "profile",
                f"sweeps measured different rows: {[r[:keys] for r in rows]}")
        out.append([*rows[0][:keys],
                    *(float(reduce([r[c] for r in rows])) for c in range(keys, len(rows[0])))])
    return out


def _shared_machine(opts: ProfileOptions, passes: list[dict[int, dict]], cores: int) -> dict:
    """Collectives and the compute slowdown with 2..N processes at once, from the passes
    of `commbench` (`_shared_pass`): each collective row the fastest over the passes
    (`fastest_pass`'s rule), each slowdown the median of the passes' ratios.

    The slowdown is what the cost model needs: how much slower a GEMM runs on a rank of
    an N-process job, all ranks busy, than on a rank alone. Both are timed inside the job,
    alternating (`commbench.concurrent_gemm_rows`). Timed instead in the profiling process
    before and after each job, "alone" came out up to 1.6x slower than "together" (a
    slowdown of 0.63 for 2 processes): a drift of the machine between the timings, not
    an effect of the other process.

    With more processes than cores the operating system shares each core among them
    (CFS gives runnable tasks equal shares), so no slowdown is recorded for those counts:
    the cost model takes the one at the core count times processes / cores
    (`calibrated._nearest`). Measured instead, 4 processes on this VM's 2 cores gave 2.04
    in one profile and 2.74 in the next, 1.8-2.9 shape to shape, while 4-process runtime
    steps ran at the fair share."""
    collectives, table, concurrency, overlap, share = {}, {}, {"1": 1.0}, {}, {}
    for n in opts.processes:
        recs = [p[n] for p in passes]
        rows = reduce_rows([r["collectives"] for r in recs], keys=2, reduce=np.min)
        collectives[str(n)] = fit_collectives(rows, n)
        table[str(n)] = rows_by_op(rows)
        overlap[str(n)] = float(np.median([r["overlap_slowdown"] for r in recs]))
        share[str(n)] = float(np.median([r["comm_core_share"] for r in recs]))
        if n <= cores:
            concurrency[str(n)] = float(np.median([concurrency_slowdown(r["gemm"])
                                                   for r in recs]))
    return {"collectives": collectives, "collective_rows": table, "concurrency": concurrency,
            "overlap_slowdown": overlap, "comm_core_share": share}


def _cores(opts: ProfileOptions, device) -> int:
    """Cores the processes share: this process's CPU affinity, or one GPU each."""
    return len(os.sched_getaffinity(0)) if device.type == "cpu" else max(opts.processes)


def peaks(p: HardwareProfile) -> dict[str, float]:
    """Best measured rates: the numbers a spec sheet would quote."""
    out = {f"gemm_{d}_flops_per_s": max(2 * m * n * k / t for m, n, k, t in rows)
           for d, rows in p.gemm.items() if rows}
    out |= {f"attention_{d}_flops_per_s": max(f / s for _, _, f, s, _ in rows)
            for d, rows in p.attention.items() if rows}
    out["memory_bw_bytes_per_s"] = p.memory_bw_bytes_per_s
    return out


def _commbench(n: int, opts: ProfileOptions, gemm: bool) -> dict:
    """The collectives, the overlap slowdown and, when `gemm`, the shared-compute GEMMs
    with n processes."""
    return _torchrun(n, "commbench", ["--sizes", ",".join(str(s) for s in opts.comm_sizes),
                                      "--device", opts.device, *([] if gemm else ["--no-gemm"])])


def _torchrun(n: int, bench: str, args: list[str]) -> dict:
    """Run `meshplan.validate.<bench>` in n processes; its rank 0's JSON. Rank 0 writes
    the record before the processes leave their group; a job that fails after that has
    measured all it was asked to, which is said, and its record is kept. On this VM a
    rank ended on SIGABRT in about one torchrun job in 40, once after its record was
    written; a job that fails before writing it is an error as before."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{bench}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", "-m", f"meshplan.validate.{bench}", str(out), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode and not out.exists():
            raise RuntimeError(f"{bench} {' '.join(args)} with {n} processes failed:\n"
                               f"{proc.stderr[-2000:]}")
        if proc.returncode:
            _stderr(f"{bench} {' '.join(args)} with {n} processes exited {proc.returncode} "
                    "after its record was written; the record is kept")
        return json.loads(out.read_text())


class _bar:
    """tqdm progress over a known number of steps (quiet when not a terminal)."""

    def __init__(self, total: int, label: str):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=label, disable=None, leave=False)

    def __enter__(self):
        return lambda: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()
