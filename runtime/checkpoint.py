"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, exact, reshardable.

The state is keyed by the model's global parameter names (layers keep their global index
on every pipeline stage), so a checkpoint written under one plan loads under another: DCP
reshards DTensor (TP/FSDP) entries, and expert weights are stored one logical expert per
key, so any expert-parallel placement finds its rows. Adam's moments (SGD's momentum)
are stored beside each parameter with the same layout. A save writes `step_N.partial/`
and renames it to `step_N/` only after every rank finished, so a killed save leaves the
previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor

from .experts import ExpertDispatch
from .model import MoE

_DONE = re.compile(r"^step_(\d+)$")


def _expert_rows(chunk: nn.Module) -> dict[str, list[int]]:
    """Stacked expert parameter name -> logical expert of each row (non-DTensor only)."""
    out = {}
    for name, mod in chunk.named_modules():
        if isinstance(mod, MoE) and not isinstance(mod.experts.w1, DTensor):
            rows = (mod.dispatch.local if isinstance(mod.dispatch, ExpertDispatch)
                    else list(range(mod.n_experts)))
            for w in ("w1", "w2", "w3"):
                out[f"{name}.experts.{w}"] = rows
    return out


def _entries(name: str, tensor: torch.Tensor, rows: dict[str, list[int]]):
    if name in rows:
        for i, e in enumerate(rows[name]):
            yield f"{name}.{e}", tensor[i]
    else:
        yield name, tensor


def state_dict(chunks: dict[int, nn.Module], optim: torch.optim.Optimizer) -> dict:
    """Views into the live parameters and Adam state: saving reads them, loading fills them."""
    out: dict[str, torch.Tensor] = {}
    for chunk in chunks.values():
        rows = _expert_rows(chunk)
        for name, p in chunk.named_parameters():
            out.update(_entries("model." + name, p.data, {"model." + k: v
                                                          for k, v in rows.items()}))
            for key, value in _optimizer_state(optim, p).items():
                if value.dim() == 0:
                    out[f"optim.{name}.{key}"] = value
                else:
                    out.update(_entries(f"optim.{name}.{key}", value,
                                        {f"optim.{k}.{key}": v for k, v in rows.items()}))
    return out


def _optimizer_state(optim: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """The state of `p`, created now if the optimizer has not stepped yet (torch creates
    it lazily), so that a load has tensors to fill."""
    st = optim.state[p]
    if not st and isinstance(optim, torch.optim.Adam):
        st["step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif not st and isinstance(optim, torch.optim.SGD):
        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return st


def save(root: str | Path, step: int, chunks, optim, kill: bool = False) -> Path:
    root = Path(root)
    partial, final = root / f"step_{step}.partial", root / f"step_{step}"
    dcp.save(state_dict(chunks, optim), checkpoint_id=str(partial))
    if kill and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die before the commit
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(partial, final)
    dist.barrier()
    return final


def latest(root: str | Path) -> tuple[int, Path] | None:
    found = [(int(m.group(1)), p) for p in Path(root).glob("step_*")
             if (m := _DONE.match(p.name)) and p.is_dir()]
    return max(found) if found else None


def load_latest(root: str | Path, chunks, optim) -> int:
    """Load the newest complete checkpoint under `root`; returns its step (0: none)."""
    found = latest(root)
    if found is None:
        return 0
    step, path = found
    dcp.load(state_dict(chunks, optim), checkpoint_id=str(path))
    return step
