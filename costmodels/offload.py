"""What an offloading choice costs: bytes on each tier in each phase, and phase times.

The model the offloading LP (`planner.offload`) optimises and the simulators charge for a
plan that offloads (`offload=layers`). Per unit i (a transformer layer, or the
embedding/head) of one GPU's shard: W, G, O the bytes of its 16-bit weights, gradients
and optimizer states, P its parameters, A the activations one micro-batch saves and K
what full recompute keeps; fractions of each state on GPU, host and NVMe, and of the
activations kept, sent to the host or recomputed. Forward/backward takes the longer of
its compute and its transfers (weights off the GPU streamed in for each micro-batch's
forward and backward, offloaded activations out and back, offloaded gradients out per
micro-batch; PCIe each way, and NVMe); the optimizer step the longest of the GPU's update,
the host's update of the rest, the upload of what the host updated and the NVMe reads and
writes (ZeRO-Offload, Ren et al. 2021 §4; ZeRO-Infinity, Rajbhandari et al. 2021 §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshplan.core.errors import require

TIERS = ("gpu", "cpu", "nvme")
STATES = ("weights", "grads", "optimizer")
PHASES = ("forward/backward", "optimizer")


@dataclass(frozen=True, kw_only=True)
class OffloadUnit:
    name: str
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    params: float  # parameters this GPU updates for the unit
    act_bytes: float  # saved by one micro-batch without recompute
    ckpt_bytes: float  # kept by one micro-batch under full recompute
    fwd_s: float  # one micro-batch
    bwd_s: float


@dataclass(frozen=True, kw_only=True)
class OffloadProblem:
    units: tuple[OffloadUnit, ...]
    micro_batches: int
    inflight: float  # micro-batches whose activations are alive at the peak
    gpu_bytes: float  # HBM left for states, activations and stream buffers
    cpu_bytes: float  # host memory for this GPU
    nvme_bytes: float
    pcie_bytes_per_s: float  # per direction
    nvme_bytes_per_s: float
    gpu_update_s_per_param: float
    cpu_update_s_per_param: float

    def __post_init__(self) -> None:
        require(len(self.units) > 0, "offload.units", "no units")
        require(self.micro_batches >= 1 and self.inflight > 0, "offload",
                f"micro-batches {self.micro_batches}, in flight {self.inflight}")
        for name in ("pcie_bytes_per_s", "gpu_update_s_per_param", "cpu_update_s_per_param"):
            require(getattr(self, name) > 0, f"offload.{name}",
                    f"must be > 0, got {getattr(self, name)}")

    @property
    def stream_buffer_bytes(self) -> float:
        """Two layers' weights: the one computing and the one being fetched."""
        return 2 * max(u.weight_bytes for u in self.units)


@dataclass(frozen=True, kw_only=True, eq=False)
class OffloadSolution:
    """Fractions per unit: `states[s]` [units, 3] over TIERS for s in STATES, `acts`
    [units, 3] over (keep, host, recompute)."""

    states: dict[str, np.ndarray]
    acts: np.ndarray
    fb_s: float
    optimizer_s: float
    solve_s: float = 0.0

    @property
    def step_s(self) -> float:
        return self.fb_s + self.optimizer_s


@dataclass(frozen=True, kw_only=True)
class Quantised:
    """What the runtime runs: per unit, state on the host (FSDP CPU offload) or not, and
    recompute on or off."""

    host: tuple[bool, ...]
    recompute: tuple[bool, ...]


# ---- the model of a solution (shared by the LP's check, quantisation and tests) --------

def tier_bytes(pr: OffloadProblem, sol: OffloadSolution) -> dict[tuple[str, str], float]:
    """Bytes each tier holds in each phase."""
    u = pr.units
    size = {"weights": np.array([x.weight_bytes for x in u]),
            "grads": np.array([x.grad_bytes for x in u]),
            "optimizer": np.array([x.optimizer_bytes for x in u])}
    held = {t: sum(float(sol.states[s][:, k] @ size[s]) for s in STATES)
            for k, t in enumerate(TIERS)}
    act = np.array([x.act_bytes for x in u]) * pr.inflight
    ckpt = np.array([x.ckpt_bytes for x in u]) * pr.inflight
    streams = bool(sol.states["weights"][:, 1:].sum() > 1e-9)
    on_gpu_fb = (held["gpu"] + float(sol.acts[:, 0] @ act) + float(sol.acts[:, 2] @ ckpt)
                 + (pr.stream_buffer_bytes if streams else 0.0))
    host_acts = float(sol.acts[:, 1] @ act)
    return {("forward/backward", "gpu"): on_gpu_fb, ("optimizer", "gpu"): held["gpu"],
            ("forward/backward", "cpu"): held["cpu"] + host_acts,
            ("optimizer", "cpu"): held["cpu"],
            ("forward/backward", "nvme"): held["nvme"], ("optimizer", "nvme"): held["nvme"]}


def _col(pr: OffloadProblem, attr: str) -> np.ndarray:
    return np.array([getattr(x, attr) for x in pr.units])


def _over(nbytes: float, rate: float) -> float:
    return nbytes / rate if rate else (0.0 if nbytes == 0 else float("inf"))


def capacity(pr: OffloadProblem, tier: str) -> float:
    return {"gpu": pr.gpu_bytes, "cpu": pr.cpu_bytes, "nvme": pr.nvme_bytes}[tier]


def phase_times(pr: OffloadProblem, sol: OffloadSolution) -> tuple[float, float]:
    """(forward/backward, optimizer) seconds of a solution, by the LP's own rules."""
    a = sol.acts
    fwd, bwd = _col(pr, "fwd_s"), _col(pr, "bwd_s")
    compute = pr.micro_batches * float((fwd + bwd + a[:, 2] * fwd).sum())
    return max(compute, transfer_s(pr, sol)), optimizer_phase_s(pr, sol)


def transfer_s(pr: OffloadProblem, sol: OffloadSolution) -> float:
    """Forward/backward's busiest link: PCIe to the GPU, PCIe to the host, or NVMe."""
    m = pr.micro_batches
    w, g, a = sol.states["weights"], sol.states["grads"], sol.acts
    wb, gb, ab = _col(pr, "weight_bytes"), _col(pr, "grad_bytes"), _col(pr, "act_bytes")
    up = float(2 * m * (w[:, 1] + w[:, 2]) @ wb + m * a[:, 1] @ ab)
    down = float(m * a[:, 1] @ ab + m * (g[:, 1] + g[:, 2]) @ gb)
    return max(up / pr.pcie_bytes_per_s, down / pr.pcie_bytes_per_s,
               _over(float(2 * m * w[:, 2] @ wb + 2 * m * g[:, 2] @ gb), pr.nvme_bytes_per_s))


def optimizer_phase_s(pr: OffloadProblem, sol: OffloadSolution) -> float:
    """The GPU's and the host's updates side by side, the upload of what the host
    updated, NVMe reads and writes of the states there."""
    w, o = sol.states["weights"], sol.states["optimizer"]
    wb, ob, params = _col(pr, "weight_bytes"), _col(pr, "optimizer_bytes"), _col(pr, "params")
    off = o[:, 1] + o[:, 2]
    return max(float(o[:, 0] @ params) * pr.gpu_update_s_per_param,
               float(off @ params) * pr.cpu_update_s_per_param,
               float(off @ wb) / pr.pcie_bytes_per_s,
               _over(float(2 * o[:, 2] @ ob + w[:, 2] @ wb), pr.nvme_bytes_per_s))


def runtime_solution(pr: OffloadProblem, q: Quantised) -> OffloadSolution:
    """The fractions of a per-layer choice (all of a unit's state on the GPU or on the
    host; its activations kept or recomputed), with its phase times."""
    n = len(pr.units)
    tier = np.array([[0.0, 1.0, 0.0] if h else [1.0, 0.0, 0.0] for h in q.host])
    acts = np.array([[0.0, 0.0, 1.0] if r else [1.0, 0.0, 0.0] for r in q.recompute])
    sol = OffloadSolution(states={s: tier.copy() for s in STATES}, acts=acts.reshape(n, 3),
                          fb_s=0.0, optimizer_s=0.0)
    fb, opt = phase_times(pr, sol)
    return OffloadSolution(states=sol.states, acts=sol.acts, fb_s=fb, optimizer_s=opt)
