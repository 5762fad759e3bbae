"""The published-comparison script turns records into the plans their sources ran."""

from meshplan.validate.published import cases, evaluate

LLAMA_405B = {"layers": 126, "hidden": 16384, "heads": 128, "kv_heads": 8,
              "ffn_hidden": 53248, "vocab": 128256, "seq_len": 8192}


def _titan(schedule: str) -> dict:
    return {"id": f"torchtitan-t5-{schedule}", "kind": "training", "completeness": "full",
            "name": "Llama 3.1 405B 512 H100 3D + compile + Float8 + AsyncTP seq 8192",
            "model": LLAMA_405B, "hardware": {"gpus": 512},
            "plan": {"dp": 8, "tp": 8, "pp": 8, "microbatch": 32, "recompute": "full",
                     "schedule": schedule},
            "measured": {"tokens_per_s_per_gpu": 100.0}}


def test_torchtitan_pipelines_split_the_local_batch_into_pp_microbatches():
    one, inter = cases([_titan("1F1B"), _titan("Interleaved 1F1B")])
    [p1], [p2] = one.plans, inter.plans
    assert (p1.mbs, p1.pp, p1.schedule) == (4, 8, "1f1b")  # 32 sequences in 8 micro-batches
    assert (p2.mbs, p2.vpp, p2.schedule) == (4, 2, "interleaved")
    assert one.work.dtype == "fp8" and p1.tp_overlap
    # interleaving shrinks the 8-micro-batch bubble: the source measured 128 vs 100 tok/s
    a, b = evaluate(one), evaluate(inter)
    assert 1.2 < b["predicted"] / a["predicted"] < 1.4
