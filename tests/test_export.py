"""Exports carry every plan value over to the engine's own names, and refuse what they can't."""

import json
import tomllib

import pytest

import meshplan as mp
from meshplan.planner.export import export

WORK = mp.TrainWorkload(seq_len=8192, global_batch=256)


def _plan(text, gpus=64):
    return mp.Plan.parse(text).resolve(gpus)


def test_torchtitan_values_and_module_split():
    model = mp.load_model("llama3-8b")
    plan = _plan("tp=2,pp=4,vpp=2,cp=2,mbs=2,zero=3,recompute=op,tp_overlap=on,"
                 "stage_layers=3:4:4:4:4:4:4:5")
    cfg = tomllib.loads(export(model, WORK, plan, "torchtitan"))
    par = cfg["parallelism"]
    assert (par["tensor_parallel_degree"], par["pipeline_parallel_degree"],
            par["context_parallel_degree"], par["data_parallel_shard_degree"],
            par["data_parallel_replicate_degree"]) == (2, 4, 2, 4, 1)
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert par["pipeline_parallel_microbatch_size"] == 2
    assert par["enable_async_tensor_parallel"] is True
    parts = par["module_fqns_per_model_part"]
    assert [sum(n.startswith("layers.") for n in p) for p in parts] == list(plan.stage_layers)
    assert parts[0][0] == "tok_embeddings" and parts[-1][-2:] == ["norm", "output"]
    assert [n for p in parts for n in p if n.startswith("layers.")] == [
        f"layers.{i}" for i in range(32)]
    assert cfg["training"]["local_batch_size"] == 256 // 4
    assert cfg["training"]["seq_len"] == 8192
    assert cfg["activation_checkpoint"] == {"mode": "selective", "selective_ac_option": "op"}


def test_torchtitan_ddp_and_refusals():
    model = mp.load_model("llama3-8b")
    par = tomllib.loads(export(model, WORK, _plan("tp=8,zero=0"), "torchtitan"))["parallelism"]
    assert par["data_parallel_replicate_degree"] == 8 and par["data_parallel_shard_degree"] == 1
    with pytest.raises(mp.SpecError, match="plan.zero.*ZeRO-1"):
        export(model, WORK, _plan("tp=8,zero=1"), "torchtitan")
    with pytest.raises(mp.SpecError, match="plan.recompute"):
        export(model, WORK, _plan("tp=8,zero=3,recompute=selective"), "torchtitan")


def _flags(text):
    tokens = text.replace("\\\n", " ").split()
    out, i = {}, 0
    while i < len(tokens):
        if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out[tokens[i]] = tokens[i + 1]
            i += 2
        else:
            out[tokens[i]] = True
            i += 1
    return out


def test_megatron_values():
    model = mp.load_model("llama3-70b")
    plan = _plan("tp=8,pp=4,vpp=5,mbs=1,zero=1,sp=on,recompute=selective,tp_overlap=on")
    f = _flags(export(model, WORK, plan, "megatron"))
    assert f["--tensor-model-parallel-size"] == "8" and f["--pipeline-model-parallel-size"] == "4"
    assert f["--num-layers-per-virtual-pipeline-stage"] == "4"  # 80 / (4 * 5)
    assert f["--micro-batch-size"] == "1" and f["--global-batch-size"] == "256"
    assert f["--num-query-groups"] == "8" and f["--recompute-granularity"] == "selective"
    for flag in ("--sequence-parallel", "--use-distributed-optimizer", "--tp-comm-overlap",
                 "--overlap-grad-reduce", "--swiglu", "--bf16"):
        assert f[flag] is True
    uneven = _plan("tp=8,pp=4,stage_layers=19:21:21:19,recompute=full")
    f = _flags(export(model, WORK, uneven, "megatron"))
    assert f["--decoder-first-pipeline-num-layers"] == "19"
    assert f["--decoder-last-pipeline-num-layers"] == "19"
    assert f["--recompute-granularity"] == "full"
    with pytest.raises(mp.SpecError, match="middle stages differ"):
        export(model, WORK, _plan("tp=8,pp=4,stage_layers=19:20:22:19"), "megatron")


def test_megatron_moe():
    model = mp.load_model("mixtral-8x7b")
    f = _flags(export(model, WORK, _plan("tp=2,ep=8,etp=1,zero=1"), "megatron"))
    assert f["--num-experts"] == "8" and f["--moe-router-topk"] == "2"
    assert f["--expert-model-parallel-size"] == "8" and f["--expert-tensor-parallel-size"] == "1"


def test_ddp_bucket_size_goes_to_megatron_in_parameters_and_is_refused_elsewhere():
    model = mp.load_model("llama3-8b")
    flags = _flags(export(model, WORK, _plan("tp=8,zero=0,bucket_mb=50"), "megatron"))
    assert flags["--ddp-bucket-size"] == str(50 * 2**20 // 2)  # bf16 gradients
    assert "--ddp-bucket-size" not in _flags(export(model, WORK, _plan("tp=8,zero=0"),
                                                    "megatron"))
    for target in ("torchtitan", "deepspeed"):
        with pytest.raises(mp.SpecError, match="plan.bucket_mb.*50"):
            export(model, WORK, _plan("tp=8,zero=0,bucket_mb=50"), target)


def test_deepspeed_values_and_refusals():
    model = mp.load_model("llama3-8b")
    cfg = json.loads(export(model, WORK, _plan("tp=2,mbs=2,zero=2,offload=optimizer,"
                                               "recompute=full"), "deepspeed"))
    assert cfg["train_batch_size"] == 256 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 256 // (32 * 2)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["tensor_parallel"]["autotp_size"] == 2 and cfg["bf16"]["enabled"]
    with pytest.raises(mp.SpecError, match="plan.pp"):
        export(model, WORK, _plan("tp=2,pp=2"), "deepspeed")
