"""The calibrated cost model, the profile fits and the validation summary (no torch)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from meshplan.api import simulate
from meshplan.core.errors import SpecError
from meshplan.core.plan import Plan
from meshplan.core.workload import TrainWorkload
from meshplan.costmodels import collectives as coll
from meshplan.costmodels.calibrated import (
    CalibratedCosts,
    HardwareProfile,
    profile_from_dict,
    profile_to_dict,
)
from meshplan.costmodels.costs import NominalCosts
from meshplan.loaders import load_cluster, load_model
from meshplan.validate.compare import Row, summary
from meshplan.validate.profile import fit_collectives, fit_line

SIZES = (16, 64, 256, 1024)


def synthetic(rate: float = 1e11, bw: float = 1e10, alpha: float = 1e-4,
              beta: float = 1e-9) -> HardwareProfile:
    """A machine with one GEMM rate, one attention rate, one bandwidth, exact α–β links."""
    gemm = [[m, n, k, 2 * m * n * k / rate] for m in SIZES for n in SIZES for k in SIZES]
    attn = [[s, 64, f, f / rate, 2.5 * f / rate] for s in (128, 1024) for f in (1e6 * s,)]
    elem = {"mlp_norm": [[b, b / bw, 2 * b / bw] for b in (1e4, 1e6, 1e8)]}
    return HardwareProfile(
        device="test", gemm={"fp32": gemm}, attention={"fp32": attn},
        memory_bw_bytes_per_s=bw, kernel_overhead_s=0.0,
        collectives={"2": {op: [alpha, beta] for op in coll.BUS_FACTOR}},
        concurrency={"1": 1.0, "2": 1.0}, elementwise={"fp32": elem})


def test_gemm_and_memory_tables_interpolate_and_extrapolate():
    costs = CalibratedCosts(load_cluster("cpu", gpus=2), synthetic())
    for m, n, k in [(64, 64, 64), (100, 300, 50), (16, 4096, 8)]:  # grid, between, beyond
        assert costs.gemm_s("fp32", m, n, k) == pytest.approx(2 * m * n * k / 1e11, rel=1e-9)
    assert costs.mem_op_s("fp32", "mlp_norm", 3e5, eager=True) == pytest.approx(3e5 / 1e10)
    assert costs.mem_op_s("fp32", "mlp_norm_bwd", 6e5, eager=True) == \
        pytest.approx(2 * 3e5 / 1e10)
    assert costs.mem_op_s("fp32", "mlp_norm", 1e9, eager=True) == pytest.approx(1e9 / 1e10)
    assert costs.attention_s("fp32", 5e8, 512, backward=True) == pytest.approx(5e8 / 1e11)


def test_collectives_use_the_fit_for_the_group_size():
    costs = CalibratedCosts(load_cluster("cpu", gpus=2), synthetic(alpha=1e-4, beta=1e-9))
    g = coll.Group(size=2, per_node=2)
    assert costs.collective_s(g, "all_reduce", 1e6) == pytest.approx(1e-4 + 1e-9 * 1e6)
    assert costs.p2p_s(False, 1e6) == pytest.approx(1e-4 + 1e-9 * 1e6)


def test_collectives_interpolate_their_measured_rows():
    """Where the profile keeps the measured rows, a collective of that group size follows
    them (linear between sizes, the smallest's time below, the last segment's line
    beyond); a line fitted over all sizes cannot follow a latency floor that ends where
    bandwidth takes over."""
    rows = [[1024, 5e-3], [65536, 5e-3], [262144, 12e-3], [1048576, 48e-3]]
    prof = replace(synthetic(alpha=1e-4, beta=1e-9),
                   collective_rows={"2": {"all_reduce": rows, "p2p": [[1024, 1e-4]]}})
    costs = CalibratedCosts(load_cluster("cpu", gpus=2), prof)
    g = coll.Group(size=2, per_node=2)
    assert costs.collective_s(g, "all_reduce", 262144) == pytest.approx(12e-3)
    assert costs.collective_s(g, "all_reduce", 655360) == pytest.approx(30e-3)
    assert costs.collective_s(g, "all_reduce", 512) == pytest.approx(5e-3)
    assert costs.collective_s(g, "all_reduce", 2097152) == pytest.approx(96e-3)
    assert costs.p2p_s(False, 1024) == pytest.approx(1e-4)
    # a last segment that falls (noise) is not carried on past the last row
    falling = replace(prof, collective_rows={"2": {"all_reduce": [[1024, 5e-3], [4096, 4e-3]]}})
    assert CalibratedCosts(load_cluster("cpu", gpus=2), falling).collective_s(
        g, "all_reduce", 65536) == pytest.approx(4e-3)
    # an op without rows, and a group size without rows, keep the fit
    assert costs.collective_s(g, "all_gather", 1e6) == pytest.approx(1e-4 + 1e-9 * 0.5e6)
    four, cpu4 = coll.Group(size=4, per_node=4), load_cluster("cpu", gpus=4)
    assert CalibratedCosts(cpu4, prof).collective_s(four, "all_reduce", 1e6) == \
        CalibratedCosts(cpu4, synthetic(alpha=1e-4, beta=1e-9)).collective_s(
            four, "all_reduce", 1e6)
    bad = profile_to_dict(prof)
    bad["collective_rows"]["2"]["all_reduce"] = [[1024, 0.0]]
    with pytest.raises(SpecError, match=r"profile\.collective_rows\.2\.all_reduce"):
        profile_from_dict(bad)


def test_a_ring_hop_takes_the_measured_shift_or_else_a_send():
    """Where the profile measured a ring shift (both directions at once), ring attention's
    hops take it; without one, and on the nominal model's full-duplex links, a send."""
    g = coll.Group(size=2, per_node=2)
    plain = CalibratedCosts(load_cluster("cpu", gpus=2), synthetic(alpha=1e-4, beta=1e-9))
    assert plain.ring_hop_s(g, 1e6) == pytest.approx(plain.p2p_s(False, 1e6))
    prof = synthetic(alpha=1e-4, beta=1e-9)
    shared = replace(prof, collectives={"2": {**prof.collectives["2"],
                                              "ring_shift": [1e-4, 2e-9]}})
    costs = CalibratedCosts(load_cluster("cpu", gpus=2), shared)
    assert costs.ring_hop_s(g, 1e6) == pytest.approx(1e-4 + 2e-9 * 1e6)
    work = TrainWorkload(seq_len=256, global_batch=8, dtype="fp32")
    model, cluster, plan = load_model("tiny-dense"), load_cluster("cpu", gpus=2), \
        Plan.parse("cp=2,mbs=4")
    slow = simulate(model, cluster, work, plan, profile=shared)
    fast = simulate(model, cluster, work, plan, profile=prof)
    assert slow.time.exposed_comm > fast.time.exposed_comm
    nominal = NominalCosts(load_cluster("h100-sxm", gpus=8))
    assert nominal.ring_hop_s(coll.Group(size=4, per_node=4), 1e6) == \
        pytest.approx(nominal.p2p_s(False, 1e6))


def test_a_machine_twice_as_slow_doubles_the_predicted_compute():
    model, work = load_model("tiny-dense"), TrainWorkload(seq_len=256, global_batch=8,
                                                          dtype="fp32")
    cluster, plan = load_cluster("cpu", gpus=1), Plan.parse("mbs=4")
    fast = simulate(model, cluster, work, plan, profile=synthetic(rate=1e11, bw=1e10))
    slow = simulate(model, cluster, work, plan, profile=synthetic(rate=5e10, bw=5e9))
    assert slow.time.compute == pytest.approx(2 * fast.time.compute, rel=1e-9)
    nominal = simulate(model, cluster, work, plan)
    assert nominal.time.compute != pytest.approx(fast.time.compute)


def test_fits_recover_alpha_beta():
    alpha, beta = 2e-4, 3e-9
    sizes = [4**i for i in range(5, 12)]
    rows = [[op, b, alpha + beta * (1 if op in ("p2p", "ring_shift")
                                    else coll.BUS_FACTOR[op](4)) * b]
            for op in ("all_reduce", "all_gather", "p2p", "ring_shift") for b in sizes]
    for a, b in fit_collectives(rows, 4).values():
        assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    assert fit_line([1, 2, 3], [5, 7, 9]) == pytest.approx((3, 2))


def test_profile_round_trip_and_bad_files():
    prof = synthetic()
    assert profile_from_dict(profile_to_dict(prof)) == prof
    with pytest.raises(SpecError, match="not a meshplan hardware profile"):
        profile_from_dict({"format": "other"})
    bad = profile_to_dict(prof)
    bad["gemm"] = {"fp32": [[16, 16, 16, 0.0]]}
    with pytest.raises(SpecError, match=r"profile\.gemm\.fp32"):
        profile_from_dict(bad)
    with pytest.raises(SpecError, match="no GEMM measurements for bf16"):
        CalibratedCosts(load_cluster("cpu", gpus=2), prof).gemm_s("bf16", 16, 16, 16)


def test_summary_errors_tau_and_fastest_gap():
    rows = [Row(name=n, predicted_step_s=p, measured_step_s=m, predicted_memory_bytes=100,
                measured_memory_bytes=mm)
            for n, p, m, mm in [("a", 1.0, 1.0, 100), ("b", 1.8, 2.0, 125), ("c", 3.3, 3.0, None)]]
    s = summary(rows)
    assert s["step_time_mape"] == pytest.approx((0 + 0.1 + 0.1) / 3)
    assert s["step_time_max_ape"] == pytest.approx(0.1)
    assert s["memory_mape"] == pytest.approx((0 + 0.2) / 2)
    assert s["kendall_tau"] == pytest.approx(1.0)
    assert s["fastest_gap"] == 0.0
    swapped = [Row(name=r.name, predicted_step_s=1 / r.predicted_step_s,
                   measured_step_s=r.measured_step_s, predicted_memory_bytes=1,
                   measured_memory_bytes=None) for r in rows]
    s = summary(swapped)
    assert s["kendall_tau"] == pytest.approx(-1.0)
    assert s["predicted_fastest"] == "c" and math.isclose(s["fastest_gap"], 2.0)
    assert "step_time_mape_des" not in s
    with_des = [Row(name=r.name, predicted_step_s=r.predicted_step_s,
                    measured_step_s=r.measured_step_s, predicted_memory_bytes=1,
                    measured_memory_bytes=None, predicted_des_step_s=r.measured_step_s * 1.05)
                for r in rows]
    s = summary(with_des)
    assert s["step_time_mape_des"] == pytest.approx(0.05)
    assert s["kendall_tau_des"] == pytest.approx(1.0)


def test_profile_then_validate_end_to_end(tmp_path, capsys):
    """The closed loop runs: profile this machine, run the short suite, report, and exit 4
    over a budget no prediction can meet (zero error)."""
    pytest.importorskip("torch")
    import json

    from meshplan.cli import main

    hw = tmp_path / "hw.json"
    assert main(["profile", "--out", str(hw), "--processes", "2", "--dtypes", "fp32",
                 "--quick"]) == 0
    prof = profile_from_dict(json.loads(hw.read_text()))
    assert prof.gemm["fp32"] and "2" in prof.collectives and prof.elementwise["fp32"]
    assert prof.scheduler_slice_s > 0 and 0 <= prof.comm_core_share["2"] <= 2
    capsys.readouterr()
    report, plot = tmp_path / "v.md", tmp_path / "v.png"
    code = main(["validate", "--profile", str(hw), "--suite", "short", "--steps", "3",
                 "--warmup-steps", "1", "--json", "--budget", "0", "--report", str(report),
                 "--plot", str(plot)])
    out = json.loads(capsys.readouterr().out)
    assert code == 4
    assert len(out["plans"]) == 5 and out["step_time_mape"] > 0
    assert {"step_time_mape", "memory_mape", "kendall_tau"} <= set(out)
    assert report.read_text().startswith("# meshplan validate") and plot.stat().st_size > 0


def test_mechanism_overhead_is_the_layer_time_the_profile_does_not_price():
    from meshplan.simulator.analytical import CostCache, prepare
    from meshplan.validate.mechbench import plan_file
    from meshplan.validate.profile import mechanism_overheads

    prof = synthetic()
    pf = plan_file("tp", 1, 2)
    f, b = prepare(pf.model, pf.cluster, pf.work, pf.plan,
                   CostCache(costs=CalibratedCosts(pf.cluster, prof))).layer_phase(False)
    extra = (3e-3, 5e-3)  # what DTensor adds per layer, forward and backward
    record = {"tp": {"16x1": {"1": [0.01, 0.02], "3": [0.01 + 2 * (f.total + extra[0]),
                                                      0.02 + 2 * (b.total + extra[1])]}}}
    fitted = mechanism_overheads(prof, record)
    assert fitted.overheads["layer:tp"] == pytest.approx(extra, rel=1e-6)
    assert fitted.overhead_shares["layer:tp"] == [0.0, 0.0]  # one size: all of it fixed

    model, work = load_model("tiny-dense"), TrainWorkload(seq_len=256, global_batch=8,
                                                          dtype="fp32")
    cluster, plan = load_cluster("cpu", gpus=2), Plan.parse("tp=2,sp=on,mbs=4")
    before = simulate(model, cluster, work, plan, profile=prof)
    after = simulate(model, cluster, work, plan, profile=fitted)
    layers_times_mbs = model.n_layers * 2  # 8 sequences in micro-batches of 4
    assert after.step_time_s - before.step_time_s == pytest.approx(
        layers_times_mbs * sum(extra), rel=1e-6)
    dp = Plan.parse("dp=2,mbs=4")  # a plan without TP does not pay it
    assert simulate(model, cluster, work, dp, profile=fitted).step_time_s == \
        pytest.approx(simulate(model, cluster, work, dp, profile=prof).step_time_s)


def test_a_small_group_in_a_crowded_job_slows_like_its_compute():
    prof = replace_concurrency(synthetic(alpha=1e-4, beta=0.0), {"1": 1.0, "2": 1.0, "4": 2.0})
    g = coll.Group(size=2, per_node=4)
    alone = CalibratedCosts(load_cluster("cpu", gpus=2), prof).collective_s(g, "all_reduce", 8)
    crowded = CalibratedCosts(load_cluster("cpu", gpus=4), prof).collective_s(g, "all_reduce", 8)
    assert alone == pytest.approx(1e-4)
    assert crowded == pytest.approx(2e-4)  # 4 processes on the machine, measured with 2


def replace_concurrency(prof: HardwareProfile, table: dict[str, float]) -> HardwareProfile:
    from dataclasses import replace
    return replace(prof, concurrency=table)


def test_more_processes_than_cores_share_them_fairly(monkeypatch):
    """The profile records the shared-machine slowdown up to the core count only; past
    it the cost model takes the fair share: 4 processes on 2 cores, each slowed 1.1 by
    the other core's traffic, run 2 × 1.1 slower than one alone."""
    from meshplan.validate import profile as prof_mod

    def commbench(n: int) -> dict:
        return {"collectives": [["all_reduce", 1024, 1e-4], ["all_reduce", 4096, 2e-4]],
                "gemm": [[64, 64, 64, 2.2 if n == 2 else 9.0, 2.0],  # [m, n, k, together,
                         [128, 64, 64, 1.0, 1.0], [64, 128, 64, 3.3, 3.0]],  # alone]
                "overlap_slowdown": 0.2, "comm_core_share": 0.6}

    shared = prof_mod._shared_machine(prof_mod.ProfileOptions(processes=(2, 4)),
                                      [{2: commbench(2), 4: commbench(4)}], cores=2)
    assert shared["concurrency"] == {"1": 1.0, "2": pytest.approx(1.1)}
    assert set(shared["collectives"]) == {"2", "4"}
    prof = replace_concurrency(synthetic(), shared["concurrency"])
    assert CalibratedCosts(load_cluster("cpu", gpus=4), prof).slowdown == pytest.approx(2.2)


def test_time_slicing_comes_with_more_processes_than_cores():
    """The slice and the communication's core share reach the engine only where the
    processes outnumber the cores (2 measured: a 4-process job); the share is the one
    measured with as many processes as cores, where communication did not have to share
    them. A negative share is refused, naming the field."""
    from meshplan.costmodels.costs import TimeSlicing

    prof = replace(synthetic(), scheduler_slice_s=0.004,
                   comm_core_share={"2": 0.6, "4": 0.45})
    four = CalibratedCosts(load_cluster("cpu", gpus=4), prof)
    assert four.time_slicing() == TimeSlicing(slice_s=0.004, comm_core_share=0.6)
    assert CalibratedCosts(load_cluster("cpu", gpus=2), prof).time_slicing() is None
    unmeasured = replace(prof, scheduler_slice_s=None)
    assert CalibratedCosts(load_cluster("cpu", gpus=4), unmeasured).time_slicing() is None
    bad = {**profile_to_dict(prof), "comm_core_share": {"2": -0.1}}
    with pytest.raises(SpecError, match="profile.comm_core_share.2"):
        profile_from_dict(bad)


def test_multi_process_benchmarks_keep_their_fastest_pass():
    """Collective rows and mechanism records come from the fastest of the passes, a
    mechanism's 1- and 3-layer times from one pass together; ratios take the median."""
    from meshplan.validate import profile as prof_mod

    def comm(t: float, overlap: float) -> dict:
        return {"collectives": [["all_reduce", 1024, t], ["all_reduce", 4096, 2 * t]],
                "gemm": [], "overlap_slowdown": overlap, "comm_core_share": 2 * overlap}

    passes = [{2: comm(5e-4, 0.1)}, {2: comm(1e-4, 0.3)}, {2: comm(9e-4, 0.2)}]
    opts = prof_mod.ProfileOptions(processes=(2,))
    shared = prof_mod._shared_machine(opts, passes, cores=2)
    assert shared["collectives"]["2"] == prof_mod.fit_collectives(
        [["all_reduce", 1024, 1e-4], ["all_reduce", 4096, 2e-4]], 2)
    assert shared["overlap_slowdown"] == {"2": pytest.approx(0.2)}
    assert shared["comm_core_share"] == {"2": pytest.approx(0.4)}

    calm = {"tp": {"1": [0.01, 0.02], "3": [0.03, 0.05]}, "pp": {"message_s": 2e-3}}
    busy = {"tp": {"1": [0.005, 0.01], "3": [0.09, 0.2]}, "pp": {"message_s": 1e-3}}
    assert prof_mod.fastest_pass([busy, calm]) == {"tp": calm["tp"], "pp": busy["pp"]}


def test_a_benchmark_failing_after_its_record_keeps_it_and_says_so(monkeypatch, capsys):
    """A torchrun job that exits non-zero after rank 0 wrote its record (a rank aborting in
    gloo's teardown) keeps the record and says so; without a record it is an error."""
    import json
    import subprocess
    from types import SimpleNamespace

    from meshplan.validate import profile as prof_mod

    def job(writes: bool):
        def run(cmd, **kw):
            if writes:
                with open(cmd[cmd.index("-m", 3) + 2], "w") as f:
                    json.dump({"moe": 1}, f)
            return SimpleNamespace(returncode=-6, stderr="Signal 6 (SIGABRT)")
        return run

    monkeypatch.setattr(subprocess, "run", job(True))
    assert prof_mod._torchrun(2, "mechbench", ["--parts", "moe"]) == {"moe": 1}
    assert "exited -6 after its record was written" in capsys.readouterr().err
    monkeypatch.setattr(subprocess, "run", job(False))
    with pytest.raises(RuntimeError, match="SIGABRT"):
        prof_mod._torchrun(2, "mechbench", ["--parts", "moe"])


def test_each_mechanism_is_timed_in_fresh_processes(monkeypatch):
    """A process that has timed other mechanisms times a layer slower, so the profile
    starts one mechbench run per part and merges their records; an unknown part is
    refused by name before anything runs."""
    from meshplan.validate import mechbench
    from meshplan.validate import profile as prof_mod

    runs = []

    def fake(n, bench, args):
        runs.append((n, bench, tuple(args)))
        return {args[-1]: {"ran": len(runs)}}

    monkeypatch.setattr(prof_mod, "_torchrun", fake)
    record = prof_mod._mechbench()
    assert runs == [(2, "mechbench", ("--parts", p)) for p in mechbench.PARTS]
    assert list(record) == list(mechbench.PARTS)
    assert {"moe", "ep", "pp", "split_w"} <= set(record)
    with pytest.raises(SystemExit):
        mechbench.main(["out.json", "--parts", "moe,nope"])


def test_a_message_counts_from_its_send_to_a_receive_that_was_waiting():
    from meshplan.validate.mechbench import late_receive_waits, message_latencies

    rank0 = [("F", 0, 0, 0.0, 1.0), ("SF", 0, 0, 1.0, 1.1), ("F", 0, 1, 1.1, 2.0),
             ("SF", 0, 1, 2.0, 2.1), ("RB", 0, 0, 2.1, 5.0)]
    rank1 = [("RF", 1, 0, 0.0, 1.5), ("F", 1, 0, 1.5, 2.5), ("B", 1, 0, 2.5, 4.0),
             ("SB", 1, 0, 4.0, 4.1), ("RF", 1, 1, 4.1, 4.2)]
    # activation 0: waited for since 0.0, sent at 1.0, in at 1.5; activation 1 was sent at
    # 2.0 while its receiver computed (not a latency); the gradient: sent 4.0, in at 5.0
    assert message_latencies([rank0, rank1]) == pytest.approx([0.5, 1.0])
    # ... and activation 1's receive, posted at 4.1 after its send at 2.0, took 0.1
    assert late_receive_waits([rank0, rank1]) == pytest.approx([0.1])


def test_a_mechanism_residual_is_a_fixed_part_and_a_share_of_the_layer_work():
    """Timed at two sizes, what a mechanism adds beyond the priced layer splits into a
    fixed part and a share of the layer's work (its ops and the plain layer's overhead),
    and the fitted profile prices the same layer at a third size on that line."""
    from meshplan.simulator.analytical import CostCache, prepare
    from meshplan.validate.mechbench import plan_file
    from meshplan.validate.profile import mechanism_overheads

    prof = synthetic()
    fixed, share = (2e-3, 1e-3), (0.25, 0.5)

    def layer(costs_prof, seq, mbs):
        pf = plan_file("fsdp", 1, 2, seq, mbs)
        costs = CalibratedCosts(pf.cluster, costs_prof)
        return prepare(pf.model, pf.cluster, pf.work, pf.plan,
                       CostCache(costs=costs)).layer_phase(False), costs.slowdown

    def record(seq, mbs):
        (f, b), sd = layer(prof, seq, mbs)
        per = [p.total + fixed[i] * sd + share[i] * p.compute for i, p in enumerate((f, b))]
        return {"1": [0.01, 0.02], "3": [0.01 + 2 * per[0], 0.02 + 2 * per[1]]}

    fitted = mechanism_overheads(prof, {"fsdp": {"16x1": record(16, 1),
                                                 "128x4": record(128, 4)}})
    assert fitted.overheads["layer:fsdp"] == pytest.approx(fixed, rel=1e-6)
    assert fitted.overhead_shares["layer:fsdp"] == pytest.approx(share, rel=1e-6)
    (f0, b0), sd = layer(prof, 256, 2)
    (f1, b1), _ = layer(fitted, 256, 2)
    assert f1.total - f0.total == pytest.approx(fixed[0] * sd + share[0] * f0.compute)
    assert b1.total - b0.total == pytest.approx(fixed[1] * sd + share[1] * b0.compute)

    shrinking = {"fsdp": {"16x1": record(128, 4), "128x4": record(16, 1)}}
    said: list[str] = []
    mechanism_overheads(prof, shrinking, say=said.append)  # more at the smaller size
    assert any("taken as not growing" in m for m in said)


def test_the_split_backward_is_a_fixed_part_and_a_share_of_the_backward():
    """mechbench times a 2-layer chunk's backward whole and split at two lengths; the
    profile fits the line through the per-layer extras against the priced backward, and
    only the schedules that split (ZB-H1, DualPipe) pay it, in their weight pass."""
    from meshplan.simulator.analytical import CostCache, prepare
    from meshplan.validate.mechbench import SPLIT_LAYERS, SPLIT_SEQS, split_plan_file
    from meshplan.validate.profile import mechanism_overheads

    prof = synthetic()
    per_layer, fraction = 1e-3, 0.3
    record = {}
    for seq in SPLIT_SEQS:
        pf = split_plan_file(seq)
        cm = prepare(pf.model, pf.cluster, pf.work, pf.plan,
                     CostCache(costs=CalibratedCosts(pf.cluster, prof)))
        whole = SPLIT_LAYERS * cm.layer_phase(False)[1].total
        record[str(seq)] = [whole, whole + SPLIT_LAYERS * (per_layer + fraction * whole / 2)]
    fitted = mechanism_overheads(prof, {"split_w": record})
    assert fitted.split_backward == pytest.approx([per_layer, fraction], rel=1e-6)

    model, work = load_model("tiny-dense"), TrainWorkload(seq_len=256, global_batch=8,
                                                          dtype="fp32")
    cluster = load_cluster("cpu", gpus=2)

    def costs(p: HardwareProfile, plan: str):
        return prepare(model, cluster, work, Plan.parse(plan),
                       CostCache(costs=CalibratedCosts(cluster, p)))

    for plan in ("pp=2,mbs=2,schedule=zb", "pp=2,mbs=2,schedule=dualpipe"):
        before, after = costs(prof, plan), costs(fitted, plan)
        b = before.layer_parts(False).bwd
        assert after.layer_parts(False).bwd == pytest.approx(b + per_layer + fraction * b)
        assert after.block_wgrad_s(0) - before.block_wgrad_s(0) == pytest.approx(
            2 * (per_layer + fraction * b))  # 2 layers a block, all of it in W
        assert simulate(model, cluster, work, Plan.parse(plan), profile=fitted).step_time_s > \
            simulate(model, cluster, work, Plan.parse(plan), profile=prof).step_time_s
    plain = "pp=2,mbs=2"
    assert costs(fitted, plain).layer_parts(False) == costs(prof, plain).layer_parts(False)
    with pytest.raises(SpecError, match="split_backward"):
        profile_from_dict(profile_to_dict(prof) | {"split_backward": [1e-3]})


def test_the_pipeline_message_latency_is_what_the_idle_fit_misses():
    from dataclasses import replace

    from meshplan.validate.mechbench import PP_MICRO_BATCHES, pp_plan_file
    from meshplan.validate.profile import mechanism_overheads

    prof = synthetic(alpha=1e-4, beta=1e-9)
    pf = pp_plan_file(PP_MICRO_BATCHES, 2)
    act_bytes = pf.plan.mbs * pf.work.seq_len * pf.model.hidden_size * 4  # fp32
    idle = CalibratedCosts(pf.cluster, prof).p2p_s(False, act_bytes)
    fitted = mechanism_overheads(prof, {"pp": {"message_s": idle + 2e-3,
                                               "late_receive_s": idle + 5e-3}})
    assert fitted.pp_message_s == pytest.approx(2e-3)
    assert fitted.pp_late_receive_s == pytest.approx(5e-3)
    cluster = load_cluster("cpu", gpus=2)
    busy, calm = CalibratedCosts(cluster, fitted), CalibratedCosts(cluster, prof)
    assert busy.stage_send_s(False, 1e6) == pytest.approx(calm.p2p_s(False, 1e6) + 2e-3)
    assert (busy.late_receive_s(), calm.late_receive_s()) == pytest.approx((5e-3, 0.0))
    said = []
    quick = mechanism_overheads(prof, {"pp": {"message_s": idle / 2}}, say=said.append)
    assert quick.pp_message_s == 0.0 and "pipeline message" in said[0]
    assert quick.pp_late_receive_s == 0.0  # an older record without it
    for key in ("pp_message_s", "pp_late_receive_s"):
        with pytest.raises(SpecError, match=key):
            profile_from_dict(profile_to_dict(replace(prof, **{key: -1e-3})))


def test_each_table_row_is_the_median_of_the_sweeps():
    from meshplan.validate.profile import reduce_rows

    sweeps = [[["fp32", 64, 64, 64, 1.0], ["fp32", 128, 64, 64, 2.0]],
              [["fp32", 64, 64, 64, 9.0], ["fp32", 128, 64, 64, 2.2]],
              [["fp32", 64, 64, 64, 1.2], ["fp32", 128, 64, 64, 1.8]]]
    assert reduce_rows(sweeps, keys=4) == [["fp32", 64, 64, 64, 1.2],
                                           ["fp32", 128, 64, 64, 2.0]]
    two_timed = [[["mlp_norm", 1024, 1.0, 5.0]], [["mlp_norm", 1024, 3.0, 1.0]],
                 [["mlp_norm", 1024, 2.0, 2.0]]]
    assert reduce_rows(two_timed, keys=2) == [["mlp_norm", 1024, 2.0, 2.0]]
    with pytest.raises(SpecError, match="sweeps measured different rows"):
        reduce_rows([[["fp32", 64, 1.0]], [["fp32", 32, 1.0]]], keys=2)


def test_the_in_situ_factor_scales_ops_but_not_host_time_or_messages():
    from dataclasses import replace

    base = replace(synthetic(), overheads={"layer": [1e-3, 2e-3]})
    slow = replace(base, in_situ_factor=1.25)
    cluster = load_cluster("cpu", gpus=2)
    a, b = CalibratedCosts(cluster, base), CalibratedCosts(cluster, slow)
    assert b.gemm_s("fp32", 256, 256, 256) == pytest.approx(1.25 * a.gemm_s("fp32", 256, 256, 256))
    assert b.attention_s("fp32", 1e9, 512) == pytest.approx(1.25 * a.attention_s("fp32", 1e9, 512))
    assert b.memory_s(1e8) == pytest.approx(1.25 * a.memory_s(1e8))
    assert b.mem_op_s("fp32", "mlp_norm", 1e6, True) == pytest.approx(
        1.25 * a.mem_op_s("fp32", "mlp_norm", 1e6, True))
    assert b.overhead_s("layer", True) == a.overhead_s("layer", True)
    g = coll.Group(size=2, per_node=2)
    assert b.collective_s(g, "all_reduce", 1e6) == a.collective_s(g, "all_reduce", 1e6)
    bad = profile_to_dict(slow) | {"in_situ_factor": 0.0}
    with pytest.raises(SpecError, match="in_situ_factor"):
        profile_from_dict(bad)


def test_steal_adjusted_errors_sit_beside_the_raw_ones():
    rows = [Row(name="a", predicted_step_s=1.0, measured_step_s=2.0, predicted_memory_bytes=1,
                measured_memory_bytes=None, measured_steal=0.5),
            Row(name="b", predicted_step_s=1.0, measured_step_s=1.0, predicted_memory_bytes=1,
                measured_memory_bytes=None, measured_steal=0.0)]
    s = summary(rows)
    assert s["step_time_mape"] == pytest.approx(0.25)  # raw: -50% and 0%
    assert s["host_steal_mean"] == pytest.approx(0.25)
    assert s["step_time_mape_unstolen"] == pytest.approx(0.0)  # 2 s, half of it stolen
    calm = [Row(name="c", predicted_step_s=1.0, measured_step_s=1.0, predicted_memory_bytes=1,
                measured_memory_bytes=None)]
    assert "host_steal_mean" not in summary(calm)


def test_a_negative_host_residual_is_said_not_silently_floored():
    from meshplan.validate.profile import host_residual_s

    said = []
    assert host_residual_s(2e-3, "tp layer, forward", said.append) == 2e-3
    assert said == []
    assert host_residual_s(-1.5e-3, "plain layer, backward", said.append) == 0.0
    assert said == ["plain layer, backward: the tables price it 1.500 ms above its measured "
                    "time; no host overhead fitted"]
    from meshplan.validate.profile import backward_s

    assert backward_s(5e-3, 2e-3, "rope", said.append) == pytest.approx(3e-3)
    assert backward_s(1.8e-3, 2e-3, "attention (fp32, seq 64, head dim 32)", said.append) == 0
    assert said[-1] == ("attention (fp32, seq 64, head dim 32): forward and backward timed "
                        "0.200 ms below the forward alone; backward taken as 0")


def test_rounds_keep_each_plan_s_fastest_run_and_cases_are_picked_by_name():
    from meshplan.validate.suite import CPU_SUITE, fastest_run, select

    runs = [{"step_time_s": t, "host_steal_fraction": s} for t, s in
            ((0.5, 0.3), (0.3, 0.0), (0.35, 0.1))]
    kept = fastest_run(runs)
    assert kept["step_time_s"] == 0.3 and kept["host_steal_fraction"] == 0.0
    assert kept["round_step_times_s"] == [0.5, 0.3, 0.35]
    assert [c.name for c in select(CPU_SUITE, "cp2, dp2")] == ["dp2", "cp2"]
    assert select(CPU_SUITE, None) == CPU_SUITE
    with pytest.raises(SpecError, match="cases: dp3 not in the suite"):
        select(CPU_SUITE, "dp2,dp3")


def test_the_overlap_suite_pairs_each_dp_plan_with_itself_without_overlap():
    from meshplan.loaders import load_cluster
    from meshplan.validate.suite import OVERLAP_SUITE, SUITES, plan_file

    names = {c.name for c in OVERLAP_SUITE}
    for c in OVERLAP_SUITE:
        if "dp=" in c.plan and "pp=" not in c.plan and "ep=" not in c.plan:
            assert c.name.endswith("-no-overlap") or f"{c.name}-no-overlap" in names
    assert SUITES["overlap"] is OVERLAP_SUITE
    assert {"dp2-cp2-b1-no-overlap", "moe-ep2-b1-no-overlap", "fsdp2-no-overlap"} <= names
    pf = plan_file(OVERLAP_SUITE[0], load_cluster("cpu"), None, "fp32")
    assert pf.plan.bucket_mb == 1 and pf.predicted["des_step_time_s"] > 0


def test_overlap_savings_compare_each_plan_with_its_twin_without_overlap():
    from meshplan.validate.compare import Row, overlap_savings, summary
    from meshplan.validate.report import markdown

    def row(name, pred, des, meas):
        return Row(name=name, predicted_step_s=pred, predicted_des_step_s=des,
                   measured_step_s=meas, predicted_memory_bytes=1.0,
                   measured_memory_bytes=1.0)

    rows = [row("a", 0.20, 0.22, 0.21), row("a-no-overlap", 0.25, 0.25, 0.24),
            row("b", 0.30, 0.30, 0.30)]
    (saved,) = overlap_savings(rows)
    assert saved.name == "a" and saved.step_s == 0.21
    assert saved.measured_s == pytest.approx(0.03)
    assert saved.predicted_s == pytest.approx(0.05)
    assert saved.predicted_des_s == pytest.approx(0.03)
    s = summary(rows)
    assert s["overlap_saving_mae"] == pytest.approx(0.02 / 0.21)
    assert s["overlap_saving_mae_des"] == pytest.approx(0.0, abs=1e-12)
    text = markdown(rows, ["p"] * 3, s, "t")
    assert "| a | 30.0 | 50.0 | 30.0 |" in text and "event engine 0.0%" in text
    assert "overlap_saving_mae" not in summary(rows[2:])


def test_relinking_a_profile_remeasures_only_its_links(monkeypatch):
    """`meshplan profile --links-only BASE`: the collectives and the slowdown beside
    them come from the new passes; every compute table, overhead and the shared-compute
    slowdown stay the base's."""
    from meshplan.validate import profile as prof_mod

    calls = []

    def commbench(n: int, opts, gemm: bool) -> dict:
        calls.append((n, gemm))
        return {"collectives": [["all_reduce", 1024, 1e-3], ["all_reduce", 4096, 4e-3]],
                "gemm": [], "overlap_slowdown": 0.05, "comm_core_share": 0.1}

    monkeypatch.setattr(prof_mod, "_commbench", commbench)
    base = profile_to_dict(synthetic())
    out = prof_mod.relink(base, prof_mod.ProfileOptions(processes=(2,), sweeps=2),
                          say=lambda _m: None)
    assert calls == [(2, False), (2, False)]
    assert out["collectives"]["2"] == prof_mod.fit_collectives(
        [["all_reduce", 1024, 1e-3], ["all_reduce", 4096, 4e-3]], 2)
    assert out["overlap_slowdown"] == {"2": pytest.approx(0.05)}
    assert out["comm_core_share"] == {"2": pytest.approx(0.1)}
    assert out["collective_rows"]["2"] == {"all_reduce": [[1024, 1e-3], [4096, 4e-3]]}
    kept = {k for k in base
            if k not in ("collectives", "collective_rows", "overlap_slowdown", "comm_core_share",
                         "source")}
    assert {k: out[k] for k in kept} == {k: base[k] for k in kept}
    assert "re-measured" in out["source"]


def test_links_only_from_another_device_is_refused(tmp_path, capsys):
    pytest.importorskip("torch")
    import json

    from meshplan.cli import main

    base = tmp_path / "gpu.json"
    base.write_text(json.dumps(profile_to_dict(synthetic()) | {"device": "cuda"}))
    rc = main(["profile", "--device", "cpu", "--links-only", str(base), "--out",
               str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1
    assert "links_only" in err and "'cuda'" in err and "'cpu'" in err
