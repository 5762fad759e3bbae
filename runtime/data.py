"""Training data: the global batch of a step, the same for every plan, then this rank's part.

Synthetic by default: each sequence is an arithmetic progression modulo the vocabulary,
x_t = (a + t·d) mod V with a and d drawn per sequence, so a model can learn it and losses
fall. Or windows of a token file (a 1-D integer `.npy`, read memory-mapped). Either way
the batch of step k depends only on (seed, k), which is what makes runs under different
plans, and resumed runs, comparable token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meshplan.core.errors import SpecError

from .context import zigzag_index
from .pipeline import MicroBatch


class SyntheticData:
    def __init__(self, vocab: int, seq_len: int, global_batch: int, seed: int):
        self.vocab, self.seq_len, self.batch, self.seed = vocab, seq_len, global_batch, seed

    def global_batch(self, step: int) -> torch.Tensor:
        """[global_batch, seq_len + 1] tokens of step `step` (inputs and shifted labels)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        start = torch.randint(0, self.vocab, (self.batch, 1), generator=gen)
        stride = torch.randint(1, self.vocab, (self.batch, 1), generator=gen)
        t = torch.arange(self.seq_len + 1)[None, :]
        return (start + t * stride) % self.vocab


class TokenFile:
    def __init__(self, path: str | Path, vocab: int, seq_len: int, global_batch: int,
                 seed: int):
        try:
            self.tokens = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise SpecError("data", f"cannot read token file {path}: {err}") from None
        if self.tokens.ndim != 1 or self.tokens.dtype.kind not in "iu":
            raise SpecError("data", f"{path}: expected a 1-D integer array, got "
                            f"{self.tokens.ndim}-D {self.tokens.dtype}")
        if len(self.tokens) <= seq_len + 1:
            raise SpecError("data", f"{path}: {len(self.tokens)} tokens, fewer than one "
                            f"sequence of {seq_len + 1}")
        top = int(self.tokens.max())
        if top >= vocab:
            raise SpecError("data", f"{path}: token id {top} >= vocabulary {vocab}")
        self.seq_len, self.batch, self.seed = seq_len, global_batch, seed

    def global_batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, self.batch)
        rows = [np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))


def rank_micro_batches(batch: torch.Tensor, *, dp: int, dp_rank: int, cp: int, cp_rank: int,
                       mbs: int, device: torch.device) -> list[MicroBatch]:
    """This rank's micro-batches: rows of its dp shard, the zigzag columns of its cp rank."""
    rows = batch.shape[0] // dp
    mine = batch[dp_rank * rows:(dp_rank + 1) * rows]
    seq = batch.shape[1] - 1
    cols = zigzag_index(seq, cp, cp_rank) if cp > 1 else torch.arange(seq)
    tokens, labels = mine[:, :-1][:, cols], mine[:, 1:][:, cols]
    return [MicroBatch(tokens=tokens[i:i + mbs].to(device), labels=labels[i:i + mbs].to(device),
                       positions=cols.to(device))
            for i in range(0, rows, mbs)]
