"""What the simulator predicts for one plan; the same keys the CLI prints with --json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .plan import Plan


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Bytes on the most loaded GPU."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float = 0.0
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.kv_cache + self.buffers)


@dataclass(frozen=True, kw_only=True)
class TimeBreakdown:
    """Seconds of one optimizer step on the critical path; they add up to the step time."""

    compute: float
    recompute: float
    exposed_comm: float
    bubble: float
    offload: float
    optimizer: float

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + self.exposed_comm + self.bubble
                + self.offload + self.optimizer)


@dataclass(frozen=True, kw_only=True)
class SimResult:
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float  # model FLOPs (no recompute) per GPU per second / 1e12
    mfu: float
    hfu: float  # hardware FLOPs (with recompute) / peak
    peak_memory_bytes: float
    fits: bool
    memory: MemoryBreakdown
    time: TimeBreakdown
    plan: Plan
    engine: str = "analytical"
    comm_s: dict[str, float] = field(default_factory=dict)  # total per collective kind
    violations: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        mem = asdict(self.memory)
        return {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "peak_memory_bytes": self.peak_memory_bytes,
            "fits": self.fits,
            "memory_breakdown_bytes": mem,
            "time_breakdown_s": asdict(self.time),
            "comm_s": dict(self.comm_s),
            "engine": self.engine,
            "violations": list(self.violations),
            "plan": self.plan.to_dict(),
        }
