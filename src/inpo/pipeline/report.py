"""``metrics.jsonl`` and the Markdown report with PNG plots (metric per iteration per algorithm)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOT_METRICS", "plot_metrics", "write_metrics", "write_report"]

#: Metrics plotted when present: (key, label, log-scale).
PLOT_METRICS = (
    ("duality_gap", "duality gap (regularised game)", True),
    ("exploitability", "exploitability", True),
    ("pool_duality_gap", "duality gap on the answer pool", False),
    ("win_rate_vs_ref", "win rate vs π_ref", False),
    ("lc_win_rate_vs_ref", "LC win rate vs π_ref", False),
    ("kl_to_ref", "KL(π_t ‖ π_ref)", False),
    ("mean_length", "mean response length", False),
    ("oracle_queries_total", "oracle queries (cumulative)", False),
)


def write_metrics(run_dir: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``metrics.jsonl`` atomically (one object per iteration and algorithm)."""
    path = Path(run_dir) / "metrics.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def plot_metrics(rows: Sequence[dict[str, Any]], path: Path, title: str) -> list[str]:
    """One panel per metric, one line per algorithm; returns the metrics plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [m for m in PLOT_METRICS if any(r.get(m[0]) is not None for r in rows)]
    if not keys:
        return []
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    # a distinct (colour, marker, dash) per algorithm: 20 colours, then the styles cycle
    colors = plt.get_cmap("tab20").colors
    styles = {
        alg: {
            "color": colors[(2 * i) % 20 + (i // 10) % 2],
            "marker": "osD^v<>p*h"[i % 10],
            "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4],
        }
        for i, alg in enumerate(algorithms)
    }
    for ax, (key, label, log) in zip(axes.flat, keys):
        for alg in algorithms:
            pts = sorted(
                (
                    (r["iteration"], r[key], r.get(INTERVALS.get(key, "")))
                    for r in rows
                    if r["algorithm"] == alg and r.get(key) is not None
                ),
                key=lambda p: p[0],
            )
            if pts:
                xs, ys, _ = zip(*pts)
                ax.plot(xs, ys, label=alg, markersize=5, **styles[alg])
                bars = [(x, y, ci) for x, y, ci in pts if _interval(ci)]
                if bars:  # the 95% interval over prompts, as error bars
                    bx, by, bci = zip(*bars)
                    low = [max(0.0, y - ci[0]) for y, ci in zip(by, bci, strict=True)]
                    high = [max(0.0, ci[1] - y) for y, ci in zip(by, bci, strict=True)]
                    ax.errorbar(
                        bx, by, yerr=[low, high], fmt="none", capsize=3, alpha=0.7,
                        color=styles[alg]["color"],
                    )  # fmt: skip
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log and all(r.get(key, 1) > 0 for r in rows if r.get(key) is not None):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if len(algorithms) > 6:  # one legend beside the panels, not over the first one
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
        fig.subplots_adjust(right=0.86)
    else:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 1) if len(algorithms) > 6 else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [k for k, _, _ in keys]


def _interval(value: Any) -> bool:
    """Whether ``value`` is a ``[low, high]`` pair of numbers."""
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if _interval(value):  # a 95% interval, rounded as its estimate is
        return f"[{value[0]:.4g}, {value[1]:.4g}]"
    return "" if value is None else str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


#: What the console shows after each iteration: (key, label, lower is better?).
SUMMARY = (
    ("duality_gap", "duality gap", True),
    ("exploitability", "exploitability", True),
    ("pool_duality_gap", "pool duality gap", True),
    ("win_rate_vs_ref", "win rate vs π_ref", False),
    ("lc_win_rate_vs_ref", "LC win rate vs π_ref", False),
    ("kl_to_ref", "KL(π ‖ π_ref)", None),
    ("mean_length", "mean length", None),
    ("oracle_queries", "oracle queries", None),
    ("pairs", "pairs", None),
    ("train_loss", "train loss", True),
)


#: The metrics that come with a 95% interval (bootstrapped over prompts), and its key.
INTERVALS = {
    "win_rate_vs_ref": "win_rate_ci",
    "lc_win_rate_vs_ref": "lc_win_rate_ci",
    "kl_to_ref": "kl_to_ref_ci",
    "pool_duality_gap": "pool_duality_gap_ci",
}


def iteration_summary(rows: Sequence[dict[str, Any]]) -> str:
    """A short table of the newest iteration's metrics, the previous row's and the change."""
    now, before = rows[-1], rows[-2] if len(rows) > 1 else {}
    lines = [f"iteration {now.get('iteration')} ({now.get('algorithm')}):"]
    width = max(len(label) for _, label, _ in SUMMARY)
    lines.append(f"  {'':{width}}  {'before':>10}  {'now':>10}  {'change':>10}")
    for key, label, lower_better in SUMMARY:
        if now.get(key) is None:
            continue
        value, prev = now[key], before.get(key)
        change = ""
        if isinstance(value, int | float) and isinstance(prev, int | float):
            delta = value - prev
            change = f"{delta:+.4g}"
            if lower_better is not None and delta != 0:
                change += " ✓" if (delta < 0) == lower_better else " ✗"
        extra = ""
        if now.get(INTERVALS.get(key, "")):
            lo, hi = now[INTERVALS[key]]
            extra = f"  [{lo:.3g}, {hi:.3g}]" if key == "kl_to_ref" else f"  [{lo:.3f}, {hi:.3f}]"
        row = f"  {label:{width}}  {_fmt(prev):>10}  {_fmt(value):>10}  {change:>10}{extra}"
        lines.append(row.rstrip())
    seconds = now.get("seconds")
    if isinstance(seconds, dict) and seconds:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if v is not None)
        total = sum(v for v in seconds.values() if v is not None)
        lines.append(f"  seconds: {total:.1f} ({parts})")
    return "\n".join(lines)


def run_summary(rows: Sequence[dict[str, Any]], seconds: float) -> str:
    """The end of a run in a few lines: each headline metric from π_0 to the last iterate."""
    first, last = rows[0], rows[-1]
    lines = [
        f"done: {last.get('algorithm')}, {last.get('iteration')} iteration(s) in {seconds:.1f}s"
        f", {last.get('oracle_queries_total', 0)} oracle queries"
    ]
    for key, label, _ in SUMMARY[:6]:
        a, b = first.get(key), last.get(key)
        if not (isinstance(a, int | float) and isinstance(b, int | float)):
            continue
        ratio = f"  ({b / a:.2f}× π_0's)" if key == "duality_gap" and a > 0 else ""
        ci = last.get("win_rate_ci") if key == "win_rate_vs_ref" else None
        interval = f"  95% [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(f"  {label:18}  {_fmt(a):>8} → {_fmt(b):<8}{ratio}{interval}".rstrip())
    return "\n".join(lines)


COLUMNS = (
    "algorithm",
    "iteration",
    "duality_gap",
    "exploitability",
    "win_rate_vs_ref",
    "win_rate_ci",
    "lc_win_rate_vs_ref",
    "lc_win_rate_ci",
    "kl_to_ref",
    "kl_to_ref_ci",
    "mean_length",
    "mass_outside",
    "oracle_queries",
    "oracle_queries_total",
    "pairs",
    "train_loss",
)


def write_report(
    run_dir: Path, rows: Sequence[dict[str, Any]], cfg: Any, *, title: str = ""
) -> Path:
    """``report.md`` with a summary, the per-iteration table and ``plots/metrics.png``."""
    run_dir = Path(run_dir)
    title = (
        title or f"inpo run: {getattr(cfg, 'algorithm', '')} on task '{getattr(cfg, 'task', '')}'"
    )
    plotted = plot_metrics(rows, run_dir / "plots" / "metrics.png", title)
    lines = [f"# {title}", ""]
    if cfg is not None and hasattr(cfg, "seed"):
        tau = getattr(cfg, "tau_value", None)
        lines += [
            f"Seed {cfg.seed}; eta = {cfg.eta:g}, tau = {tau:g}, beta = {cfg.beta:g}; "
            f"K = {cfg.generate.k}; {cfg.iterations} iteration(s). Iteration 0 is the starting "
            "policy before any training. The resolved config is `config.yaml`.",
            "",
        ]
    first = {}
    last = {}
    for r in rows:
        first.setdefault(r["algorithm"], r)
        last[r["algorithm"]] = r
    if any("duality_gap" in r for r in rows):
        lines.append("## Summary")
        lines.append("")
        for alg, r in last.items():
            g0, g1 = first[alg].get("duality_gap"), r.get("duality_gap")
            if g0 is not None and g1 is not None and g0 > 0:
                lines.append(
                    f"- **{alg}**: exact duality gap {g0:.4g} → {g1:.4g} after "
                    f"{r['iteration']} iteration(s) ({g1 / g0:.2f}× π_0's), "
                    f"{r.get('oracle_queries_total', 0)} oracle queries."
                )
        lines.append("")
    if plotted:
        lines += ["![metrics per iteration](plots/metrics.png)", ""]
    lines += ["## Per iteration", "", table(rows, COLUMNS), ""]
    timed = [r for r in rows if isinstance(r.get("seconds"), dict)]
    if timed:
        stages = ("generate", "annotate", "logps", "train", "evaluate")
        flat = [
            {"algorithm": r["algorithm"], "iteration": r["iteration"], **r["seconds"]}
            for r in timed
        ]
        lines += ["## Seconds per stage", "", table(flat, ("algorithm", "iteration", *stages)), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
