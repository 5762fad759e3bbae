import pytest

import meshplan as mp
from meshplan.core.check import check_plan


def test_parse_and_resolve():
    p = mp.Plan.parse("tp=8,pp=2,mbs=1,recompute=selective,zero=1").resolve(64)
    assert (p.dp, p.tp, p.pp, p.mbs, p.zero, p.recompute) == (4, 8, 2, 1, 1, "selective")
    assert p.etp == 8  # expert TP defaults to TP


def test_vpp_implies_interleaved():
    assert mp.Plan.parse("pp=4,vpp=2").schedule == "interleaved"


def test_json_round_trip():
    p = mp.Plan.parse("tp=4,pp=4,vpp=2,cp=2,sp=on,zero=3,recompute=full,mbs=2,"
                      "bucket_mb=0.5,stage_layers=3:3:3:3:3:3:3:4").resolve(256)
    assert mp.Plan.from_json(p.to_json()) == p
    assert mp.Plan.parse(p.to_text()) == p


@pytest.mark.parametrize("text,field", [("tp=0", "plan.tp"), ("zero=4", "plan.zero"),
                                        ("tpp=2", "plan"), ("recompute=half", "plan.recompute"),
                                        ("tp", "plan"), ("sp=maybe", "plan.sp"),
                                        ("bucket_mb=0", "plan.bucket_mb"),
                                        ("bucket_mb=big", "plan.bucket_mb")])
def test_parse_errors_name_the_field(text, field):
    with pytest.raises(mp.SpecError) as err:
        mp.Plan.parse(text)
    assert err.value.field == field


def test_unknown_json_key_and_version():
    with pytest.raises(mp.SpecError, match="unknown keys"):
        mp.Plan.from_dict({"tp": 2, "bogus": 1})
    with pytest.raises(mp.SpecError, match="version"):
        mp.Plan.from_dict({"version": 99})


def _violations(model, gpus, plan, seq=4096, batch=256, cluster="h100-sxm"):
    c = mp.load_cluster(cluster, gpus)
    w = mp.TrainWorkload(seq_len=seq, global_batch=batch)
    return check_plan(mp.load_model(model), c, w, mp.Plan.parse(plan).resolve(gpus))


def test_check_plan_reports_numbers():
    v = _violations("llama2-13b", 64, "tp=16")[0]
    assert v.field == "plan.tp" and "40 attention heads" in v.message and "tp=16" in v.message
    [v] = _violations("llama3-8b", 64, "tp=8,mbs=3")
    assert v.field == "plan.mbs" and "256" in v.message and "24" in v.message
    [v] = _violations("llama3-8b", 64, "pp=64")
    assert "64 stages for 32 layers" in v.message
    [v] = _violations("llama3-8b", 64, "cp=8", seq=4100)
    assert v.field == "plan.cp" and "4100" in v.message
    [v] = _violations("llama3-8b", 64, "ep=2")
    assert v.field == "plan.ep" and "no experts" in v.message
    [v] = _violations("mixtral-8x7b", 64, "ep=16")
    assert "8 experts are not divisible by ep=16" in v.message
    [v] = _violations("llama3-8b", 64, "pp=4,vpp=2,mbs=2", batch=64 * 3)
    assert v.field == "plan.vpp"
    [v] = _violations("llama3-8b", 48, "pp=3,schedule=dualpipe", batch=96)
    assert v.field == "plan.pp" and "even pp" in v.message and "3" in v.message
    [v] = _violations("llama3-8b", 64, "pp=4,mbs=2,schedule=dualpipe", batch=64)
    assert v.field == "plan.mbs" and "2*pp = 8, got 2" in v.message


def test_check_plan_memory():
    c = mp.load_cluster("h100-sxm", 8)
    w = mp.TrainWorkload(seq_len=4096, global_batch=8)
    plan = mp.Plan.parse("tp=8").resolve(8)
    [v] = check_plan(mp.load_model("llama3-8b"), c, w, plan, peak_memory_bytes=90e9)
    assert v.field == "memory" and "90.0 GB" in v.message and "80.0 GB" in v.message


def test_world_size_mismatch():
    c = mp.load_cluster("h100-sxm", 64)
    w = mp.TrainWorkload(seq_len=4096, global_batch=64)
    [v] = check_plan(mp.load_model("llama3-8b"), c, w, mp.Plan(dp=4, tp=8))
    assert "= 32 but the cluster has 64 GPUs" in v.message
