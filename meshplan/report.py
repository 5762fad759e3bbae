"""Human-readable tables for the CLI."""

from __future__ import annotations

from meshplan.core.cluster import ClusterSpec
from meshplan.core.model import ModelSpec
from meshplan.core.results import SimResult
from meshplan.core.workload import TrainWorkload
from meshplan.planner.placement import PlacementResult
from meshplan.planner.search import SearchResult, dollars_per_million_tokens
from meshplan.planner.whatif import WhatIfRow
from meshplan.simulator.des import CATEGORIES, DesRun


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def model_table(models: list[ModelSpec]) -> str:
    rows = []
    for m in models:
        kind = f"MoE {m.moe.n_experts}x top-{m.moe.top_k}" if m.moe else "dense"
        rows.append([m.name, _count(m.params()), _count(m.params(active=True)),
                     str(m.n_layers), str(m.hidden_size), f"{m.n_heads}/{m.n_kv_heads}",
                     m.attention_kind, kind])
    return _table(["model", "params", "active", "layers", "hidden", "heads/kv", "attn", "kind"],
                  rows)


def cluster_table(clusters: list[ClusterSpec]) -> str:
    rows = []
    for c in clusters:
        d, n = c.device, c.node
        dtype = "bf16" if "bf16" in d.peak_flops_per_s else next(iter(d.peak_flops_per_s))
        rows.append([c.name, d.name, f"{d.peak_flops_per_s[dtype] / 1e12:.4g} ({dtype})",
                     f"{d.hbm_bytes / 1e9:.0f} GB", f"{d.hbm_bw_bytes_per_s / 1e12:.2f} TB/s",
                     f"{n.gpus_per_node}x {n.fabric} {n.intra_bw_bytes_per_s / 1e9:.0f} GB/s",
                     f"{n.nics_per_node}x {n.nic_bw_bytes_per_s * 8 / 1e9:.0f} Gb/s"])
    return _table(["cluster", "device", "TFLOP/s", "HBM", "HBM bw", "node", "NICs"], rows)


def sim_table(model: ModelSpec, cluster: ClusterSpec, work: TrainWorkload, r: SimResult) -> str:
    t, m = r.time, r.memory
    head = (f"{model.name} on {cluster.n_gpus}x {cluster.device.name}, seq {work.seq_len}, "
            f"batch {work.global_batch}, {work.dtype}\nplan: {r.plan.to_text()}  "
            f"(engine: {r.engine})\n")
    summary = _table(["metric", "value"], [
        ["step time", f"{r.step_time_s:.3f} s"],
        ["tokens/s", f"{r.tokens_per_s:,.0f}"],
        ["model TFLOP/s per GPU", f"{r.tflops_per_gpu:.1f}"],
        ["MFU / HFU", f"{r.mfu * 100:.1f}% / {r.hfu * 100:.1f}%"],
        ["peak memory per GPU", f"{r.peak_memory_bytes / 1e9:.1f} GB of "
                                f"{cluster.device.hbm_bytes / 1e9:.0f} GB"
                                f" ({'fits' if r.fits else 'DOES NOT FIT'})"],
    ])
    times = [[k, f"{v:.3f} s", f"{v / r.step_time_s * 100:.1f}%"] for k, v in (
        ("compute", t.compute), ("recompute", t.recompute), ("exposed comm", t.exposed_comm),
        ("pipeline bubble", t.bubble), ("offload", t.offload), ("optimizer", t.optimizer))]
    mems = [[k, f"{v / 1e9:.2f} GB"] for k, v in (
        ("weights", m.weights), ("gradients", m.gradients), ("optimizer", m.optimizer),
        ("activations", m.activations), ("kv cache", m.kv_cache), ("buffers", m.buffers))]
    return "\n\n".join([head + summary, _table(["time", "seconds", "share"], times),
                        _table(["memory", "bytes"], mems)])


def des_table(run: DesRun, links: int = 8) -> str:
    """The event engine's per-rank breakdown and its busiest links."""
    rows = [[label] + [f"{spent[k]:.3f}" for k in CATEGORIES] + [f"{sum(spent.values()):.3f}"]
            for label, spent in zip(run.ranks, run.per_rank_s, strict=True)]
    per_rank = _table(["rank", *CATEGORIES, "total s"], rows)
    busiest = sorted(run.link_utilisation.items(), key=lambda kv: -kv[1])[:links]
    util = _table(["link (tier:rank:direction)", "busy"],
                  [[k, f"{v * 100:.1f}%"] for k, v in busiest])
    return "\n\n".join([per_rank, util, f"{run.events:,} events"])


def search_table(found: SearchResult, cluster: ClusterSpec) -> str:
    rows = []
    for i, r in enumerate(found.ranked, 1):
        price = cluster.device.price_per_gpu_hour
        cost = f"{dollars_per_million_tokens(r, cluster):.2f}" if price is not None else "-"
        rows.append([str(i), r.plan.to_text(), r.engine, f"{r.tokens_per_s:,.0f}",
                     f"{r.tflops_per_gpu:.0f}", f"{r.mfu * 100:.1f}%", f"{r.step_time_s:.3f}",
                     f"{r.peak_memory_bytes / 2**30:.1f}", cost])
    s = found.stats
    head = (f"{s.enumerated:,} plans enumerated, {s.over_memory:,} pruned by memory, "
            f"{s.timed:,} timed, {s.split_refined} layer splits improved by the ILP, "
            f"{s.des_refined} re-timed by the event engine\n")
    return head + _table(["#", "plan", "engine", "tokens/s", "TFLOP/s/GPU", "MFU", "step s", "GiB",
                          "$/Mtok"], rows)


def whatif_table(rows: list[WhatIfRow]) -> str:
    out = []
    for row in rows:
        knobs = ", ".join(f"{k}={v}" for k, v in row.knobs.items())
        if row.result is None:
            out.append([knobs, "-", "-", "-", "-", row.error])
            continue
        best = row.result.best
        out.append([knobs, str(best.plan.world_size), f"{best.tokens_per_s:,.0f}",
                    f"{best.mfu * 100:.1f}%", f"{best.peak_memory_bytes / 2**30:.1f}",
                    best.plan.to_text()])
    return _table(["knobs", "GPUs", "tokens/s", "MFU", "GiB", "best plan"], out)


def measured_table(m: dict) -> str:
    """What `meshplan run` measured, beside the plan file's prediction when it has one."""
    pred = dict(m.get("predicted") or {})
    if "peak_memory_bytes" in pred:  # what training adds, as measured: less the start-up
        pred["peak_memory_bytes"] -= m.get("runtime_reserved_bytes", 0.0)
    rows = []
    for label, key, scale, unit in (("step time", "step_time_s", 1.0, "s"),
                                    ("tokens/s", "tokens_per_s", 1.0, ""),
                                    ("peak memory", "peak_memory_bytes", 2.0**-30, "GiB")):
        got = m[key] * scale
        want = pred.get(key)
        cells = [label, f"{got:.4g} {unit}".strip()]
        if want:
            want *= scale
            cells += [f"{want:.4g} {unit}".strip(), f"{(want - got) / got:+.1%}"]
        else:
            cells += ["-", "-"]
        rows.append(cells)
    losses = m["losses"]
    text = _table(["", "measured", "predicted", "error"], rows)
    text += (f"\n\n{m['steps']} steps from step {m['first_step']} ({m['warmup_steps']} warm-up "
             f"left out of timing); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    text += f"\nmemory: {m['memory_method']}; the prediction leaves out the runtime's " \
        "start-up memory"
    return text + "".join(f"\nnote: {n}" for n in m.get("notes", []))


def placement_table(result: PlacementResult) -> str:
    """The optimiser against the baselines: objective, busiest GPU over the mean, tokens
    changing node between layers."""
    rows = []
    for name, c in [("milp", result.cost), *result.baselines.items()]:
        rows.append([name, f"{c.objective_s * 1e3:.3f}", f"{c.imbalance.mean():.3f}",
                     f"{c.imbalance.max():.3f}", f"{c.cross_node_tokens.sum():,.0f}",
                     f"{int(c.moved.sum())}"])
    table = _table(["method", "objective ms", "imbalance mean", "imbalance max",
                    "cross-node tokens", "moved"], rows)
    return (f"{table}\n\nthe optimiser improved {result.layers_improved} layers in "
            f"{result.solve_s:.1f} s; lower bound {result.lower_bound_s * 1e3:.3f} ms "
            f"(gap {result.gap:.1%}, of which busiest-GPU gap {result.compute_gap:.1%})")


def placement_json(result: PlacementResult) -> dict:
    def cost(c) -> dict:
        return {"objective_s": c.objective_s, "imbalance_mean": float(c.imbalance.mean()),
                "imbalance_max": float(c.imbalance.max()),
                "cross_node_tokens": float(c.cross_node_tokens.sum()),
                "moved": int(c.moved.sum())}

    return {"method": result.placement.method, **cost(result.cost),
            "baselines": {k: cost(c) for k, c in result.baselines.items()},
            "lower_bound_s": result.lower_bound_s, "gap": result.gap,
            "compute_gap": result.compute_gap, "layers_improved": result.layers_improved,
            "solve_s": result.solve_s}
