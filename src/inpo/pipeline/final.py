"""The final policies of an ``inpo compare`` on ``task=panel``, played against each other.

After every algorithm has run, each final policy's held-out answers (its last evaluation's
``answers.jsonl``, with π_ref's beside them) give

* a **cross-play matrix**: ``M[i, j]`` the panel's mean ``P(y_i ≻ y_j)`` of policy ``i``'s
  answers against policy ``j``'s, prompt by prompt and sample by sample (π_ref a row of its
  own; the panel is exact, so both orders are the same number);
* the **pool-restricted duality gap** of every final policy and of π_ref: per prompt, the pool of
  every distinct answer any of them gave, each policy renormalised over it from its exact
  log-probabilities (:func:`inpo.pipeline.workloads.pool_metrics`).

Written to ``RUN_DIR/final.json`` and drawn in ``RUN_DIR/plots/crossplay.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["final_games", "plot_crossplay"]

REF = "π_ref"


def _answers(run_dir: Path, iterations: int) -> list[dict[str, Any]]:
    path = run_dir / f"iter_{iterations - 1:03d}" / "evaluate" / "answers.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def final_games(
    runs: dict[str, Path], iterations: int, ref: Path, panel: Any, tau: float
) -> dict[str, Any]:
    """Cross-play and pool-restricted gaps of the final policies in ``runs`` (name → run folder),
    against each other and π_ref (``ref``)."""
    from inpo.pipeline.workloads import answer_pools, pool_metrics  # deferred: loads torch, yaml

    answers = {name: _answers(folder, iterations) for name, folder in runs.items()}
    first = next(iter(answers.values()))
    answers[REF] = [{**r, "answer": r["reference_answer"], "truncated": r.get(
        "reference_truncated", False)} for r in first]  # fmt: skip
    names = list(answers)
    for name in names:  # every evaluation answered the same prompts, in the same order
        if [r["prompt"] for r in answers[name]] != [r["prompt"] for r in first]:
            raise ValueError(f"{name}: its evaluation answered other prompts than {names[0]}'s")
    m = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            p = panel.prob_prefers(
                [r["prompt"] for r in answers[a]],
                [r["answer"] for r in answers[a]],
                [r["answer"] for r in answers[b]],
            )
            m[i, j] = float(p.mean())
    rows = [
        {**r, "reference_answer": r["answer"], "reference_truncated": r.get("truncated", False)}
        for name in names
        for r in answers[name]
    ]
    models = {name: runs[name] / f"iter_{iterations - 1:03d}" / "train" / "model" for name in runs}
    models[REF] = ref
    gaps = pool_metrics(answer_pools(rows), models, REF, panel, tau)
    return {"policies": names, "crossplay": m.round(6).tolist(), "pool": gaps}


def plot_crossplay(result: dict[str, Any], path: Path, title: str) -> None:
    """The cross-play matrix as a heat map (row's win rate against column), beside each final
    policy's pool-restricted duality gap with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["policies"]
    m = np.array(result["crossplay"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
    im = ax.imshow(m, cmap="RdBu", vmin=0.3, vmax=0.7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("cross-play: P(row's answer ≻ column's)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    gap = [result["pool"][n]["pool_duality_gap"] for n in names]
    ci = [result["pool"][n]["pool_duality_gap_ci"] for n in names]
    low = [max(0.0, g - c[0]) for g, c in zip(gap, ci)]
    high = [max(0.0, c[1] - g) for g, c in zip(gap, ci)]
    bx.bar(range(len(names)), gap, yerr=[low, high], capsize=3, color="tab:blue", alpha=0.8)
    bx.set_xticks(range(len(names)), names, rotation=45, ha="right")
    bx.set_title("duality gap on the common answer pool (lower is better)", fontsize=10)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
