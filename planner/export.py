"""Hand a plan to an existing engine: torchtitan TOML, Megatron-LM arguments, DeepSpeed JSON.

Each exporter writes what its engine can express and raises SpecError, naming the plan key,
for what it cannot (say, ZeRO-1 in torchtitan, or an arbitrary layer split in Megatron's
first/last-stage arguments); nothing is silently approximated. Pure: returns text.
"""

from __future__ import annotations

import json

from meshplan.core.errors import SpecError, require
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan, layer_split
from meshplan.core.workload import TrainWorkload

TARGETS = ("torchtitan", "megatron", "deepspeed")


def _default_buckets(plan: Plan, engine: str) -> None:
    """Refuse a DDP bucket size the engine has no setting for (`bucket_mb` sizes ZeRO-0's
    buckets only)."""
    require(plan.zero != 0 or plan.bucket_mb == Plan.bucket_mb, "plan.bucket_mb",
            f"{engine} has no setting for DDP's bucket size; it keeps {Plan.bucket_mb:g} MiB, "
            f"the plan has {plan.bucket_mb:g}")


def export(model: ModelSpec, work: TrainWorkload, plan: Plan, target: str) -> str:
    require(target in TARGETS, "export.to", f"{target!r} is not one of {list(TARGETS)}")
    require(plan.dp > 0, "plan.dp", "export needs a resolved plan (dp filled in)")
    return {"torchtitan": torchtitan_toml, "megatron": megatron_args,
            "deepspeed": deepspeed_json}[target](model, work, plan)


# ---- torchtitan ------------------------------------------------------------------------

_TT_PRECISION = {"bf16": "bfloat16", "fp8": "bfloat16", "fp16": "float16", "fp32": "float32"}
_TT_SCHEDULE = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}


def torchtitan_fqns(model: ModelSpec, plan: Plan) -> list[list[str]]:
    """Module names per model part (virtual stage), torchtitan's Llama naming."""
    parts, start = [], 0
    counts = layer_split(model, plan)
    for s, n in enumerate(counts):
        names = ["tok_embeddings"] if s == 0 else []
        names += [f"layers.{i}" for i in range(start, start + n)]
        if s == len(counts) - 1:
            names += ["norm", "output"]
        parts.append(names)
        start += n
    return parts


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def torchtitan_toml(model: ModelSpec, work: TrainWorkload, plan: Plan) -> str:
    require(plan.zero in (0, 2, 3), "plan.zero",
            f"torchtitan shards with FSDP2 (zero=3, or zero=2 with reshard_after_forward="
            f"never) or replicates (zero=0); it has no ZeRO-{plan.zero}")
    require(plan.recompute != "selective", "plan.recompute",
            "torchtitan checkpoints per op (recompute=op) or whole layers (full), not the "
            "attention-only selective recompute")
    require(plan.offload == "none" or plan.zero == 3, "plan.offload",
            "torchtitan offloads to CPU only through FSDP2 (needs zero=3)")
    require(plan.schedule in _TT_SCHEDULE, "plan.schedule",
            f"no torchtitan schedule for {plan.schedule}")
    _default_buckets(plan, "torchtitan")
    replicate, shard = (plan.dp, 1) if plan.zero == 0 else (1, plan.dp)
    parallelism: dict[str, object] = {
        "data_parallel_replicate_degree": replicate,
        "data_parallel_shard_degree": shard,
        "fsdp_reshard_after_forward": "never" if plan.zero == 2 else "default",
        "tensor_parallel_degree": plan.tp,
        "enable_async_tensor_parallel": plan.tp_overlap and plan.tp > 1,
        "context_parallel_degree": plan.cp,
        "pipeline_parallel_degree": plan.pp,
        "expert_parallel_degree": plan.ep,
        "expert_tensor_parallel_degree": plan.etp or plan.tp,
    }
    if plan.pp > 1:
        parallelism["pipeline_parallel_schedule"] = _TT_SCHEDULE[plan.schedule]
        parallelism["pipeline_parallel_microbatch_size"] = plan.mbs
        parallelism["module_fqns_per_model_part"] = torchtitan_fqns(model, plan)
    local = work.global_batch // plan.dp
    lines = ["# torchtitan job config written by meshplan", "[model]",
             f"name = {_toml_value(model.name)}"]
    if work.dtype == "fp8":
        lines.append('converters = ["float8"]')
    lines += ["", "[training]", f"local_batch_size = {local}",
              f"global_batch_size = {work.global_batch}", f"seq_len = {work.seq_len}",
              f"mixed_precision_param = {_toml_value(_TT_PRECISION[work.dtype])}",
              f"enable_cpu_offload = {_toml_value(plan.offload == 'optimizer')}",
              "", "[parallelism]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in parallelism.items()]
    mode = {"none": "none", "op": "selective", "full": "full"}[plan.recompute]
    lines += ["", "[activation_checkpoint]", f"mode = {_toml_value(mode)}"]
    if mode == "selective":
        lines.append('selective_ac_option = "op"')
    lines += ["", "[compile]", f"enable = {_toml_value(plan.kernels == 'fused')}", ""]
    return "\n".join(lines)


# ---- Megatron-LM -----------------------------------------------------------------------

def _megatron_split(model: ModelSpec, plan: Plan) -> list[str]:
    counts = layer_split(model, plan)
    if plan.stage_layers is None or len(set(counts)) == 1:
        if plan.vpp > 1:
            require(model.n_layers % plan.n_stages == 0, "plan.vpp",
                    f"Megatron interleaving needs {model.n_layers} layers divisible by "
                    f"pp*vpp = {plan.n_stages}")
            return ["--num-layers-per-virtual-pipeline-stage", str(counts[0])]
        if model.n_layers % plan.pp == 0:
            return []
    require(plan.vpp == 1, "plan.stage_layers",
            f"Megatron's interleaved schedule takes equal chunks; split {list(counts)} is not")
    middle = set(counts[1:-1])
    require(len(middle) <= 1, "plan.stage_layers",
            f"Megatron sets only the first and last stage apart "
            f"(--decoder-first/last-pipeline-num-layers); middle stages differ: {list(counts)}")
    return ["--decoder-first-pipeline-num-layers", str(counts[0]),
            "--decoder-last-pipeline-num-layers", str(counts[-1])]


def megatron_args(model: ModelSpec, work: TrainWorkload, plan: Plan) -> str:
    require(plan.zero in (0, 1, 3), "plan.zero",
            "Megatron-LM has DDP (zero=0), the distributed optimizer (zero=1) and FSDP "
            f"(zero=3), not ZeRO-{plan.zero}")
    require(model.mla is None, "model.mla", "MLA export to Megatron is not written yet")
    require(plan.pp == 1 or plan.schedule in ("1f1b", "interleaved"), "plan.schedule",
            f"Megatron-LM pipelines with 1F1B or interleaved 1F1B, not {plan.schedule}")
    a = _megatron_model_args(model, work) + [
        "--tensor-model-parallel-size", str(plan.tp),
        "--pipeline-model-parallel-size", str(plan.pp),
        "--context-parallel-size", str(plan.cp),
        "--micro-batch-size", str(plan.mbs), "--global-batch-size", str(work.global_batch),
    ]
    if model.moe:
        a += ["--expert-model-parallel-size", str(plan.ep),
              "--expert-tensor-parallel-size", str(plan.etp or plan.tp)]
    a += _megatron_split(model, plan)
    if plan.sp and plan.tp > 1:
        a.append("--sequence-parallel")
    if plan.recompute == "selective":
        a += ["--recompute-granularity", "selective"]
    elif plan.recompute == "full":
        a += ["--recompute-granularity", "full", "--recompute-method", "uniform",
              "--recompute-num-layers", "1"]
    elif plan.recompute == "op":
        raise SpecError("plan.recompute", "Megatron-LM has no per-op checkpointing; use "
                        "recompute=selective or full")
    if plan.zero == 1:
        a.append("--use-distributed-optimizer")
    elif plan.zero == 3:
        a += ["--use-torch-fsdp2"]
    if plan.dp_overlap:
        a += ["--overlap-grad-reduce"] + (["--overlap-param-gather"] if plan.zero else [])
    if plan.zero == 0 and plan.bucket_mb != Plan.bucket_mb:  # in parameters, as `dp_units`
        a += ["--ddp-bucket-size", str(round(plan.bucket_bytes / work.activation_bytes))]
    if plan.tp_overlap and plan.tp > 1:
        a.append("--tp-comm-overlap")
    if plan.offload == "optimizer":
        a += ["--optimizer-cpu-offload"]
    if plan.attn == "flash":
        a.append("--use-flash-attn")
    a.append("--fp16" if work.dtype == "fp16" else "--bf16")
    if work.dtype == "fp8":
        a += ["--fp8-format", "hybrid"]
    return " \\\n  ".join(_pairs(a)) + "\n"


def _megatron_model_args(model: ModelSpec, work: TrainWorkload) -> list[str]:
    a = ["--num-layers", str(model.n_layers), "--hidden-size", str(model.hidden_size),
         "--num-attention-heads", str(model.n_heads), "--ffn-hidden-size",
         str(model.ffn_hidden_size), "--seq-length", str(work.seq_len),
         "--max-position-embeddings", str(max(work.seq_len, model.max_position))]
    if model.n_kv_heads != model.n_heads:
        a += ["--group-query-attention", "--num-query-groups", str(model.n_kv_heads)]
    if model.mlp == "swiglu":
        a.append("--swiglu")
    if model.norm == "rmsnorm":
        a += ["--normalization", "RMSNorm"]
    if model.position == "rope":
        a += ["--position-embedding-type", "rope"]
    if not model.tied_embeddings:
        a.append("--untie-embeddings-and-output-weights")
    if model.moe:
        moe = model.moe
        freq = f"([0]*{moe.first_k_dense}+[1]*{model.n_layers - moe.first_k_dense})"
        a += ["--num-experts", str(moe.n_experts), "--moe-router-topk", str(moe.top_k),
              "--moe-ffn-hidden-size", str(moe.expert_ffn_hidden_size),
              "--moe-layer-freq", freq]
        if moe.n_shared_experts:
            a += ["--moe-shared-expert-intermediate-size",
                  str(moe.n_shared_experts * moe.shared_ffn)]
    return a


def _pairs(args: list[str]) -> list[str]:
    """Group each flag with its value for one flag per line."""
    out: list[str] = []
    for x in args:
        if out and not x.startswith("--"):
            out[-1] += f" {x}"
        else:
            out.append(x)
    return out


# ---- DeepSpeed -------------------------------------------------------------------------

def deepspeed_json(model: ModelSpec, work: TrainWorkload, plan: Plan) -> str:
    for key, ok, why in (
        ("plan.pp", plan.pp == 1, "DeepSpeed sets pipeline stages in code (PipelineModule), "
         "not in its JSON; export pp=1 plans or use --to megatron"),
        ("plan.cp", plan.cp == 1, "DeepSpeed's sequence parallelism is Ulysses all-to-all, "
         "not the ring attention meshplan models for cp"),
        ("plan.ep", plan.ep == 1, "DeepSpeed-MoE sets expert parallelism in model code"),
        ("plan.recompute", plan.recompute in ("none", "full"),
         "DeepSpeed's activation checkpointing recomputes whole layers (full) only"),
        ("plan.schedule", plan.vpp == 1, "no interleaved schedule in DeepSpeed"),
    ):
        require(ok, key, why)
    _default_buckets(plan, "DeepSpeed's JSON")
    m = work.global_batch // (plan.dp * plan.mbs)
    cfg: dict[str, object] = {
        "train_batch_size": work.global_batch,
        "train_micro_batch_size_per_gpu": plan.mbs,
        "gradient_accumulation_steps": m,
        "zero_optimization": {"stage": plan.zero, "overlap_comm": plan.dp_overlap,
                              "contiguous_gradients": True},
    }
    if plan.offload == "optimizer":
        cfg["zero_optimization"]["offload_optimizer"] = {  # type: ignore[index]
            "device": "cpu", "pin_memory": True}
        require(plan.zero >= 1, "plan.offload", "ZeRO-Offload needs zero >= 1")
    if work.dtype == "fp16":
        cfg["fp16"] = {"enabled": True}
    else:
        cfg["bf16"] = {"enabled": True}
    require(work.dtype != "fp8", "workload.dtype", "DeepSpeed's JSON has no FP8 training switch")
    if plan.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": plan.tp}
    if plan.recompute == "full":
        cfg["activation_checkpointing"] = {"partition_activations": plan.tp > 1,
                                           "contiguous_memory_optimization": False,
                                           "number_checkpoints": model.n_layers}
    cfg["steps_per_print"] = 10
    return json.dumps(cfg, indent=2) + "\n"

