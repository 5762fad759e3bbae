"""Cross-entropy over a large vocabulary without full fp32 logits.

The eager loss (`F.cross_entropy(logits.float())`) keeps an fp32 copy of the logits, an
fp32 log-softmax for the backward, and an fp32 gradient: about 12 bytes per logit beyond
the 16-bit logits themselves. Here one program per row walks the vocabulary in chunks
with an online log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer calculation
for softmax", Alg. 3), keeping one fp32 log-sum-exp per row; the backward writes
(softmax - onehot) * g / n_valid in the logits' dtype, optionally into the logits'
own storage (as Liger-Kernel does), so nothing of size rows x vocab is added.

`linear_cross_entropy` also fuses the output projection: it computes the logits of a
chunk of rows at a time, takes their loss and gradient with the same kernels, and
accumulates the input and weight gradients, so at most `chunk_rows` x vocab logits exist
at once (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models",
make the same argument).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch import can_run, jit, next_pow2, require, row_warps, tl

IGNORE_INDEX = -100  # torch's default
BLOCK_V = 4096  # vocabulary elements per step of a row's loop


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The runtime's eager loss: fp32 logits, mean over the labels that are not ignored."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


@jit
def _ce_fwd(logits_ptr, labels_ptr, loss_ptr, lse_ptr, stride, vocab, ignore_index,
            BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    label = tl.load(labels_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    ignored = label == ignore_index
    target = tl.load(base + tl.where(ignored, 0, label)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - target))


@jit
def _ce_bwd(logits_ptr, grad_ptr, labels_ptr, lse_ptr, scale_ptr, stride, vocab,
            ignore_index, BLOCK: tl.constexpr):
    """grad = (exp(x - lse) - onehot(label)) * scale; grad_ptr may be logits_ptr."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * stride
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr)
    scale = tl.where(label == ignore_index, 0.0, scale)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        x = tl.load(logits_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)) * scale
        tl.store(grad_ptr + base + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _block(vocab: int) -> int:
    return min(BLOCK_V, next_pow2(vocab))


def _row_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    _ce_fwd[(rows,)](logits, labels, loss, lse, logits.stride(0), vocab, ignore_index,
                     BLOCK=_block(vocab), num_warps=row_warps(_block(vocab)))
    return loss, lse


def _row_grads(logits: torch.Tensor, out: torch.Tensor, labels: torch.Tensor,
               lse: torch.Tensor, scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    rows, vocab = logits.shape
    _ce_bwd[(rows,)](logits, out, labels, lse, scale, logits.stride(0), vocab, ignore_index,
                     BLOCK=_block(vocab), num_warps=row_warps(_block(vocab)))
    return out


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, inplace_backward):
        loss, lse = _row_losses(logits, labels, ignore_index)
        n_valid = (labels != ignore_index).sum()
        ctx.save_for_backward(logits, labels, lse, n_valid)
        ctx.ignore_index, ctx.inplace = ignore_index, inplace_backward
        return loss.sum() / n_valid

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse, n_valid = ctx.saved_tensors
        scale = (grad.float() / n_valid).reshape(1)
        out = logits if ctx.inplace else torch.empty_like(logits)
        return _row_grads(logits, out, labels, lse, scale, ctx.ignore_index), None, None, None


def _check(rows: torch.Tensor, labels: torch.Tensor, field: str) -> None:
    """`rows` [rows, width] (logits or hidden states) against labels [rows]."""
    require(rows.dim() == 2, field, f"needs [rows, width], got {tuple(rows.shape)}")
    require(labels.shape == rows.shape[:1], field.split(".")[0] + ".labels",
            f"shape {tuple(labels.shape)} does not match {rows.shape[0]} rows")
    require(not labels.is_floating_point(), field.split(".")[0] + ".labels",
            f"must be integer, got {labels.dtype}")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Mean cross-entropy of logits [rows, vocab] against labels [rows]. With
    `inplace_backward` the gradient overwrites the logits (use only when nothing else
    reads them after the loss)."""
    _check(logits, labels, "cross_entropy.logits")
    if not can_run(logits, labels):
        return cross_entropy_reference(logits, labels, ignore_index)
    return _CrossEntropy.apply(logits.contiguous(), labels.contiguous(), ignore_index,
                               inplace_backward)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
                                   ) -> torch.Tensor:
    return cross_entropy_reference(hidden @ weight.t(), labels, ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in the forward, chunk by chunk; the backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows):
        n_valid = (labels != ignore_index).sum()
        scale = (1.0 / n_valid.float()).reshape(1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, lab = hidden[start:start + chunk_rows], labels[start:start + chunk_rows]
            logits = h @ weight.t()
            loss, lse = _row_losses(logits, lab, ignore_index)
            total += loss.sum()
            g = _row_grads(logits, logits, lab, lse, scale, ignore_index)  # in place
            grad_h[start:start + chunk_rows] = g @ weight
            grad_w.addmm_(g.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad.to(grad_h.dtype), grad_w * grad.to(grad_w.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int = 4096
                         ) -> torch.Tensor:
    """Mean cross-entropy of (hidden [rows, h] @ weight [vocab, h]^T) against labels [rows],
    never holding more than `chunk_rows` rows of logits."""
    require(hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1],
            "linear_cross_entropy.weight", f"shape {tuple(weight.shape)} does not match "
            f"hidden {tuple(hidden.shape)} (needs [vocab, {hidden.shape[-1]}])")
    require(chunk_rows > 0, "linear_cross_entropy.chunk_rows",
            f"must be positive, got {chunk_rows}")
    _check(hidden, labels, "linear_cross_entropy.hidden")
    if not can_run(hidden, weight, labels):
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index)
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(),
                                     labels.contiguous(), ignore_index, chunk_rows)
