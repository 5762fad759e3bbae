"""The validation report: a markdown table, the summary, and a predicted-vs-measured plot."""

from __future__ import annotations

from .compare import Row, overlap_savings


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def markdown(rows: list[Row], plans: list[str], summary: dict, title: str) -> str:
    lines = [f"# {title}", "",
             "| plan | predicted step s | des step s | measured step s | host steal | error | "
             "des error | predicted MiB | measured MiB | error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, plan in zip(rows, plans, strict=True):
        mem = "-" if r.measured_memory_bytes is None else f"{r.measured_memory_bytes / 2**20:.1f}"
        des = "-" if r.predicted_des_step_s is None else f"{r.predicted_des_step_s:.4f}"
        steal = "-" if r.measured_steal is None else f"{r.measured_steal:.0%}"
        lines.append(f"| {r.name} (`{plan}`) | {r.predicted_step_s:.4f} | {des} | "
                     f"{r.measured_step_s:.4f} | {steal} | {_pct(r.step_error)} | "
                     f"{_pct(r.des_step_error)} | {r.predicted_memory_bytes / 2**20:.1f} | "
                     f"{mem} | {_pct(r.memory_error)} |")
    s = summary
    lines += ["", f"- step time: mean |error| {s['step_time_mape']:.1%}, "
              f"max {s['step_time_max_ape']:.1%}",
              f"- peak memory: mean |error| "
              f"{'-' if s['memory_mape'] is None else format(s['memory_mape'], '.1%')}, max "
              f"{'-' if s['memory_max_ape'] is None else format(s['memory_max_ape'], '.1%')}",
              f"- Kendall tau (step time ranks): "
              f"{'-' if s['kendall_tau'] is None else format(s['kendall_tau'], '.3f')}",
              *([f"- event engine: step time mean |error| {s['step_time_mape_des']:.1%}, max "
                 f"{s['step_time_max_ape_des']:.1%}, Kendall tau "
                 f"{'-' if s['kendall_tau_des'] is None else format(s['kendall_tau_des'], '.3f')}"]
                if "step_time_mape_des" in s else []),
              *([f"- the hypervisor stole {s['host_steal_mean']:.0%} of the host CPUs' time "
                 f"on average during the timed steps; against the measured steps less their "
                 f"stolen share, step time mean |error| {s['step_time_mape_unstolen']:.1%}, "
                 f"max {s['step_time_max_ape_unstolen']:.1%}"]
                if "host_steal_mean" in s else []),
              f"- predicted fastest {s['predicted_fastest']}, measured fastest "
              f"{s['measured_fastest']}: the predicted pick is {s['fastest_gap']:.1%} slower"]
    return "\n".join(lines + _savings(rows, s)) + "\n"


def _savings(rows: list[Row], s: dict) -> list[str]:
    """What overlap saved, where a plan ran beside its twin without overlap."""
    savings = overlap_savings(rows)
    if not savings:
        return []

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.1f}"

    lines = ["", "| overlap saved (ms) | measured | predicted | des |", "|---|---:|---:|---:|"]
    lines += [f"| {v.name} | {ms(v.measured_s)} | {ms(v.predicted_s)} | "
              f"{ms(v.predicted_des_s)} |" for v in savings]
    des = s.get("overlap_saving_mae_des")
    lines += ["", f"- overlap saved: mean |predicted - measured| {s['overlap_saving_mae']:.1%} "
              f"of the step" + ("" if des is None else f", event engine {des:.1%}")]
    return lines


def scatter(rows: list[Row], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    xs = [r.measured_step_s for r in rows]
    ys = [r.predicted_step_s for r in rows]
    ax.scatter(xs, ys)
    for r in rows:
        ax.annotate(r.name, (r.measured_step_s, r.predicted_step_s), fontsize=7)
    lo, hi = min(xs + ys) * 0.8, max(xs + ys) * 1.25
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title("meshplan validate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
