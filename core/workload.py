"""What a training step processes: sequence length, global batch, precision, optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import require

Optimizer = Literal["adam", "sgd"]

# Bytes of optimizer state per parameter, the K of ZeRO's (2 + 2 + K)·Ψ (Rajbhandari et
# al. 2020, §3.1): mixed-precision Adam keeps fp32 master weights, momentum and variance.
OPTIMIZER_STATE_BYTES = {"adam": 12, "sgd": 8}


@dataclass(frozen=True, kw_only=True)
class TrainWorkload:
    seq_len: int
    global_batch: int  # sequences per optimizer step
    dtype: Literal["bf16", "fp16", "fp8", "fp32"] = "bf16"
    optimizer: Optimizer = "adam"

    def __post_init__(self) -> None:
        require(self.seq_len > 0, "workload.seq_len", f"must be positive, got {self.seq_len}")
        require(self.global_batch > 0, "workload.global_batch",
                f"must be positive, got {self.global_batch}")
        require(self.optimizer in OPTIMIZER_STATE_BYTES, "workload.optimizer",
                f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZER_STATE_BYTES)}")
        require(self.dtype in ("bf16", "fp16", "fp8", "fp32"), "workload.dtype",
                f"unknown dtype {self.dtype!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation element: 16-bit unless training in fp32 (fp8 keeps bf16)."""
        return 4 if self.dtype == "fp32" else 2

    @property
    def optimizer_state_bytes(self) -> int:
        return OPTIMIZER_STATE_BYTES[self.optimizer]
