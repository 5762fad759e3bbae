"""`meshplan run`: plans from `search` run end to end; bad plan files are refused before any
process starts; checkpoints survive a killed save and reshard under another plan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meshplan.cli import main
from meshplan.core.plan import Plan
from meshplan.core.planfile import PlanFile
from meshplan.core.workload import TrainWorkload
from meshplan.loaders import load_cluster, load_model, save_plan_file

pytest.importorskip("torch")

TOL = 1e-5  # fp32 reordering only; see tests/test_runtime.py


def meshplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshplan.cli", *args], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def plan_file(path: Path, plan: str | dict, model: str = "tiny-dense", gpus: int = 2,
              optimizer: str = "adam") -> Path:
    p = Plan.from_dict(plan) if isinstance(plan, dict) else Plan.parse(plan)
    work = TrainWorkload(seq_len=64, global_batch=8, dtype="fp32", optimizer=optimizer)
    save_plan_file(str(path), PlanFile(model=load_model(model), work=work, plan=p,
                                       cluster=load_cluster("cpu", gpus=gpus)))
    return path


@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe"])
def test_search_then_run(tmp_path, model):
    plan = tmp_path / "plan.json"
    assert main(["search", "--model", model, "--cluster", "cpu", "--gpus", "4",
                 "--seq-len", "128", "--global-batch", "16", "--out", str(plan)]) == 0
    out = tmp_path / "measured.json"
    data = tmp_path / "tokens.npy"
    np.save(data, np.arange(5000) % 500)
    extra = ("--data", str(data)) if model == "tiny-dense" else ()
    r = meshplan("run", str(plan), "--steps", "4", "--warmup-steps", "1", "--out", str(out),
                 *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["plan"] == Plan.from_dict(json.loads(plan.read_text())["plan"]).resolve(4).to_dict()
    assert len(m["losses"]) == 4 and len(m["step_times_s"]) == 3
    assert m["tokens_per_s"] == pytest.approx(128 * 16 / m["step_time_s"])
    assert len(m["peak_memory_bytes_per_rank"]) == 4 and m["peak_memory_bytes"] > 0
    assert m["memory_method"].startswith("cpu:")
    assert m["predicted"]["step_time_s"] > 0


@pytest.mark.parametrize("plan, message", [
    ({"dp": 2, "tq": 2}, "unknown keys ['tq']"),
    ({"dp": 2, "tp": 2}, "= 4 but the cluster has 2 GPUs"),
    ({"dp": 2, "ep": 2, "expert_placement": [[0, 1, 2, 3, 4, 5]]}, "6 slots for 8 experts"),
    ({"dp": 2, "ep": 2, "expert_placement": [[0, 1, 2, 3, 4, 5, 6, 9]]},
     "expert ids [9] outside 0..7"),
    ({"dp": 2, "ep": 2, "expert_placement": [list(range(8)) + [0, 1]]},
     "no replicas yet"),
])
def test_bad_plan_file_is_refused_before_start(tmp_path, plan, message, capsys):
    path = tmp_path / "plan.json"
    good = plan_file(path, "dp=2", model="tiny-moe")
    data = json.loads(good.read_text())
    data["plan"] = plan
    path.write_text(json.dumps(data))
    assert main(["run", str(path), "--steps", "2", "--warmup-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_killed_save_resumes_from_last_good_and_reshards(tmp_path):
    dp2 = plan_file(tmp_path / "dp2.json", "dp=2")
    run = ("--steps", "6", "--warmup-steps", "0", "--checkpoint-every", "2")
    whole = tmp_path / "whole.json"
    r = meshplan("run", str(dp2), *run, "--checkpoint-dir", str(tmp_path / "a"),
                 "--out", str(whole))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = json.loads(whole.read_text())["losses"]

    ck = tmp_path / "b"
    r = meshplan("run", str(dp2), *run, "--checkpoint-dir", str(ck), "--kill-during-save", "4",
                 "--out", str(tmp_path / "killed.json"))
    assert r.returncode != 0
    assert sorted(p.name for p in ck.iterdir()) == ["step_2", "step_4.partial"]
    shutil.copytree(ck, tmp_path / "c")

    for plan, ckdir in [(dp2, ck), (plan_file(tmp_path / "tp2.json", "tp=2,sp=on"),
                                    tmp_path / "c")]:
        out = tmp_path / f"resumed-{plan.stem}.json"
        r = meshplan("run", str(plan), "--steps", "6", "--warmup-steps", "0", "--resume",
                     "--checkpoint-dir", str(ckdir), "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        m = json.loads(out.read_text())
        assert m["first_step"] == 2
        assert m["losses"] == pytest.approx(expected[2:], abs=TOL)


def test_gpu_plan_is_refused_without_cuda_and_multi_node_prints_commands(tmp_path, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    for gpus, expect in [(8, 2), (16, 0)]:
        path = tmp_path / f"h100-{gpus}.json"
        assert main(["search", "--model", "llama3-8b", "--cluster", "h100-sxm", "--gpus",
                     str(gpus), "--seq-len", "4096", "--global-batch", "64",
                     "--out", str(path)]) == 0
        capsys.readouterr()
        out = tmp_path / f"m{gpus}.json"
        assert main(["run", str(path), "--out", str(out), "--seq-len", "2048"]) == expect
        text = capsys.readouterr()
        if expect:
            assert "no CUDA device" in text.err
        else:
            lines = [ln for ln in text.out.splitlines() if ln.startswith("torchrun")]
            assert len(lines) == 2 and "--node-rank=1" in lines[1]
            assert "--nnodes=2" in lines[0] and "--device cuda" in lines[0]
            saved = json.loads(out.with_suffix(".plan.json").read_text())
            assert saved["workload"]["seq_len"] == 2048  # the override travels with it


def test_recording_routing_needs_one_stage_and_no_recompute(tmp_path, capsys):
    path = tmp_path / "moe.json"
    assert main(["search", "--model", "tiny-moe", "--cluster", "cpu", "--gpus", "2",
                 "--seq-len", "64", "--global-batch", "8", "--space",
                 "pp=2,recompute=none,mbs=1", "--out", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--record-routing", str(tmp_path / "t.npz")]) == 2
    assert "needs pp=1 and recompute=none (got pp=2" in capsys.readouterr().err
