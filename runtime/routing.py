"""Record the router's choices while training: the routing trace `place-experts` reads.

A forward hook on every MoE layer of this rank's model chunks keeps each call's top-k
expert ids. With pp = 1 and no activation recomputation (which would run the routers
again in backward) every rank routes the same tokens through every MoE layer once, so
the calls stack into `topk_ids` [MoE layers, tokens, k] (`core.routing`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .model import MoE


class RoutingRecorder:
    def __init__(self, chunks: dict[int, nn.Module]):
        self.calls: list[list[torch.Tensor]] = []
        for _, chunk in sorted(chunks.items()):
            for module in chunk.modules():
                if isinstance(module, MoE):
                    self.calls.append([])
                    module.register_forward_hook(self._hook(self.calls[-1]))

    @staticmethod
    def _hook(calls: list[torch.Tensor]):
        def hook(module: MoE, _inputs, _output) -> None:
            assert module.last_expert_ids is not None
            calls.append(module.last_expert_ids.cpu())
        return hook

    def topk_ids(self) -> np.ndarray:
        return np.stack([torch.cat(calls).numpy() for calls in self.calls])

    def save(self, path: str) -> None:
        np.savez_compressed(path, topk_ids=self.topk_ids())
