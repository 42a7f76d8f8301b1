"""Our length-controlled win rate against the ``alpaca-eval`` package's on the same annotations.

``inpo.evaluation.length_controlled_win_rate`` fits AlpacaEval 2's GLM by maximum likelihood;
``alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate`` fits it with L1
regularisation chosen by 5-fold cross-validation (liblinear). Both run here on synthetic
annotations whose judge prefers longer answers (a known length bias), for the package's two
GLMs that need no AlpacaEval leaderboard data: ``length_controlled_minimal`` (length + model)
and ``length_controlled_noreg`` (+ instruction difficulty). The package reads its instruction
difficulties from the hub (``df_gamed.csv``); here that file is written locally with the
synthetic difficulties (nothing is downloaded). The package imports ``pkg_resources``, which
setuptools >= 81 no longer ships: a two-function shim stands in for it.

    python benchmarks/lc_win_rate.py [--sets 5] [--out benchmarks/results/lc_win_rate.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic(seed: int, n: int = 400) -> dict[str, np.ndarray]:
    """Annotations of a judge with a length bias: ``P = σ(a + b tanh(Δ/s) + c γ_x)`` drawn as
    hard 0/1 labels (AlpacaEval's judges answer 1 or 2)."""
    rng = np.random.default_rng(seed)
    len_base = rng.integers(200, 1200, n).astype(float)
    len_model = len_base * rng.lognormal(0.2, 0.4, n)
    gamma = rng.normal(0, 1, n)
    delta = len_model - len_base
    z = -0.3 + 1.2 * np.tanh(delta / delta.std(ddof=1)) + 0.5 * gamma
    pref = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return {"pref": pref, "len_model": len_model, "len_base": len_base, "gamma": gamma}


def _shim_pkg_resources() -> None:
    if "pkg_resources" in sys.modules:
        return
    try:
        import pkg_resources  # noqa: F401

        return
    except ImportError:
        pass
    from importlib.metadata import version
    from types import SimpleNamespace

    from packaging.version import parse

    shim = types.ModuleType("pkg_resources")
    shim.parse_version = parse
    shim.get_distribution = lambda name: SimpleNamespace(version=version(name))
    sys.modules["pkg_resources"] = shim


def theirs(data: dict[str, np.ndarray], glm: str) -> float:
    """``alpaca_eval``'s LC win rate (in [0, 1]) on ``data``."""
    import pandas as pd

    _shim_pkg_resources()
    import alpaca_eval.metrics.glm_winrate as g

    n = len(data["pref"])
    folder = Path(tempfile.mkdtemp())
    gamed = pd.DataFrame({"index": range(n), "instruction_difficulty": data["gamma"], "model": "x"})
    gamed.to_csv(folder / "df_gamed.csv", index=False)
    g.hf_hub_download = lambda **_: str(folder / "df_gamed.csv")  # served locally
    df = pd.DataFrame(
        {
            "instruction": [f"q{i}" for i in range(n)],
            "output_1": ["x" * int(v) for v in data["len_base"]],
            "output_2": ["x" * int(v) for v in data["len_model"]],
            "generator_1": "baseline",
            "generator_2": "model",
            "annotator": "synthetic",
            "preference": 1.0 + data["pref"],
        }
    )
    out = g.get_length_controlled_winrate(
        df, glm_name=glm, save_weights_dir=None, is_warn_extreme_changes=False
    )
    return out["length_controlled_winrate"] / 100


def ours(data: dict[str, np.ndarray], glm: str) -> float:
    from inpo.evaluation import length_controlled_win_rate

    lm = np.floor(data["len_model"])  # the characters the package counts
    lb = np.floor(data["len_base"])
    gamma = data["gamma"] if glm == "length_controlled_noreg" else None
    return length_controlled_win_rate(data["pref"], lm, lb, gamma)["lc_win_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/lc_win_rate.md"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    t0 = time.time()
    rows, diffs = [], []
    for glm in ("length_controlled_minimal", "length_controlled_noreg"):
        for seed in range(args.sets):
            data = synthetic(seed)
            a, b = ours(data, glm), theirs(data, glm)
            diffs.append(abs(a - b))
            raw = data["pref"].mean()
            rows.append(
                f"| {glm} | {seed} | {100 * raw:.2f} | {100 * a:.2f} | {100 * b:.2f} | {100 * (a - b):+.2f} |"
            )
    from importlib.metadata import version

    import alpaca_eval  # noqa: F401 (its version, for the record)

    worst = max(diffs)
    text = [
        "# Length-controlled win rate: inpo vs the alpaca-eval package",
        "",
        f"Command: `python benchmarks/lc_win_rate.py --sets {args.sets}` (alpaca-eval "
        f"{version('alpaca-eval')}, scikit-learn {version('scikit-learn')}; load average "
        f"{load:.2f}; {time.time() - t0:.0f} s).",
        "",
        "Synthetic annotations, 400 instructions a set: a judge preferring longer answers",
        "(`P = σ(−0.3 + 1.2 tanh(Δlen/std) + 0.5 γ_x)`, hard labels). Percentages.",
        "",
        "| GLM | set | raw win rate | inpo LC | alpaca-eval LC | difference |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Largest difference: {100 * worst:.2f} points. The package's fit is L1-regularised with",
        "the strength chosen by 5-fold cross-validation, ours is the maximum-likelihood fit (a",
        "1e-6 ridge), which is where the difference comes from.",
        "",
        f"- inpo's LC within 1 point of alpaca-eval's on every set: **{'MET' if worst <= 0.01 else 'NOT MET'}**",
        "",
    ]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
