import json

import pytest

import meshplan as mp
from meshplan.cli import main

BASE = ["simulate", "--model", "llama3-70b", "--cluster", "h100-sxm", "--gpus", "64",
        "--seq-len", "8192", "--global-batch", "512"]


def test_simulate_json(capsys):
    rc = main(BASE + ["--plan", "tp=8,pp=2,mbs=1,recompute=selective,zero=1,sp=on", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["plan"]["dp"] == 4
    for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_bytes",
                "memory_breakdown_bytes", "time_breakdown_s"):
        assert key in out


def test_issue_example_prints_keys_and_reports_oom(capsys):
    rc = main(BASE + ["--plan", "tp=8,pp=2,mbs=1,recompute=selective,zero=1", "--json"])
    captured = capsys.readouterr()
    assert "step_time_s" in json.loads(captured.out)
    assert rc == 3 and captured.err.count("\n") == 1 and "GB per GPU exceeds" in captured.err


def test_human_table(capsys):
    assert main(BASE + ["--plan", "tp=8,pp=2,sp=on,zero=1"]) == 0
    out = capsys.readouterr().out
    assert "step time" in out and "pipeline bubble" in out and "activations" in out


@pytest.mark.parametrize("model,plan", [("llama3-70b", "tp=8,pp=4,mbs=1,zero=1"),
                                        ("mixtral-8x7b", "tp=2,ep=8,pp=2,mbs=1,zero=1")])
def test_simulate_des_trace_json(capsys, tmp_path, model, plan):
    trace = tmp_path / "t.json"
    argv = ["simulate", "--model", model, "--cluster", "h100-sxm", "--gpus", "64",
            "--seq-len", "4096", "--global-batch", "64", "--plan", plan,
            "--engine", "des", "--trace", str(trace), "--json"]
    main(argv)
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "des" and out["step_time_s"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    pp = out["plan"]["pp"]
    assert {e["pid"] for e in events} == set(range(pp))


def test_simulate_prints_goodput_under_failures(capsys):
    rc = main(BASE + ["--plan", "tp=8,pp=2,sp=on,zero=1", "--json", "--mtbf-hours", "3",
                      "--checkpoint-s", "120", "--restart-s", "600"])
    good = json.loads(capsys.readouterr().out)["goodput"]
    assert rc == 0 and 0.5 < good["goodput"] < 1 and good["failures"] > 100
    assert abs(good["goodput"] - good["expected_goodput"]) < 0.02
    assert main(BASE + ["--plan", "tp=8,pp=4", "--checkpoint-s", "60"]) == 2


@pytest.mark.parametrize("extra,field", [
    (["--straggler", "x:0.2", "--engine", "des"], "straggler"),
    (["--link-scale", "nic", "--engine", "des"], "link-scale"),
    (["--link-scale", "nic=0.5"], "engine"),
    (["--replica-cluster", "1:a100-80gb"], "engine"),
    (["--replica-cluster", "a100-80gb", "--engine", "des"], "replica-cluster"),
    (["--replica-cluster", "9:a100-80gb", "--engine", "des"], "options.replica_clusters"),
])
def test_des_options_bad_input(capsys, extra, field):
    assert main(BASE + ["--plan", "tp=8,pp=4", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {field}:" in err


@pytest.mark.parametrize("args,field,numbers", [
    (["--model", "llama-9000"], "model", ["llama-9000"]),
    (["--plan", "tp=8,pp=3"], "plan", ["24", "64"]),
    (["--plan", "tp=3"], "plan", ["3", "64"]),
    (["--plan", "tp=8,mbs=3"], "plan.mbs", ["512", "24"]),
    (["--plan", "tp=16", "--model", "llama2-13b"], "plan.tp", ["40", "16"]),
    (["--gpus", "12"], "cluster.gpus", ["12", "8"]),
    (["--dtype", "fp8", "--cluster", "a100-80gb"], "workload.dtype", ["fp8"]),
])
def test_bad_input_one_line_no_traceback(capsys, args, field, numbers):
    argv = list(BASE)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if "--plan" not in argv:
        argv += ["--plan", "tp=8"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {field}:" in err
    for n in numbers:
        assert n in err


def test_model_that_does_not_fit(capsys):
    rc = main(["simulate", "--model", "llama3-405b", "--cluster", "h100-sxm", "--gpus", "8",
               "--seq-len", "8192", "--global-batch", "8", "--plan", "tp=8"])
    err = capsys.readouterr().err
    assert rc == 3 and "memory: peak" in err and "80.0 GB" in err


def test_listings(capsys):
    assert main(["models"]) == 0
    assert "deepseek-v3" in capsys.readouterr().out
    assert main(["clusters", "--json"]) == 0
    assert "h100-sxm" in json.loads(capsys.readouterr().out)


def test_model_and_cluster_from_files(tmp_path, capsys):
    from importlib import resources
    text = (resources.files("meshplan.core") / "catalog" / "clusters" / "a100-80gb.toml"
            ).read_text().replace('name = "a100-80gb"', 'name = "my-a100s"')
    (tmp_path / "mine.toml").write_text(text.replace("oversubscription = 1.0",
                                                     "oversubscription = 2.0"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 2048,
                               "intermediate_size": 5632, "num_attention_heads": 16,
                               "num_hidden_layers": 22, "num_key_value_heads": 4,
                               "vocab_size": 32000}))
    rc = main(["simulate", "--model", str(cfg), "--cluster", str(tmp_path / "mine.toml"),
               "--gpus", "16", "--seq-len", "2048", "--global-batch", "64", "--plan", "zero=1",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["plan"]["dp"] == 16


def test_bad_cluster_file_names_the_key(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('name = "x"\n[device]\nname = "g"\nbogus = 1\n')
    rc = main(BASE[:3] + ["--cluster", str(tmp_path / "bad.toml")] + BASE[5:] + ["--plan", "tp=8"])
    err = capsys.readouterr().err
    assert rc == 2 and "bogus" in err and err.count("\n") == 1


SEARCH = ["search", "--model", "llama3-8b", "--cluster", "h100-sxm", "--gpus", "16",
          "--seq-len", "4096", "--global-batch", "32", "--space", "cp=1,vpp=1,mbs=1|2"]


def test_search_json_and_plan_file_round_trip(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(SEARCH + ["--top", "3", "--json", "--out", str(out)]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert len(plans) == 3
    speeds = [p["predicted"]["tokens_per_s"] for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    assert main(["simulate", "--plan-file", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["tokens_per_s"] == pytest.approx(speeds[0])
    pf = mp.load_plan_file(str(out))
    for target in ("torchtitan", "megatron", "deepspeed"):  # the CLI says what the API says
        rc = main(["export", str(out), "--to", target])
        captured = capsys.readouterr()
        try:
            expected = mp.export(pf.model, pf.work, pf.plan, target)
        except mp.SpecError as err:
            assert rc == 2 and str(err) in captured.err
        else:
            assert rc == 0 and captured.out == expected


def test_search_table_explains_the_winner(capsys):
    assert main(SEARCH + ["--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "plans enumerated" in out and "the runner-up" in out


def test_search_nothing_fits_exits_3(capsys):
    rc = main(["search", "--model", "llama3-405b", "--cluster", "h100-sxm", "--gpus", "8",
               "--seq-len", "8192", "--global-batch", "16"])
    err = capsys.readouterr().err
    assert rc == 3 and "misses by" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,field", [
    (["--space", "tp=3|x"], "plan.tp"),
    (["--space", "bogus=1"], "space"),
    (["--objective", "cost"], "price_per_gpu_hour"),
    (["--objective", "gpus"], "objective.token_budget"),
])
def test_search_bad_input(capsys, extra, field):
    assert main(SEARCH + extra) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1


def test_whatif_table_and_plot(capsys, tmp_path):
    plot = tmp_path / "w.png"
    rc = main(["whatif", "--model", "llama3-8b", "--cluster", "h100-sxm", "--gpus", "16",
               "--seq-len", "4096", "--global-batch", "32", "--space", "cp=1,vpp=1,mbs=1",
               "--vary", "gpus=8,16", "--vary", "cluster.node.nic_bw_bytes_per_s=x1,x4",
               "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("gpus=") == 4 and plot.stat().st_size > 1000
    assert main(["whatif", "--model", "llama3-8b", "--cluster", "h100-sxm", "--gpus", "16",
                 "--seq-len", "4096", "--global-batch", "32", "--vary", "cluster.nope=1",
                 "--plot", ""]) == 2
    assert "nope" in capsys.readouterr().err
