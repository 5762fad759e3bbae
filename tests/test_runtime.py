"""The runtime on CPU with gloo: every parallelism matches a single-process run.

Each launch runs several plans (tests/runtime/driver.py) from the same seed and data; the
reference is the same model trained by one process. SGD with momentum is used because,
unlike Adam, it is not invariant to the scale of a gradient, so a wrong reduction divisor
(dp vs dp·cp, experts over the wrong group) changes the loss.

Tolerance: fp32 losses agree to 1e-5 absolute (~2e-6 relative at loss 6.2). Parallel runs
only reorder fp32 sums (all-reduce, reduce-scatter, TP partial sums, blockwise softmax in
ring attention), which costs a few ulps per step: observed differences are below 6e-7.
A genuine error (a gradient off by a factor, a wrong mask) moves the loss by more than
1e-3 within five steps at this learning rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

DRIVER = Path(__file__).parent / "runtime" / "driver.py"
TOL = 1e-5
STEPS, SEQ, BATCH, LR = 5, 64, 8, 0.3


def launch(tmp_path: Path, nproc: int, model: str, plans: list[str]) -> dict[str, list[float]]:
    out = tmp_path / f"{model}-{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(DRIVER), str(out), model, str(SEQ), str(BATCH),
           str(STEPS), "sgd", str(LR), *plans]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return {m: launch(tmp, 1, m, ["dp=1"])["dp=1"] for m in ("tiny-dense", "tiny-moe")}


def check(results: dict[str, list[float]], ref: list[float]) -> None:
    assert ref[0] - min(ref) > 100 * TOL, f"training must move the loss: {ref}"
    bad = {plan: max(abs(a - b) for a, b in zip(losses, ref, strict=True))
           for plan, losses in results.items()}
    assert all(d <= TOL for d in bad.values()), f"max |loss - reference| per plan: {bad}"


DENSE_2 = ["dp=2", "dp=2,zero=1", "dp=2,zero=3", "tp=2,sp=on", "tp=2,sp=off",
           "pp=2,mbs=1", "pp=2,vpp=2,mbs=1", "pp=2,mbs=1,schedule=zb,recompute=full",
           "pp=2,mbs=1,schedule=dualpipe", "cp=2",
           "cp=2,recompute=selective", "cp=2,recompute=full"]
DENSE_4 = ["dp=2,tp=2,sp=on", "dp=2,pp=2,mbs=1,zero=2", "tp=2,pp=2,sp=on,mbs=1",
           "dp=2,pp=2,vpp=2,mbs=1,zero=1", "cp=2,tp=2,sp=on", "dp=2,cp=2,zero=3,recompute=full",
           "pp=4,mbs=1,recompute=op", "pp=2,cp=2,mbs=2,schedule=gpipe", "cp=4",
           "pp=4,mbs=1,schedule=dualpipe", "dp=2,pp=2,mbs=1,schedule=dualpipe"]
MOE_4 = ["dp=4,ep=4", "dp=4,ep=2,zero=2", "dp=2,tp=2,ep=2,sp=on", "dp=2,pp=2,ep=2,mbs=1",
         "dp=2,pp=2,ep=2,mbs=1,schedule=zb", "dp=2,pp=2,ep=2,mbs=1,schedule=dualpipe",
         "dp=2,cp=2,ep=4,zero=3",
         json.dumps({"dp": 4, "ep": 2, "expert_placement": [[5, 2, 7, 0, 1, 6, 3, 4]]})]


def test_dense_two_processes(tmp_path, reference):
    check(launch(tmp_path, 2, "tiny-dense", DENSE_2), reference["tiny-dense"])


def test_dense_four_processes_two_axes(tmp_path, reference):
    check(launch(tmp_path, 4, "tiny-dense", DENSE_4), reference["tiny-dense"])


def test_moe_expert_parallel(tmp_path, reference):
    check(launch(tmp_path, 4, "tiny-moe", MOE_4), reference["tiny-moe"])
