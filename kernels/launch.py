"""When our Triton kernels can run, and what every launch shares.

A kernel runs on plain CUDA tensors, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, which the tests use); anything else (no Triton, a CPU tensor
without the interpreter, a DTensor under tensor parallelism) takes the torch reference
beside the kernel. The interpreter must be chosen before the kernels are defined, so it
is read here, once, at import. Kernel files use postponed annotations, so their
`tl.constexpr` parameters need no Triton to be defined.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # the core install has no Triton: kernels stay plain functions, unused
    triton = tl = None

    def jit(fn):
        return fn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton 3.9's interpreter multiplies bfloat16 tiles in `tl.dot` as their raw uint16 bits
# (triton/runtime/interpreter.py, `create_dot`); under it the kernels widen dot operands to
# fp32 first, which changes nothing but speed on a GPU, where it is never set.
DOT_F32 = INTERPRET


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose storage a kernel can address: not a DTensor or other subclass."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def can_run(*tensors: torch.Tensor | None) -> bool:
    """True when Triton can run a kernel on these tensors (None entries are ignored)."""
    if triton is None:
        return False
    present = [t for t in tensors if t is not None]
    if not all(_plain(t) for t in present):
        return False
    return all(t.is_cuda for t in present) or (INTERPRET and all(not t.is_cuda for t in present))


def require(ok: bool, field: str, message: str) -> None:
    """Shape and dtype checks of the wrappers: a ValueError naming the argument."""
    if not ok:
        raise ValueError(f"{field}: {message}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_warps(block: int) -> int:
    """Warps for a program that holds a row of `block` elements in registers (Liger-Kernel's
    `calculate_settings`: wider rows spread over more warps instead of spilling)."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s precision for fp32 operands: TF32 only where torch's own matmuls use it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def row_programs(rows: int) -> int:
    """Programs for a row-parallel reduction: a few per SM on a GPU, few when interpreted
    (each interpreted program costs a Python loop)."""
    if INTERPRET or not torch.cuda.is_available():
        return max(1, min(rows, 4))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(rows, 4 * sms))
