"""What the runtime can execute, checked before any process starts (no torch import).

`check_plan` (core) says whether a plan is valid for the model and cluster at all; this
says whether *this runtime* builds it. Each refusal names the field and the numbers.
"""

from __future__ import annotations

import importlib.util
import os

from meshplan.core.errors import SpecError
from meshplan.core.model import ModelSpec
from meshplan.core.plan import Plan


def refuse_unsupported_model(spec: ModelSpec) -> None:
    if spec.mla is not None:
        raise SpecError("model.mla", f"{spec.name} uses multi-head latent attention, which "
                        "the runtime does not build yet (GQA/MQA/MHA only)")
    if spec.position != "rope":
        raise SpecError("model.position", f"{spec.name} uses {spec.position} positions; "
                        "the runtime builds RoPE models only")
    if spec.norm != "rmsnorm":
        raise SpecError("model.norm", f"{spec.name} uses {spec.norm}; the runtime builds "
                        "RMSNorm models only")
    if spec.moe is not None and spec.moe.capacity_factor is not None:
        raise SpecError("model.moe.capacity_factor", "the runtime's MoE is dropless; "
                        f"capacity factor {spec.moe.capacity_factor} is not supported")
    if spec.moe is not None and spec.moe.router_bias:
        raise SpecError("model.moe.router_bias", "the runtime's router has no "
                        "aux-loss-free bias yet")


def refuse_unsupported_plan(spec: ModelSpec, plan: Plan, cuda: bool) -> None:
    """`plan` resolved. Raises SpecError for the first thing the runtime cannot run."""
    refuse_unsupported_model(spec)
    if plan.tp > 1 and spec.n_kv_heads % plan.tp:
        raise SpecError("plan.tp", f"the runtime shards KV heads: {spec.n_kv_heads} KV heads "
                        f"are not divisible by tp={plan.tp}")
    if spec.tied_embeddings and (plan.tp > 1 or plan.pp > 1):
        raise SpecError("model.tied_embeddings", f"tied embeddings with tp={plan.tp}, "
                        f"pp={plan.pp}: the runtime ties them only without TP and PP")
    split = plan.schedule == "dualpipe" or (plan.schedule == "zb" and plan.pp > 1)
    if split and plan.zero >= 1 and plan.dp * plan.cp > 1:
        raise SpecError("plan.schedule", f"{plan.schedule} with zero={plan.zero}: the "
                        "runtime's split backward writes weight gradients past FSDP's "
                        f"hooks; use zero=0 with {plan.schedule}")
    if spec.qk_norm and plan.tp > 1:
        raise SpecError("model.qk_norm", f"QK-norm with tp={plan.tp} is not built yet")
    if plan.expert_placement is not None and spec.moe is not None:
        n = spec.moe.n_experts
        slots = {len(row) for row in plan.expert_placement}
        if slots != {n}:
            raise SpecError("plan.expert_placement", f"{sorted(slots)} slots for {n} experts: "
                            "the runtime places each expert once (no replicas yet)")
    if plan.offload == "layers" and plan.dp * plan.cp == 1 and cuda:
        raise SpecError("plan.offload", "offload=layers on CUDA runs through FSDP2, which "
                        "needs dp*cp > 1")
    if plan.offload in ("optimizer", "layers") and plan.zero == 0 and cuda:
        raise SpecError("plan.offload", f"offload={plan.offload} on CUDA needs zero >= 1 "
                        "(FSDP2's CPU offload policy)")


KERNEL_CHOICES = ("plan", "triton", "torch")


def kernels_on(plan: Plan, device: str, choice: str = "plan") -> bool:
    """Whether the model is built with our Triton kernels (`meshplan.kernels`). "triton"
    and "torch" decide; "plan" follows the plan: kernels=fused uses them on CUDA when
    Triton is installed, and the eager ops elsewhere."""
    if choice not in KERNEL_CHOICES:
        raise SpecError("kernels", f"unknown choice {choice!r} (one of {KERNEL_CHOICES})")
    have = importlib.util.find_spec("triton") is not None
    if choice == "torch":
        return False
    if choice == "triton":
        if not have:
            raise SpecError("kernels", "Triton kernels asked for, but triton is not installed")
        if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SpecError("kernels", f"Triton kernels run on CUDA devices and this plan "
                            f"runs on {device}; set TRITON_INTERPRET=1 to interpret them "
                            "on the CPU (slow: for tests)")
        return True
    return plan.kernels == "fused" and have and device == "cuda"


def execution_notes(spec: ModelSpec, plan: Plan, device: str, triton: bool = False
                    ) -> list[str]:
    """Where the runtime executes the plan differently from what the plan says (recorded in
    the measured JSON, so that a comparison with the simulator knows)."""
    notes = []
    if plan.zero == 1 and plan.dp * plan.cp > 1:
        notes.append("zero=1 runs as ZeRO-2: FSDP2 reduce-scatters gradients in backward")
    if plan.zero >= 1 and plan.ep > 1:
        notes.append("expert weights are not ZeRO-sharded; their gradients are all-reduced "
                     "over the expert-data-parallel group")
    if spec.moe is not None and plan.tp > 1:
        notes.append("experts are replicated on the TP ranks (etp=1) and run on the full "
                     "sequence of the TP group")
    if plan.tp_overlap and plan.tp > 1:
        notes.append("tp_overlap is not applied: TP collectives are exposed")
    if triton:
        which = "RMSNorm, SwiGLU, cross-entropy" + (
            ", MoE permute/unpermute, grouped expert GEMMs" if spec.moe else "")
        notes.append(f"Triton kernels: {which}; tensors they cannot address (DTensors "
                     "under tp/sp) take the eager ops")
    elif plan.kernels == "fused":
        notes.append("kernels=fused: ran eager torch ops (our Triton kernels need CUDA and "
                     "triton installed)")
    if plan.cp > 1 and plan.attn == "unfused":
        notes.append("attn=unfused: ring attention runs fused flash kernels per block")
    elif plan.attn == "unfused":
        notes.append("attn=unfused: scaled_dot_product_attention still picks a fused kernel")
    if plan.offload in ("optimizer", "layers") and device == "cpu":
        notes.append(f"offload={plan.offload}: nothing to move on CPU")
    return notes
