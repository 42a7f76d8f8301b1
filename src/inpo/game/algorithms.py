"""Exact (planning) updates of INPO and its peers on tabular games (SPEC "INPO", "The peers").

Every update maps ``π_t`` to ``π_{t+1}`` given the game ``P [M, N, N]`` and the reference
``π_ref [M, N]``, in log space (float64). Every algorithm is called with the same two numbers,
``eta`` and ``tau``, the INPO paper's: ``τ`` is the KL strength of the game being solved and
``1/η`` the step size. How each peer's own hyper-parameters are derived from them:

================  ===========================================================================
``inpo``          ``π_{t+1} ∝ π_ref^{r} π_t^{1−r} exp(P(·≻π_t)/η)``, ``r = τ/η`` (SPEC).
``online_ipo``    INPO with ``τ = η``... on the game's ``τ``: ``π_{t+1} ∝ π_ref exp(P(·≻π_t)/τ)``
                  (IPO with ``β = τ`` on fresh samples of ``π_t``; exact population optimum).
``sppo``          multiplicative weights ``π_{t+1} ∝ π_t exp(P(·≻π_t)/η)`` (``η_s = η``; ignores
                  ``τ``); equals INPO with ``τ = 0`` ("INPO without KL").
``nash_md``       Munos et al.: mixture ``π^μ ∝ π_t^{1−β} π_ref^{β}``, then
                  ``π_{t+1} ∝ π^μ exp(P(·≻π^μ)/η)``, with Munos' step ``1/η`` and ``β = τ/η``.
``mmd``           magnetic mirror descent: ``π_{t+1} ∝ (π_t π_ref^{τ/η} e^{P(·≻π_t)/η})^{1/(1+τ/η)}``.
``extragradient`` mirror-prox on the ``mmd`` step: a half step against ``π_t``, then the full
                  step from ``π_t`` against ``π_{t+1/2}``.
``comal``         COMAL's outer loop: solve the ``τ``-regularised game exactly with reference
                  ``π_ref^{(k)}``, then ``π_ref^{(k+1)} ←`` its solution (a proximal point
                  method on the unregularised game).
``dpo``           iterative DPO: fit a Bradley–Terry reward ``r̂`` to the oracle's labels on
                  pairs from ``π_t × π_t`` (weighted MLE), then the DPO optimum
                  ``π_{t+1} ∝ π_ref exp(r̂/β)`` with ``β = τ``.
``ipo``           iterative IPO under the same BT assumption: labels replaced by the fitted
                  ``σ(r̂_y − r̂_{y'})``, then IPO's optimum ``π_{t+1} ∝ π_ref exp(P̂(·≻π_t)/β)``.
================  ===========================================================================

Stable range (INPO, ``mmd``): linearised at ``π*`` the INPO map on logits is
``(1 − r) I + A S/η`` (``A = P − ½``, ``S = diag π* − π*π*ᵀ``), whose eigenvalues are
``(1 − r) ± iλ/η`` with ``λ`` the singular values of the skew matrix ``S^{½} A S^{½}``. So the
iteration converges linearly iff ``λ_max² < τ (2η − τ)``; since ``‖S‖ ≤ ½``,
``η ≥ ‖A‖₂ / (2 √(r(2 − r)))`` suffices (with ``τ = η/3``: ``η ≥ 0.67 ‖A‖₂``).
:func:`inpo_local_rate` computes the exact local rate. The paper's LLM default ``η = 0.005``
is far outside this range on a tabular game (steps of ``e^{200}``): there it cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from inpo.errors import did_you_mean
from inpo.game.exact import _TINY, _p, _pi, duality_gap, exploitability, regularized_nash, win_rates

__all__ = [
    "ALGORITHMS",
    "NOISY",
    "SCHEDULES",
    "Trajectory",
    "bt_fit",
    "comal_step",
    "dpo_step",
    "extragradient_step",
    "inpo_local_rate",
    "inpo_step",
    "ipo_step",
    "mmd_step",
    "nash_md_step",
    "online_ipo_step",
    "run_algorithm",
    "schedule_eta",
    "sppo_step",
]


def _normalize(logits: np.ndarray) -> np.ndarray:
    return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))


def _log(pi: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(pi, _TINY))


def _prep(p, pi, ref):
    p = _p(p)
    return p, np.asarray(_pi(pi, p)), np.asarray(_pi(ref, p))


def _check(eta: float, tau: float) -> None:
    if not (np.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be > 0, got {eta!r}")
    if not (np.isfinite(tau) and 0 <= tau <= eta):
        raise ValueError(f"tau must satisfy 0 <= tau <= eta ({eta!r}), got {tau!r}")


def inpo_step(p, pi, ref, *, eta: float, tau: float, noise=None) -> np.ndarray:
    """``π_{t+1} ∝ π_ref^{τ/η} · π_t^{1−τ/η} · exp(P(y ≻ π_t)/η)`` (SPEC, INPO exact update).
    ``noise`` ``[M, N]`` is added to the win rates (an estimate's error; see ``run_algorithm``)."""
    p, pi, ref = _prep(p, pi, ref)
    _check(eta, tau)
    r = tau / eta
    return _normalize(r * _log(ref) + (1 - r) * _log(pi) + _wr(p, pi, noise) / eta)


def _wr(p, opponent, noise):
    w = win_rates(p, opponent)
    return w if noise is None else w + noise


def online_ipo_step(p, pi, ref, *, eta: float, tau: float, noise=None) -> np.ndarray:
    """``π_{t+1} ∝ π_ref exp(P(y ≻ π_t)/τ)``: INPO with ``η = τ`` (``r = 1``)."""
    p, pi, ref = _prep(p, pi, ref)
    if not tau > 0:
        raise ValueError("online_ipo needs tau > 0 (it is IPO with beta = tau)")
    return _normalize(_log(ref) + _wr(p, pi, noise) / tau)


def sppo_step(p, pi, ref, *, eta: float, tau: float = 0.0, noise=None) -> np.ndarray:
    """Multiplicative weights ``π_{t+1} ∝ π_t exp(P(y ≻ π_t)/η)`` (SPPO's exact update)."""
    p, pi, ref = _prep(p, pi, ref)
    _check(eta, 0.0)
    return _normalize(_log(pi) + _wr(p, pi, noise) / eta)


def nash_md_step(p, pi, ref, *, eta: float, tau: float) -> np.ndarray:
    """Nash-MD: ``π^μ ∝ π_t^{1−β} π_ref^{β}``, ``π_{t+1} ∝ π^μ exp(P(y ≻ π^μ)/η)``, ``β = τ/η``."""
    p, pi, ref = _prep(p, pi, ref)
    _check(eta, tau)
    beta = tau / eta
    mix = _normalize((1 - beta) * _log(pi) + beta * _log(ref))
    return _normalize(_log(mix) + win_rates(p, mix) / eta)


def _mmd(p, pi, opponent, ref, eta, tau, noise=None):
    r = tau / eta
    return _normalize((_log(pi) + r * _log(ref) + _wr(p, opponent, noise) / eta) / (1 + r))


def mmd_step(p, pi, ref, *, eta: float, tau: float, noise=None) -> np.ndarray:
    """Magnetic mirror descent: ``π_{t+1} ∝ (π_t π_ref^{τ/η} exp(P(·≻π_t)/η))^{1/(1+τ/η)}``."""
    p, pi, ref = _prep(p, pi, ref)
    _check(eta, tau)
    return _mmd(p, pi, pi, ref, eta, tau, noise)


def extragradient_step(p, pi, ref, *, eta: float, tau: float) -> np.ndarray:
    """Mirror-prox (EGPO / Nash mirror-prox): half step vs ``π_t``, full step vs ``π_{t+1/2}``."""
    p, pi, ref = _prep(p, pi, ref)
    _check(eta, tau)
    half = _mmd(p, pi, pi, ref, eta, tau)
    return _mmd(p, pi, half, ref, eta, tau)


def comal_step(p, pi, ref, *, eta: float, tau: float) -> np.ndarray:
    """One COMAL outer step: the exact ``τ``-regularised Nash with reference ``π_t``."""
    if not tau > 0:
        raise ValueError("comal needs tau > 0 (the inner regularised game)")
    return regularized_nash(p, pi, tau)


def bt_fit(p, pi, *, ridge: float = 0.0, max_iter: int = 100) -> np.ndarray:
    """Bradley–Terry rewards ``[M, N]`` fitted to the oracle's labels on pairs from ``π × π``.

    Maximises ``Σ_{i,j} π_i π_j P_ij log σ(r_i − r_j) − ridge·‖r‖²/2`` (the population
    likelihood of labels ``y_i ≻ y_j`` drawn with probability ``P_ij``) by Newton's method;
    rewards are centred (``Σ r = 0``). With ``ridge = 0`` the MLE exists when every
    ``π_i > 0`` and ``0 < P_ij < 1``; give a small ridge otherwise.
    """
    p = _p(p)
    pi = _pi(pi, p)
    m, n = pi.shape
    w = pi[:, :, None] * pi[:, None, :]
    c = w * p  # weight of the label "i beats j"
    r = np.zeros((m, n))
    eye = np.eye(n)
    for _ in range(max_iter):
        s = 1.0 / (1.0 + np.exp(-(r[:, :, None] - r[:, None, :])))  # σ(r_i − r_j)
        # d/dr_i of Σ c_ij log σ(r_i − r_j): Σ_j (c_ij − (c_ij + c_ji) σ_ij)
        tot = c + np.swapaxes(c, 1, 2)
        grad = np.sum(c - tot * s, axis=2) - ridge * r
        h = tot * s * (1 - s)  # symmetric Hessian weights (pairs counted once per order)
        hess = h - np.eye(n) * h.sum(axis=2, keepdims=True) - ridge * eye
        hess = hess - 1e-12 * eye  # strictly negative definite on the centred subspace
        # Newton step on the subspace Σ r = 0 (the likelihood is invariant to shifts).
        proj = eye - 1.0 / n
        step = np.linalg.solve(proj @ -hess @ proj + np.ones((n, n)) / n, (grad @ proj)[..., None])
        r = r + step[..., 0]
        r -= r.mean(axis=-1, keepdims=True)
        if np.abs(grad).max() < 1e-12:
            break
    return r


def dpo_step(p, pi, ref, *, eta: float, tau: float, ridge: float = 1e-8) -> np.ndarray:
    """Iterative DPO's population optimum: ``π_{t+1} ∝ π_ref exp(r̂_t/β)`` with ``β = τ``."""
    p, pi, ref = _prep(p, pi, ref)
    if not tau > 0:
        raise ValueError("dpo needs tau > 0 (beta = tau)")
    return _normalize(_log(ref) + bt_fit(p, pi, ridge=ridge) / tau)


def ipo_step(p, pi, ref, *, eta: float, tau: float, ridge: float = 1e-8) -> np.ndarray:
    """Iterative IPO under a BT fit: ``π_{t+1} ∝ π_ref exp(P̂_BT(y ≻ π_t)/β)``, ``β = τ``."""
    p, pi, ref = _prep(p, pi, ref)
    if not tau > 0:
        raise ValueError("ipo needs tau > 0 (beta = tau)")
    r = bt_fit(p, pi, ridge=ridge)
    p_bt = 1.0 / (1.0 + np.exp(-(r[:, :, None] - r[:, None, :])))
    return _normalize(_log(ref) + win_rates(p_bt, pi) / tau)


#: name → (update, one-line description). All take ``(p, pi, ref, *, eta, tau)``.
ALGORITHMS: dict[str, tuple[Callable[..., np.ndarray], str]] = {
    "inpo": (inpo_step, "INPO exact update (SPEC)"),
    "online_ipo": (online_ipo_step, "online IPO: INPO with r = 1 (beta = tau)"),
    "sppo": (sppo_step, "SPPO / multiplicative weights (INPO without KL)"),
    "nash_md": (nash_md_step, "Nash-MD (Munos et al. 2023)"),
    "mmd": (mmd_step, "magnetic mirror descent"),
    "extragradient": (extragradient_step, "extragradient / mirror-prox"),
    "comal": (comal_step, "COMAL outer loop (exact inner solve)"),
    "dpo": (dpo_step, "iterative DPO (Bradley–Terry fit, beta = tau)"),
    "ipo": (ipo_step, "iterative IPO (Bradley–Terry fit, beta = tau)"),
}


@dataclass
class Trajectory:
    """Per-iteration metrics of one algorithm, averaged over prompts (index t = after update t+1).

    With ``average=True``, ``avg_gap``/``avg_exploitability`` are the same metrics of the uniform
    mixture ``(π_1 + … + π_{t+1}) / (t+1)`` of the iterates so far (INPO's Theorem 3 bounds its
    duality gap); ``etas`` are the ``η`` each update used (see ``schedule``)."""

    algorithm: str
    gap: list[float]
    exploitability: list[float]
    policy: np.ndarray  # the last iterate [M, N]
    initial_gap: float
    initial_exploitability: float
    avg_gap: list[float] | None = None
    avg_exploitability: list[float] | None = None
    etas: list[float] | None = None


#: Algorithms whose update takes ``noise`` on its win rates (``run_algorithm(noise=...)``).
NOISY = frozenset({"inpo", "online_ipo", "sppo", "mmd"})

#: ``η`` schedules: ``constant`` (``η`` every update) and ``decay``, INPO's Theorem 4
#: ``η_t = τ (t + 2) / 2`` for update ``t = 0, 1, …`` (so ``τ/η_t = 2/(t + 2)``: the first update
#: is the regularised best-response-like step ``r = 1``, later ones lean on ``π_t``), under which
#: the last iterate's ``KL(π* ‖ π_T)`` is ``O(1/T)``.
SCHEDULES = ("constant", "decay")


def schedule_eta(schedule: str, t: int, *, eta: float, tau: float) -> float:
    """The ``η`` of update ``t`` (0-based) under ``schedule`` (:data:`SCHEDULES`)."""
    if schedule == "constant":
        return eta
    if schedule == "decay":
        if not tau > 0:
            raise ValueError("the decay schedule eta_t = tau (t + 2) / 2 needs tau > 0")
        return tau * (t + 2) / 2
    raise ValueError(f"unknown schedule '{schedule}' (known: {', '.join(SCHEDULES)})")


def run_algorithm(
    name: str,
    p: np.ndarray,
    ref=None,
    *,
    eta: float,
    tau: float,
    iterations: int,
    init=None,
    callback: Callable[[int], None] | None = None,
    schedule: str = "constant",
    average: bool = False,
    noise: float = 0.0,
    seed: int = 0,
    ref_update_every: int | None = None,
) -> Trajectory:
    """Iterate algorithm ``name`` from ``init`` (default ``π_ref``) and record, after each update,
    the duality gap of the ``τ``-regularised game with the *original* ``π_ref`` and the
    unregularised exploitability (means over prompts). ``schedule``: the ``η`` of each update
    (:func:`schedule_eta`); ``average``: also the metrics of the iterates' uniform mixture;
    ``noise``: the standard deviation of Gaussian noise added to the win rates ``P(y ≻ π_t)`` of
    every update (a sampled oracle's estimation error; seeded by ``seed``; for the algorithms in
    :data:`NOISY`), under which INPO's Theorem 4 rate is the one observed (``O(1/T)`` with the
    ``decay`` schedule, a noise floor with a constant ``η``). ``ref_update_every = R``: the
    reference the update sees (the anchor of COMAL, the magnet of MPO) is replaced by the
    current iterate after every ``R`` updates, as ``inpo run algorithm=comal|mpo`` does; the
    metrics stay those of the game with the original ``π_ref``."""
    if ref_update_every is not None and ref_update_every < 1:
        raise ValueError(f"ref_update_every must be >= 1, got {ref_update_every}")
    if noise and name not in NOISY:
        raise ValueError(f"noise is supported for {', '.join(sorted(NOISY))}, not '{name}'")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    if name not in ALGORITHMS:
        hint = did_you_mean(name, ALGORITHMS)
        raise ValueError(f"unknown algorithm '{name}' (known: {', '.join(ALGORITHMS)}){hint}")
    step = ALGORITHMS[name][0]
    p = _p(p)
    ref = np.array(_pi(ref, p))
    pi = np.array(_pi(init, p)) if init is not None else ref.copy()
    anchor = ref
    gaps, expl, etas = [], [], []
    avg_gaps: list[float] | None = [] if average else None
    avg_expl: list[float] | None = [] if average else None
    total = np.zeros_like(pi)
    g0 = float(duality_gap(p, pi, ref, tau).mean())
    e0 = float(exploitability(p, pi).mean())
    for t in range(iterations):
        eta_t = schedule_eta(schedule, t, eta=eta, tau=tau)
        extra = {"noise": noise * rng.standard_normal(pi.shape)} if noise else {}
        pi = step(p, pi, anchor, eta=eta_t, tau=tau, **extra)
        if ref_update_every is not None and (t + 1) % ref_update_every == 0:
            anchor = pi.copy()
        etas.append(eta_t)
        gaps.append(float(duality_gap(p, pi, ref, tau).mean()))
        expl.append(float(exploitability(p, pi).mean()))
        if average:
            total += pi
            mix = total / (t + 1)
            avg_gaps.append(float(duality_gap(p, mix, ref, tau).mean()))
            avg_expl.append(float(exploitability(p, mix).mean()))
        if callback is not None:
            callback(t)
    return Trajectory(name, gaps, expl, pi, g0, e0, avg_gaps, avg_expl, etas)


def inpo_local_rate(p, ref=None, *, eta: float, tau: float) -> np.ndarray:
    """Exact local linear rate ``[M]`` of the INPO iteration at ``π*`` (< 1 means it converges).

    ``ρ = max |eig((1 − r) I + A S/η)|`` on the tangent space, ``r = τ/η`` (module docstring).
    """
    _check(eta, tau)
    if tau == 0:
        raise ValueError("the local rate is defined at the regularised Nash: tau > 0")
    p = _p(p)
    ref = _pi(ref, p)
    star = regularized_nash(p, ref, tau)
    n = star.shape[-1]
    s = star[:, :, None] * np.eye(n) - star[:, :, None] * star[:, None, :]
    jac = (1 - tau / eta) * np.eye(n) + np.einsum("mij,mjk->mik", p - 0.5, s) / eta
    eig = np.linalg.eigvals(jac)
    # The all-ones direction (a logit shift) is an eigenvector with eigenvalue 1 − r and no effect
    # on π; it never dominates because |1 − r| ≤ every other |eig| (they are (1−r) ± iλ/η).
    return np.abs(eig).max(axis=-1)
