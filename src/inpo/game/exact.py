"""Exact objects of the KL-regularised preference game (SPEC "The game").

Shapes: a game ``P`` is ``[M, N, N]`` (``M`` prompts, ``N`` responses), policies ``π`` and the
reference ``π_ref`` are ``[M, N]`` (each row a distribution). Functions accept unbatched inputs
(``[N, N]``, ``[N]``) and return batched results. Everything is float64 NumPy.

``J(π1, π2) = P(π1 ≻ π2) − τ KL(π1‖π_ref) + τ KL(π2‖π_ref)`` per prompt. With ``w = P π``
(``w_y = P(y ≻ π)``) the extrema have closed forms:

* ``max_{π1} J(π1, π) = τ log Σ_y π_ref(y) e^{w_y/τ} + τ KL(π‖π_ref)``  (attained at ``BR(π)``)
* ``min_{π2} J(π, π2) = 1 − τ log Σ_y π_ref(y) e^{w_y/τ} − τ KL(π‖π_ref)``

so ``Gap(π) = 2τ log Σ π_ref e^{w/τ} + 2τ KL(π‖π_ref) − 1``; for ``τ = 0``,
``Gap(π) = 2 max_y w_y − 1``. The unregularised exploitability is ``max_y w_y − 1/2``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

__all__ = [
    "best_response",
    "duality_gap",
    "exploitability",
    "game_value",
    "kl",
    "nash_lp",
    "regularized_nash",
    "win_rates",
]

_TINY = 1e-300


def _p(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p[None] if p.ndim == 2 else p


def _pi(pi: np.ndarray | None, p: np.ndarray) -> np.ndarray:
    if pi is None:
        return np.full(p.shape[:2], 1.0 / p.shape[-1])
    pi = np.asarray(pi, dtype=np.float64)
    pi = pi[None] if pi.ndim == 1 else pi
    return np.broadcast_to(pi, p.shape[:2])


def win_rates(p: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """``w[m, y] = P(y ≻ π | x_m) = Σ_{y'} P[m, y, y'] π[m, y']``, shape ``[M, N]``."""
    p = _p(p)
    return np.einsum("mij,mj->mi", p, _pi(pi, p))


def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``KL(a ‖ b)`` per row ``[M]`` (``0 log 0 = 0``)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    safe = a > 0
    ratio = np.where(safe, a, 1.0) / np.where(safe, np.maximum(b, _TINY), 1.0)
    return np.sum(np.where(safe, a * np.log(ratio), 0.0), axis=-1)


def game_value(p: np.ndarray, pi1: np.ndarray, pi2: np.ndarray, ref=None, tau: float = 0.0):
    """``J(π1, π2)`` per prompt ``[M]``."""
    p = _p(p)
    pi1, pi2, ref = _pi(pi1, p), _pi(pi2, p), _pi(ref, p)
    val = np.einsum("mi,mij,mj->m", pi1, p, pi2)
    if tau > 0:
        val = val - tau * kl(pi1, ref) + tau * kl(pi2, ref)
    return val


def best_response(p: np.ndarray, pi: np.ndarray, ref=None, tau: float = 0.0) -> np.ndarray:
    """``BR(π)(y) ∝ π_ref(y) exp(P(y ≻ π)/τ)``; for ``τ = 0`` uniform over the argmax set."""
    p = _p(p)
    w = win_rates(p, pi)
    if tau > 0:
        logits = np.log(np.maximum(_pi(ref, p), _TINY)) + w / tau
        return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    best = w >= w.max(axis=-1, keepdims=True) - 1e-12
    return best / best.sum(axis=-1, keepdims=True)


def duality_gap(p: np.ndarray, pi: np.ndarray, ref=None, tau: float = 0.0) -> np.ndarray:
    """``Gap(π) = max_{π1} J(π1, π) − min_{π2} J(π, π2) ≥ 0`` per prompt ``[M]`` (closed form)."""
    p = _p(p)
    pi = _pi(pi, p)
    w = win_rates(p, pi)
    if tau == 0:
        return np.maximum(2.0 * w.max(axis=-1) - 1.0, 0.0)
    ref = _pi(ref, p)
    lse = logsumexp(np.log(np.maximum(ref, _TINY)) + w / tau, axis=-1)
    return np.maximum(2.0 * tau * lse + 2.0 * tau * kl(pi, ref) - 1.0, 0.0)


def exploitability(p: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Unregularised exploitability ``max_y P(y ≻ π) − 1/2`` per prompt ``[M]``."""
    return np.maximum(win_rates(p, pi).max(axis=-1) - 0.5, 0.0)


def regularized_nash(
    p: np.ndarray,
    ref=None,
    tau: float = 0.1,
    *,
    tol: float = 1e-13,
    max_iter: int = 500,
) -> np.ndarray:
    """The unique ``τ``-regularised Nash ``π*``: ``π*(y) ∝ π_ref(y) exp(P(y ≻ π*)/τ)``.

    Solved batched by damped Newton on the logits ``z`` (``π = softmax(z)``) for the residual
    ``G(z) = z − log π_ref − (P softmax(z))/τ`` modulo constants. Its Jacobian
    ``I − (P − ½)(diag π − ππᵀ)/τ`` is similar to ``I − S^{½} A S^{½}/τ`` with ``A`` skew-symmetric,
    so its eigenvalues are ``1 ± iλ``: it is never singular and Newton is well defined. A
    backtracking (Armijo) line search on ``‖G − mean G‖²`` globalises it; each prompt keeps its
    own step. Converges quadratically; stops when the residual's max-norm is below ``tol``
    (the fixed point then holds to about ``tol`` in log space, gap ≲ 1e-12).

    Raises ``RuntimeError`` if some prompt did not converge in ``max_iter`` steps.
    """
    if not tau > 0:
        raise ValueError(f"regularized_nash needs tau > 0, got {tau!r}; use nash_lp for tau = 0")
    p = _p(p)
    ref = _pi(ref, p)
    m, n = ref.shape
    a = p - 0.5
    log_ref = np.log(np.maximum(ref, _TINY))
    eye = np.eye(n)

    def residual(z):
        pi = np.exp(z - logsumexp(z, axis=-1, keepdims=True))
        g = z - log_ref - np.einsum("mij,mj->mi", a, pi) / tau
        return pi, g - g.mean(axis=-1, keepdims=True)

    z = log_ref.copy()
    pi, r = residual(z)
    merit = np.sum(r * r, axis=-1)
    active = np.ones(m, dtype=bool)
    for _ in range(max_iter):
        active = np.abs(r).max(axis=-1) > tol
        if not active.any():
            return pi
        idx = np.flatnonzero(active)
        pa = pi[idx]
        s = pa[:, :, None] * eye - pa[:, :, None] * pa[:, None, :]
        jac = eye - np.einsum("mij,mjk->mik", a[idx], s) / tau
        d = -np.linalg.solve(jac, r[idx][..., None])[..., 0]
        step = np.ones(len(idx))
        z_a, merit_a = z[idx], merit[idx]
        for _ls in range(60):
            z_new = z_a + step[:, None] * d
            pi_new = np.exp(z_new - logsumexp(z_new, axis=-1, keepdims=True))
            g = z_new - log_ref[idx] - np.einsum("mij,mj->mi", a[idx], pi_new) / tau
            r_new = g - g.mean(axis=-1, keepdims=True)
            merit_new = np.sum(r_new * r_new, axis=-1)
            ok = merit_new <= (1.0 - 1e-4 * step) * merit_a
            ok |= merit_new <= 1e-30
            if ok.all():
                break
            step = np.where(ok, step, step * 0.5)
        z[idx], pi[idx], r[idx], merit[idx] = z_new, pi_new, r_new, merit_new
        z -= z.max(axis=-1, keepdims=True)
    if (np.abs(r).max(axis=-1) > tol * 1e3).any():
        worst = int(np.argmax(np.abs(r).max(axis=-1)))
        raise RuntimeError(
            f"regularized_nash did not converge for prompt {worst} in {max_iter} Newton steps "
            f"(residual {np.abs(r[worst]).max():.3e}, tau={tau})"
        )
    return pi


def nash_lp(p: np.ndarray) -> np.ndarray:
    """A Nash of the unregularised (``τ = 0``) game by linear programming, ``[M, N]``.

    Maximise ``v`` subject to ``P(π ≻ y_j) = (Pᵀπ)_j ≥ v`` for all ``j``, ``Σπ = 1``, ``π ≥ 0``
    (the value of the symmetric game is ``v = 1/2``). Solved per prompt with HiGHS. The Nash may
    not be unique; generic random games have a unique one.
    """
    from scipy.optimize import linprog

    p = _p(p)
    m, n = p.shape[:2]
    out = np.empty((m, n))
    c = np.zeros(n + 1)
    c[-1] = -1.0
    a_eq = np.ones((1, n + 1))
    a_eq[0, -1] = 0.0
    bounds = [(0, None)] * n + [(None, None)]
    for k in range(m):
        a_ub = np.hstack([-p[k].T, np.ones((n, 1))])
        res = linprog(
            c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0], bounds=bounds, method="highs"
        )
        if res.status != 0:
            raise RuntimeError(f"nash_lp failed for prompt {k}: {res.message}")
        x = np.maximum(res.x[:n], 0.0)
        out[k] = x / x.sum()
    return out
