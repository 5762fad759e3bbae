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
