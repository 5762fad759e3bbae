"""Each Triton kernel and its gradients against its torch reference, over shapes and
dtypes; on the CPU under Triton's interpreter (conftest sets TRITON_INTERPRET=1), on
CUDA when there is one.

Tolerances: the reference runs in fp32 on the same (already rounded) inputs, and the
kernels accumulate in fp32, so they differ by the kernel's roundings to the output dtype
only: at most half an ulp each, 2^-8 relative for bfloat16 (8 significant bits) and 2^-11
for float16. `rtol` allows two roundings (RMSNorm and SwiGLU round an intermediate, as the
eager code does). `atol`, scaled by the largest reference value, covers outputs that are
near zero because their terms cancel, where a rounding of a term is large against the
result. fp32 differs only by summation order, so its 1e-5 catches any error of a kernel's
arithmetic (a 1% slip fails it at once); the 16-bit cases check the dtype handling: what
is loaded, accumulated and rounded where. (A per-element bound cannot see a 1% error in
bfloat16, 2.5 ulps; and Triton 3.9's interpreter truncates fp32 to bfloat16 instead of
rounding to nearest, so a mean bound would measure the interpreter, not the kernel.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from meshplan.kernels import cross_entropy as ce  # noqa: E402
from meshplan.kernels import grouped_gemm as gg  # noqa: E402
from meshplan.kernels import permute as pm  # noqa: E402
from meshplan.kernels.launch import can_run  # noqa: E402
from meshplan.kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402
from meshplan.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got, want = got.detach().float(), want.detach().float()
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * scale,
                               msg=lambda m: f"{what}: {m}")


def leaf(*shape, dtype, scale=1.0, offset=0.0):
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale + offset
    return t.to(dtype).requires_grad_()


def as_ref(*tensors):
    """fp32 copies of the (rounded) inputs, as leaves of the reference graph."""
    return [t.detach().float().requires_grad_() for t in tensors]


def test_kernels_can_run_here():
    x = torch.ones(2, device=DEVICE)
    assert can_run(x), "the tests need CUDA or TRITON_INTERPRET=1"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (37, 100), (4, 3, 256)])
def test_rmsnorm_matches_reference(dtype, shape):
    torch.manual_seed(0)
    x, w = leaf(*shape, dtype=dtype), leaf(shape[-1], dtype=dtype, scale=0.1, offset=1.0)
    y = rmsnorm(x, w, 1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr = as_ref(x, w)
    yr = rmsnorm_reference(xr, wr, 1e-5)
    yr.backward(g.float())
    assert y.dtype == dtype and y.shape == x.shape
    close(y, yr, dtype, "y")
    close(x.grad, xr.grad, dtype, "dx")
    close(w.grad, wr.grad, dtype, "dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 300), (2, 3, 1024), (7,)])
def test_swiglu_matches_reference(dtype, shape):
    torch.manual_seed(1)
    a, b = leaf(*shape, dtype=dtype, scale=3.0), leaf(*shape, dtype=dtype)
    y = swiglu(a, b)
    g = torch.randn_like(y)
    y.backward(g)
    ar, br = as_ref(a, b)
    yr = swiglu_reference(ar, br)
    yr.backward(g.float())
    close(y, yr, dtype, "y")
    close(a.grad, ar.grad, dtype, "da")
    close(b.grad, br.grad, dtype, "db")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(9, 5000), (3, 17), (16, 8192 + 3)])
def test_cross_entropy_matches_reference(dtype, rows, vocab):
    torch.manual_seed(2)
    logits = leaf(rows, vocab, dtype=dtype, scale=3.0)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[rows // 2] = ce.IGNORE_INDEX  # ignored rows add nothing and are not counted
    loss = ce.cross_entropy(logits, labels)
    (3.0 * loss).backward()
    (lr,) = as_ref(logits)
    ref = ce.cross_entropy_reference(lr, labels)
    (3.0 * ref).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # fp32 math on both sides
    close(logits.grad, lr.grad, dtype, "dlogits")


def test_cross_entropy_inplace_backward_reuses_the_logits():
    torch.manual_seed(3)
    logits = leaf(6, 300, dtype=torch.bfloat16)
    labels = torch.randint(0, 300, (6,), device=DEVICE)
    scaled = logits * 1  # a non-leaf, as the model's output is
    ce.cross_entropy(scaled, labels, inplace_backward=True).backward()
    (lr,) = as_ref(logits)
    ce.cross_entropy_reference(lr, labels).backward()
    close(logits.grad, lr.grad, torch.bfloat16, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,vocab,chunk", [(20, 64, 1000, 7), (33, 32, 4099, 64)])
def test_linear_cross_entropy_matches_reference(dtype, rows, hidden, vocab, chunk):
    torch.manual_seed(4)
    h, w = leaf(rows, hidden, dtype=dtype), leaf(vocab, hidden, dtype=dtype, scale=0.1)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[0] = ce.IGNORE_INDEX
    loss = ce.linear_cross_entropy(h, w, labels, chunk_rows=chunk)
    (2.0 * loss).backward()
    hr, wr = as_ref(h, w)
    ref = ce.linear_cross_entropy_reference(hr, wr, labels)
    (2.0 * ref).backward()
    # the logits GEMM runs in the input dtype, so the loss carries its rounding
    torch.testing.assert_close(loss, ref, rtol=RTOL[dtype], atol=RTOL[dtype])
    close(h.grad, hr.grad, dtype, "dh")
    close(w.grad, wr.grad, dtype, "dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,experts,top_k", [(11, 48, 5, 2), (64, 130, 8, 1),
                                                         (5, 2048, 3, 3)])
def test_permute_unpermute_match_reference(dtype, tokens, hidden, experts, top_k):
    torch.manual_seed(5)
    x = leaf(tokens, hidden, dtype=dtype)
    weights = torch.rand(tokens, top_k, device=DEVICE).to(dtype).requires_grad_()
    ids = torch.randint(0, experts, (tokens, top_k), device=DEVICE)
    dest, counts = pm.routing_order(ids, experts)
    rows = pm.permute(x, dest, top_k)
    out = pm.unpermute(rows * 1.5, dest, weights)
    g = torch.randn_like(out)
    out.backward(g)
    xr, wr = as_ref(x, weights)
    rows_r = pm.permute_reference(xr, dest, top_k)
    out_r = pm.unpermute_reference(rows_r * 1.5, dest, wr)
    out_r.backward(g.float())
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=experts).tolist()
    sorted_ids = ids.flatten()[torch.argsort(dest)]
    assert torch.all(sorted_ids[1:] >= sorted_ids[:-1]), "rows are not expert-contiguous"
    torch.testing.assert_close(rows.float(), rows_r, rtol=0, atol=0)  # a copy
    close(out, out_r, dtype, "out")
    close(x.grad, xr.grad, dtype, "dx")
    close(weights.grad, wr.grad, dtype, "dweights")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts,n,k", [([5, 0, 40, 3, 33], 70, 40), ([64, 64], 32, 96),
                                        ([0, 0, 1], 16, 16), ([130], 48, 24)])
def test_grouped_mm_matches_reference(dtype, counts, n, k):
    torch.manual_seed(6)
    x = leaf(sum(counts), k, dtype=dtype)
    w = leaf(len(counts), n, k, dtype=dtype, scale=0.2)
    out = gg.grouped_mm(x, w, counts)
    g = torch.randn_like(out)
    out.backward(g)
    xr, wr = as_ref(x, w)
    out_r = gg.grouped_mm_reference(xr, wr, counts)
    out_r.backward(g.float())
    close(out, out_r, dtype, "out")
    close(x.grad, xr.grad, dtype, "dx")
    close(w.grad, wr.grad, dtype, "dw")  # an expert with no rows gets a zero gradient


@pytest.mark.parametrize("call,field", [
    (lambda: rmsnorm(torch.ones(2, 4), torch.ones(5), 1e-5), "rmsnorm.weight"),
    (lambda: swiglu(torch.ones(2, 4), torch.ones(2, 5)), "swiglu.b"),
    (lambda: ce.cross_entropy(torch.ones(3, 4), torch.zeros(2, dtype=torch.long)),
     "cross_entropy.labels"),
    (lambda: pm.permute(torch.ones(3, 4), torch.arange(5), 2), "permute.dest"),
    (lambda: gg.grouped_mm(torch.ones(5, 4), torch.ones(2, 3, 4), [2, 2]),
     "grouped_mm.counts"),
    (lambda: gg.grouped_mm(torch.ones(5, 4), torch.ones(2, 3, 6), [2, 3]), "grouped_mm.w"),
])
def test_wrappers_name_the_bad_argument(call, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        call()


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_model_with_kernels_trains_like_the_eager_model(name):
    """The runtime's model built with `fused` (norms, SwiGLU, MoE permute and grouped GEMMs,
    the loss) gives the eager model's loss and gradients (fp32: summation order only)."""
    from meshplan.loaders import load_model
    from meshplan.runtime.model import Transformer, init_weights
    from meshplan.runtime.train import fused_loss_fn, loss_fn

    spec = load_model(name)
    tokens = torch.randint(0, spec.vocab_size, (1, 9), device=DEVICE)  # few: interpreted
    positions = torch.arange(8, device=DEVICE)
    grads = []
    for fused in (False, True):
        model = Transformer(spec, fused=fused)
        init_weights(model, 0)
        model.to(DEVICE)
        logits = model(tokens[:, :-1], positions)
        loss = (fused_loss_fn if fused else loss_fn)(logits, tokens[:, 1:])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = grads
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_benchmark_table_prices_the_calibrated_model(tmp_path):
    """The benchmark's table merges into a hardware profile, and the calibrated model then
    prices the norms, SwiGLU and the loss at the measured kernel times."""
    import json

    from meshplan.costmodels.calibrated import CalibratedCosts, profile_from_dict
    from meshplan.loaders import load_cluster
    from meshplan.validate.profile import merge_kernel_table

    out = tmp_path / "kernels.json"
    code = _bench_module().main(["--quick", "--device", DEVICE, "--repeats", "1", "--no-compile",
                                 "--kernels", "rmsnorm,swiglu,cross_entropy", "--out", str(out)])
    assert code == 0
    table = json.loads(out.read_text())
    impls = {(r["kernel"], r["impl"]) for r in table["rows"]}
    assert ("rmsnorm", "triton") in impls and ("rmsnorm", "eager") in impls
    base = {"format": "meshplan-profile", "version": 1, "device": "test",
            "gemm": {"bf16": [[64, 64, 64, 1e-6]]}, "attention": {},
            "memory_bw_bytes_per_s": 1e11, "kernel_overhead_s": 1e-6, "collectives": {},
            "concurrency": {}, "elementwise": {"bf16": {"rope": [[10, 1.0, 2.0]]}}}
    merged = profile_from_dict(merge_kernel_table(base, table))
    costs = CalibratedCosts(load_cluster("cpu", gpus=1), merged)
    nbytes, fwd_s, bwd_s = table["elementwise"]["bf16"]["attn_norm"][0]
    assert costs.mem_op_s("bf16", "attn_norm", nbytes, eager=False) == pytest.approx(fwd_s)
    # (forward+backward less forward: 0 when the interpreter's noise makes it negative)
    assert costs.mem_op_s("bf16", "attn_norm_bwd", 2 * nbytes, eager=False) == \
        pytest.approx(bwd_s, abs=1e-9)
    assert merged.elementwise["bf16"]["rope"] == [[10, 1.0, 2.0]]  # other ops kept
    with pytest.raises(Exception, match="kernel_table"):
        merge_kernel_table(base, {"format": "something else"})


def test_runtime_kernel_choice(monkeypatch):
    from meshplan.core.errors import SpecError
    from meshplan.core.plan import Plan
    from meshplan.runtime.support import kernels_on

    fused, eager = Plan.parse("dp=2"), Plan.parse("dp=2,kernels=eager")
    assert kernels_on(fused, "cuda") and not kernels_on(eager, "cuda")
    assert not kernels_on(fused, "cpu")  # the plan's choice never interprets on a CPU
    assert kernels_on(eager, "cuda", "triton") and not kernels_on(fused, "cuda", "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SpecError, match="TRITON_INTERPRET"):
        kernels_on(fused, "cpu", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels_on(fused, "cpu", "triton")


def test_every_kernel_compiles_for_hopper_and_ampere():
    """Triton's GPU compiler (with its bundled ptxas) accepts every kernel's launch for
    sm_90 and sm_80; the interpreter alone would not catch what fails to lower."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "meshplan.kernels.compile_check",
                           "--arch", "90,80"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ok ") == 2 * 12
