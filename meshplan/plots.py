"""Plots written by the CLI (matplotlib, headless)."""

from __future__ import annotations

from meshplan.planner.whatif import WhatIfRow


def whatif_plot(rows: list[WhatIfRow], path: str) -> None:
    """Best tokens/s per variant as bars; variants without a plan show as empty bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["\n".join(f"{k}={v}" for k, v in r.knobs.items()) for r in rows]
    values = [r.result.best.tokens_per_s if r.result else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.5))
    ax.bar(range(len(rows)), values, color="#3a6ea5")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("best plan, tokens/s")
    ax.set_title("meshplan what-if")
    for i, r in enumerate(rows):
        if r.result is None:
            ax.text(i, 0, "no plan", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_COLOURS = {"F": "#3a6ea5", "B": "#c0504d", "W": "#9bbb59", "OPT": "#7f7f7f",
            "tp": "#8064a2", "cp": "#4bacc6", "ep": "#f79646", "pp": "#2c4d75",
            "dp": "#d19a00", "offload": "#666666"}


def timeline_plot(run, path: str, max_ranks: int = 16) -> None:
    """One row per simulated rank: compute actions (forward, backward, weight gradients,
    optimizer) and, thinner below them, the communication that rank's streams carry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = min(len(run.ranks), max_ranks)
    fig, ax = plt.subplots(figsize=(12, 0.55 * ranks + 1.2))
    bars: dict[tuple[int, str, bool], list[tuple[float, float]]] = {}
    for s in run.spans:
        if s.rank >= ranks or s.end_s <= s.start_s:
            continue
        if s.stream == "compute":
            key = "OPT" if s.name == "OPT" else "".join(c for c in s.name if c.isalpha())
        else:
            key = s.stream
        bars.setdefault((s.rank, key, s.stream == "compute"), []).append(
            (s.start_s, s.end_s - s.start_s))
    lanes: dict[int, list[str]] = {}  # a rank's communication streams, a thin lane each
    for rank, key, compute in sorted(bars):
        if not compute:
            lanes.setdefault(rank, []).append(key)
    for (rank, key, compute), spans in sorted(bars.items()):
        y = ranks - 1 - rank
        if compute:
            box = (y + 0.35, 0.6)
        else:
            height = 0.25 / len(lanes[rank])
            box = (y + 0.05 + height * (len(lanes[rank]) - 1 - lanes[rank].index(key)), height)
        ax.broken_barh(spans, box, color=_COLOURS.get(key, "#999999"),
                       edgecolor="white" if compute else None, lw=0.3)
    ax.set_yticks([ranks - 1 - i + 0.5 for i in range(ranks)], run.ranks[:ranks], fontsize=8)
    ax.set_xlabel("seconds")
    plan = run.result.plan.to_text()
    ax.set_title(f"meshplan des: {plan} — step {run.result.step_time_s:.3f} s", fontsize=9)
    handles = [matplotlib.patches.Patch(color=c, label=k) for k, c in _COLOURS.items()]
    fig.legend(handles=handles, ncol=10, fontsize=7, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))  # 0.3 in for the legend
    fig.savefig(path, dpi=120)
    plt.close(fig)
