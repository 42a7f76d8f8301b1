"""Benchmark-grade judging statistics: clustered bootstrap intervals, AlpacaEval 2's
length-controlled win rate, Arena-Hard-style Bradley–Terry scores (SPEC "Evaluation").

Every function is a pure function of NumPy arrays of judged preferences ``p_i = P(model ≻
baseline | x_i) ∈ [0, 1]`` (ties are ½), so each is testable in closed form and shared by
``inpo eval`` and ``inpo run task=prompts``.

- :func:`cluster_bootstrap`: a percentile interval that resamples *prompts* (clusters), not
  answers: the K answers of one prompt are not independent, and an interval that treats them as
  independent (Wilson's over all ``nK`` answers) is too narrow.
- :func:`length_controlled_win_rate`: Dubois et al. 2024 (AlpacaEval 2 LC, arXiv 2404.04475):
  the judge's preference modelled as ``σ(θ + φ tanh(Δlen / std(Δlen)) + ψ γ_x)`` (``θ`` the
  model-vs-baseline term, ``Δlen`` the model's minus the baseline's answer length in
  characters, ``γ_x`` an optional per-instruction difficulty), fitted by maximum likelihood on
  the soft preferences; the LC win rate is the mean prediction with the length term at zero.
  With one model against one baseline, ``θ`` is the model identity term of the paper's GLM.
  The ``alpaca-eval`` package fits the same model with L1 regularisation chosen by 5-fold
  cross-validation; ``benchmarks/lc_win_rate.py`` records the difference on the same
  annotations.
- :func:`bradley_terry_scores`: Arena-Hard-Auto's scores: BT strengths fitted to the battles of
  every model against the baseline (the baseline's strength fixed at 0), reported as the win
  rate against the baseline they imply, ``100 σ(θ_m)``, with intervals bootstrapped over prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "bradley_terry_scores",
    "cluster_bootstrap",
    "length_controlled_win_rate",
    "win_rate_summary",
]


def _clusters(keys: Sequence[Any]) -> list[np.ndarray]:
    index: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        index.setdefault(k if isinstance(k, str | int | float | tuple) else repr(k), []).append(i)
    return [np.asarray(v) for v in index.values()]


def _resamples(n: int, clusters: Sequence[Any], samples: int, seed: int):
    """``samples`` bootstrap draws of row indices, whole clusters drawn with replacement."""
    groups = _clusters(clusters) if len(clusters) else [np.arange(n)]
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        pick = rng.integers(0, len(groups), size=len(groups))
        yield np.concatenate([groups[g] for g in pick])


def cluster_bootstrap(
    stat: Callable[[np.ndarray], float],
    n: int,
    clusters: Sequence[Any],
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over bootstrap samples that draw whole clusters
    (``clusters[i]``: the prompt of row ``i``) with replacement. ``stat`` gets the row indices
    of one sample (rows of a cluster drawn twice appear twice)."""
    values = np.array([stat(i) for i in _resamples(n, clusters, samples, seed)])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _fit_logistic(x: np.ndarray, p: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Weights ``w`` maximising ``Σ p log σ(xw) + (1 − p) log σ(−xw) − ridge |w|²`` (soft
    labels; a tiny ridge keeps a separable fit finite)."""
    from scipy.optimize import minimize
    from scipy.special import expit

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        ll = p * -np.logaddexp(0, -z) + (1 - p) * -np.logaddexp(0, z)
        grad_z = p - expit(z)  # (1 / (1 + exp(−z)) overflows for z ≪ 0 on the way)
        return -ll.sum() + ridge * w @ w, -(x.T @ grad_z) + 2 * ridge * w

    out = minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B")
    return out.x


def length_controlled_win_rate(
    pref: np.ndarray,
    len_model: np.ndarray,
    len_baseline: np.ndarray,
    difficulty: np.ndarray | None = None,
) -> dict[str, Any]:
    """AlpacaEval 2's length-controlled win rate (in [0, 1]) and the GLM's coefficients.

    ``pref[i]``: ``P(model ≻ baseline)`` on instruction ``i``; ``len_*``: answer lengths
    (characters, as AlpacaEval); ``difficulty``: ``γ_x`` per instruction (AlpacaEval's
    ``instruction_difficulty``), or ``None`` for the GLM without it.
    """
    pref = np.asarray(pref, dtype=np.float64)
    delta = np.asarray(len_model, dtype=np.float64) - np.asarray(len_baseline, dtype=np.float64)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    length = np.tanh(delta / std) if std > 0 else np.zeros_like(delta)
    cols = [np.ones_like(pref), length]
    if difficulty is not None:
        cols.append(np.asarray(difficulty, dtype=np.float64))
    x = np.stack(cols, axis=1)
    w = _fit_logistic(x, pref)
    x0 = x.copy()
    x0[:, 1] = 0.0  # no length difference
    lc = float(np.mean(1 / (1 + np.exp(-(x0 @ w)))))
    coef = {"model": float(w[0]), "length": float(w[1])}
    if difficulty is not None:
        coef["difficulty"] = float(w[2])
    return {"lc_win_rate": lc, "coef": coef}


def win_rate_summary(
    pref: np.ndarray,
    clusters: Sequence[Any],
    len_model: np.ndarray | None = None,
    len_baseline: np.ndarray | None = None,
    *,
    difficulty: np.ndarray | None = None,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Win rate and (given lengths) LC win rate, each with a 95% interval bootstrapped over
    ``clusters`` (prompts); in [0, 1]."""
    pref = np.asarray(pref, dtype=np.float64)
    n = len(pref)
    out: dict[str, Any] = {
        "n": n,
        "prompts": len(_clusters(clusters)),
        "win_rate": float(pref.mean()),
        "win_rate_ci": list(
            cluster_bootstrap(lambda i: pref[i].mean(), n, clusters, samples=samples, seed=seed)
        ),
    }
    if len_model is not None and len_baseline is not None:
        lm, lb = np.asarray(len_model, float), np.asarray(len_baseline, float)
        d = None if difficulty is None else np.asarray(difficulty, float)
        lc = length_controlled_win_rate(pref, lm, lb, d)

        def stat(i: np.ndarray) -> float:
            return length_controlled_win_rate(pref[i], lm[i], lb[i], None if d is None else d[i])[
                "lc_win_rate"
            ]

        out["lc_win_rate"] = lc["lc_win_rate"]
        out["lc_coef"] = lc["coef"]
        out["lc_win_rate_ci"] = list(
            cluster_bootstrap(stat, n, clusters, samples=max(100, samples // 5), seed=seed)
        )
    return out


def bradley_terry_scores(
    battles: dict[str, tuple[np.ndarray, Sequence[Any]]],
    *,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Arena-Hard-style scores of each model against the baseline.

    ``battles[model] = (pref, prompts)``: the model's judged preferences against the baseline
    and the prompt of each. The BT strengths (baseline at 0) are fitted jointly by maximum
    likelihood; a model's score is ``σ(θ_m)`` (its implied win rate against the baseline), its
    interval from bootstrap samples that redraw the prompts (each model's battles on a drawn
    prompt come along, so the models' scores stay paired)."""
    names = list(battles)
    rows = [(m, float(p), c) for m in names for p, c in zip(*battles[m])]
    prompts = [c if isinstance(c, str | int) else repr(c) for _, _, c in rows]
    x = np.zeros((len(rows), len(names)))
    for i, (m, _, _) in enumerate(rows):
        x[i, names.index(m)] = 1.0
    y = np.array([p for _, p, _ in rows])

    def fit(idx: np.ndarray) -> np.ndarray:
        return _fit_logistic(x[idx], y[idx], ridge=1e-4)

    theta = fit(np.arange(len(rows)))
    draws = np.array([fit(i) for i in _resamples(len(rows), prompts, samples, seed)])

    def sig(t: float) -> float:
        return float(1 / (1 + np.exp(-t)))

    out = {}
    for j, m in enumerate(names):
        lo, hi = np.quantile(draws[:, j], [0.025, 0.975])
        out[m] = {"theta": float(theta[j]), "score": sig(theta[j]), "score_ci": [sig(lo), sig(hi)]}
    return out
