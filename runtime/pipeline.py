"""Run one training step of a pipeline rank by walking its action list in the schedule IR.

`F`/`B` run a model chunk forward/backward on one micro-batch; where the schedule splits
backward (ZB-H1), `B` computes the gradient of the chunk's input only and `W` the weight
gradients from what B kept (torch.distributed.pipelining's `stage_backward_input` and
`stage_backward_weight`: B records the gradients reaching the nodes between the input's
path and each weight, W finishes from there without redoing B's work). A pipeline's first
stage has no input gradient to send, so its whole backward runs at W, as in torch's own
zero-bubble schedules. DualPipe runs two pipelines in opposite directions over two copies
of the blocks; a paired F and B run one after the other here (the pairing is where a GPU
implementation overlaps one's communication with the other's compute), and the twin
copies' gradients are summed by the reducer (`train.grad_reducer`). `SF`/`SB` send activations
or gradients on (non-blocking, waited for at `RG`); `RF`/`RB` receive them (blocking);
`RG` finishes the gradient reduction outside FSDP (`grads.py`); `OPT` ends the step (the
caller steps the optimizer). Messages carry a tag made of (stage, micro-batch,
direction), so sends never need to be matched in order and any schedule that
`schedule.execute` accepts runs here. Given a `trace` list, the rank appends each action
with its start and end (`time.perf_counter`, one clock for every process of a machine):
what `validate.mechbench` reads a running pipeline's message latency from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from meshplan.core.schedule import Action, PipelineSchedule, splits_backward

from .grads import GradReducer


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [mbs, s_local]
    labels: torch.Tensor  # [mbs, s_local]
    positions: torch.Tensor  # [s_local] global positions of the local tokens


@dataclass
class StepState:
    inputs: dict = field(default_factory=dict)  # (stage, mb) -> received activation
    outputs: dict = field(default_factory=dict)  # (stage, mb) -> output or scaled loss
    grads: dict = field(default_factory=dict)  # (stage, mb) -> received output gradient
    deferred: dict = field(default_factory=dict)  # (stage, mb) -> what W needs from B
    sends: list = field(default_factory=list)
    loss_sum: float = 0.0


@dataclass(kw_only=True)
class PipelineRank:
    chunks: dict[int, nn.Module]  # virtual stage -> model chunk on this rank
    schedule: PipelineSchedule
    pp_rank: int
    peer: Callable[[int], int]  # pipeline rank -> global rank
    act_shape: tuple[int, ...]  # activation between stages [mbs, s_local, h]
    act_dtype: torch.dtype
    device: torch.device
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    grads: GradReducer
    trace: list[tuple[Action, float, float]] | None = None  # (action, start s, end s)

    def step(self, micro: list[MicroBatch]) -> float:
        """Run the step; returns the sum over micro-batches of this rank's mean losses
        (non-zero only on the last stage)."""
        st = StepState()
        for a in self.schedule.actions[self.pp_rank]:
            t0 = time.perf_counter()
            self._run(a, st, micro)
            if self.trace is not None:
                self.trace.append((a, t0, time.perf_counter()))
        return st.loss_sum

    @cached_property
    def split(self) -> bool:
        return splits_backward(self.schedule)

    @cached_property
    def last_backward(self) -> dict[int, int]:
        """Stage -> the micro-batch of its last weight-gradient pass on this rank (B, or W
        where backward is split): the chunk's gradients are final after it."""
        kind = "W" if self.split else "B"
        return {a.stage: a.microbatch for a in self.schedule.actions[self.pp_rank]
                if a.kind == kind}

    def _run(self, a: Action, st: StepState, micro: list[MicroBatch]) -> None:
        key = (a.stage, a.microbatch)
        sched = self.schedule
        first, last = sched.is_first(a.stage), sched.is_last(a.stage)
        if a.kind == "RF":
            buf = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
            dist.recv(buf, self._peer_of(a.stage - 1), tag=self._tag(a.stage, a.microbatch, 0))
            st.inputs[key] = buf.requires_grad_()
        elif a.kind == "F":
            mb = micro[a.microbatch]
            x = mb.tokens if first else st.inputs[key]
            out = self.chunks[a.stage](x, mb.positions)
            if last:
                loss = self.loss_fn(out, mb.labels)
                st.loss_sum += loss.item()
                out = loss / len(micro)
            st.outputs[key] = out
        elif a.kind == "SF":
            st.sends.append(dist.isend(st.outputs[key].detach().contiguous(),
                                       self._peer_of(a.stage + 1),
                                       tag=self._tag(a.stage + 1, a.microbatch, 0)))
        elif a.kind == "RB":
            buf = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
            dist.recv(buf, self._peer_of(a.stage + 1), tag=self._tag(a.stage, a.microbatch, 1))
            st.grads[key] = buf
        elif a.kind == "B":
            out = st.outputs.pop(key)
            grad = None if last else st.grads.pop(key)
            if not self.split:
                self._arm(a)
                torch.autograd.backward(out, grad)
            elif first:
                st.deferred[key] = (out, grad)
            else:
                _, groups = stage_backward_input([out], None if grad is None else [grad],
                                                 [st.inputs[key]],
                                                 self.chunks[a.stage].parameters())
                st.deferred[key] = groups
        elif a.kind == "W":
            last = self._arm(a)
            chunk = self.chunks[a.stage]
            if first:
                torch.autograd.backward(*st.deferred.pop(key))
            else:
                stage_backward_weight(chunk.parameters(), st.deferred.pop(key))
            if last:  # W writes .grad itself, past the reducer's accumulation hooks
                self.grads.chunk_final(a.stage)
        elif a.kind == "SB":
            grad = st.inputs.pop(key).grad
            st.sends.append(dist.isend(grad.contiguous(), self._peer_of(a.stage - 1),
                                       tag=self._tag(a.stage - 1, a.microbatch, 1)))
        elif a.kind == "RG":
            for work in st.sends:
                work.wait()
            self.grads.finish()

    def _arm(self, a: Action) -> bool:
        last = a.microbatch == self.last_backward[a.stage]
        self.grads.arm(a.stage, self.chunks[a.stage], last)
        return last

    def _peer_of(self, stage: int) -> int:
        """Global rank of the pipeline rank holding a virtual stage (of this rank's dp,
        cp and tp coordinates)."""
        return self.peer(self.schedule.rank_of(stage))

    def _tag(self, stage: int, microbatch: int, direction: int) -> int:
        return (stage * self.schedule.n_microbatches + microbatch) * 2 + direction
