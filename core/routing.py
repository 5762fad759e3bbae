"""Routing statistics of a mixture-of-experts model: what expert placement is planned from.

Per MoE layer l, `expert_tokens[l, e]` counts the tokens the router sent to expert e (a
token with top-k routing counts once for each of its k experts), and `pair_tokens[l, e,
e2]` the tokens sent to e at layer l and to e2 at layer l + 1, each of a token's k x k
pairs weighing 1/k so that a row sums to the expert's tokens (inter-layer expert
affinity; Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating
Mixture-of-Experts Model Inference", §3). They come from a routing trace (per-token top-k
expert ids per layer, as our runtime's router records them), from counts, or from
`synthetic_routing`: Zipf-skewed expert popularity (the skew seen in trained MoE routers,
e.g. DeepSeek-V3 report §2.1.2 on load balance) with a tunable affinity strength.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SpecError, require


@dataclass(frozen=True, kw_only=True, eq=False)
class RoutingStats:
    expert_tokens: np.ndarray  # [moe layers, experts], >= 0
    pair_tokens: np.ndarray | None = None  # [moe layers - 1, experts, experts], >= 0
    source: str = ""

    def __post_init__(self) -> None:
        loads = self.expert_tokens
        require(loads.ndim == 2 and loads.shape[0] >= 1 and loads.shape[1] >= 1,
                "routing.expert_tokens", f"needs shape [layers, experts], got {loads.shape}")
        _non_negative(loads, "routing.expert_tokens")
        if self.pair_tokens is not None:
            n_layers, n = loads.shape
            want = (n_layers - 1, n, n)
            require(self.pair_tokens.shape == want, "routing.pair_tokens",
                    f"needs shape {list(want)} for {n_layers} layers of {n} experts, got "
                    f"{list(self.pair_tokens.shape)}")
            _non_negative(self.pair_tokens, "routing.pair_tokens")

    @property
    def n_layers(self) -> int:
        return self.expert_tokens.shape[0]

    @property
    def n_experts(self) -> int:
        return self.expert_tokens.shape[1]

    def imbalance(self) -> np.ndarray:
        """Per layer: the busiest expert's tokens over the mean (1 is perfectly even)."""
        mean = self.expert_tokens.mean(axis=1)
        return np.where(mean > 0, self.expert_tokens.max(axis=1) / np.maximum(mean, 1e-300),
                        1.0)


def _non_negative(a: np.ndarray, field: str) -> None:
    if not np.all(np.isfinite(a)):
        raise SpecError(field, "holds NaN or infinite counts")
    if np.any(a < 0):
        idx = tuple(int(i) for i in np.argwhere(a < 0)[0])
        raise SpecError(field, f"negative count {a[idx]:g} at {list(idx)}")


def routing_from_topk(topk_ids: np.ndarray, n_experts: int, source: str = "") -> RoutingStats:
    """Statistics of a trace: `topk_ids[l, t, j]` is the j-th expert of token t at MoE
    layer l. Tokens must be the same tokens, in the same order, at every layer."""
    ids = np.asarray(topk_ids)
    require(ids.ndim == 3 and all(ids.shape), "routing.topk_ids",
            f"needs shape [layers, tokens, top_k] with none empty, got {list(ids.shape)}")
    require(np.issubdtype(ids.dtype, np.integer), "routing.topk_ids",
            f"needs integer expert ids, got dtype {ids.dtype}")
    require(n_experts >= 1, "routing.n_experts", f"must be >= 1, got {n_experts}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_experts:
        bad = lo if lo < 0 else hi
        where = [int(i) for i in np.argwhere(ids == bad)[0]]
        raise SpecError("routing.topk_ids", f"expert id {bad} at [layer, token, slot] = "
                        f"{where} is outside 0..{n_experts - 1}")
    n_layers, n_tokens, k = ids.shape
    loads = np.stack([np.bincount(ids[layer].ravel(), minlength=n_experts)
                      for layer in range(n_layers)]).astype(float)
    pairs = np.zeros((max(n_layers - 1, 0), n_experts, n_experts))
    for layer in range(n_layers - 1):
        a = np.repeat(ids[layer], k, axis=1)  # [t, k*k]: e_j repeated for each j2
        b = np.tile(ids[layer + 1], (1, k))
        flat = np.bincount((a * n_experts + b).ravel(), minlength=n_experts * n_experts)
        pairs[layer] = flat.reshape(n_experts, n_experts) / k
    return RoutingStats(expert_tokens=loads, pair_tokens=pairs, source=source)


def synthetic_routing(*, n_layers: int, n_experts: int, top_k: int, tokens: int,
                      skew: float = 1.0, affinity: float = 0.0, seed: int = 0) -> RoutingStats:
    """A seeded synthetic trace. Each layer ranks its experts in a random order and draws
    top-k experts per token without replacement with probabilities ∝ 1/rank^skew
    (Zipf; skew 0 is uniform), by the Gumbel-top-k trick. With `affinity` a, a token keeps
    a preferred path: with probability a its experts at layer l + 1 are the partners (a
    fixed random permutation of the layer) of its experts at layer l."""
    require(n_layers >= 1 and tokens >= 1, "routing", f"layers {n_layers}, tokens {tokens}")
    require(1 <= top_k <= n_experts, "routing.top_k",
            f"must be in 1..{n_experts} experts, got {top_k}")
    require(skew >= 0, "routing.skew", f"must be >= 0, got {skew}")
    require(0 <= affinity <= 1, "routing.affinity", f"must be in [0, 1], got {affinity}")
    rng = np.random.default_rng(seed)
    log_p = -skew * np.log(np.arange(1, n_experts + 1))
    ids = np.empty((n_layers, tokens, top_k), dtype=np.int64)
    for layer in range(n_layers):
        order = rng.permutation(n_experts)  # order[rank] = expert
        logits = np.empty(n_experts, dtype=np.float32)
        logits[order] = log_p
        u = rng.random((tokens, n_experts), dtype=np.float32)
        keys = logits - np.log(-np.log(np.maximum(u, 1e-30)))  # + Gumbel(0, 1) noise
        if layer and affinity > 0:
            partner = rng.permutation(n_experts)
            follow = np.nonzero(rng.random(tokens) < affinity)[0]
            for j in range(top_k):
                keys[follow, partner[ids[layer - 1, follow, j]]] = np.inf
        top = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        rank = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        ids[layer] = np.take_along_axis(top, rank, axis=1)  # first = strongest
    return routing_from_topk(ids, n_experts,
                             source=f"synthetic zipf skew {skew:g}, affinity {affinity:g}, "
                                    f"seed {seed}")
