"""A Bradley–Terry reward oracle fitted to a general preference over an enumerable response set.

For each prompt ``x`` the rewards ``r(x, ·)`` maximise the population log-likelihood of the
oracle's exact preferences under uniform pair weights (every ordered pair ``i ≠ j`` weighs the
same)::

    ℓ(r) = Σ_{i≠j} P_ij log σ(r_i − r_j),      centred so that Σ_i r_i = 0.

It is the best *reward model* of the panel in the BT family, and it cannot represent a cycle: for
any three responses ``σ(r_a − r_b)``, ``σ(r_b − r_c)`` and ``σ(r_c − r_a)`` are never all above ½.
So the paper's reward-model vs preference-model comparison can be rerun with exact metrics:
train on this oracle (``rewards`` for best-of-K/worst-of-K, or ``prob_prefers``) and evaluate
on the panel. (:func:`inpo.game.algorithms.bt_fit` fits the same model with ``π``-weighted pairs
for the tabular iterative DPO; with ``π`` uniform it agrees with :func:`fit_bt_rewards`.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from inpo.errors import ConfigError, OracleError
from inpo.oracles.base import OracleStats

__all__ = ["BTRewardOracle", "bt_log_likelihood_grad", "fit_bt_rewards"]

_VERSION = "1"


def fit_bt_rewards(p: np.ndarray, *, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """MLE rewards ``[M, N]`` (centred) for preference matrices ``p [M, N, N]``, uniform pairs.

    Newton's method on the concave log-likelihood: with ``s_ij = σ(r_i − r_j)`` the gradient is
    ``g_i = Σ_j (P_ij − s_ij)`` and the negative Hessian the graph Laplacian of
    ``W_ij = s_ij (1 − s_ij)``; its null space (a constant shift) is removed by solving with
    ``L + 11ᵀ/N``. Stops when ``max |g| < tol``. Identical matrices (prompts sharing a keyword)
    are fitted once. Needs ``0 < P_ij < 1`` off the diagonal (label noise ``ε > 0`` guarantees
    it); else the MLE does not exist and :class:`~inpo.errors.ConfigError` is raised.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ConfigError(f"preference matrices have shape {p.shape}; expected [M, N, N]")
    n = p.shape[-1]
    off = ~np.eye(n, dtype=bool)
    if ((p[:, off] <= 0) | (p[:, off] >= 1)).any():
        raise ConfigError(
            "the Bradley–Terry MLE needs 0 < P(a ≻ b) < 1 for every pair; use label noise > 0"
        )
    keys = [hashlib.sha256(np.ascontiguousarray(m).tobytes()).hexdigest() for m in p]
    unique = {k: i for i, k in reversed(list(enumerate(keys)))}
    fitted = {k: _fit_one(p[i], tol, max_iter) for k, i in unique.items()}
    return np.stack([fitted[k] for k in keys])


def _fit_one(p: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    n = p.shape[-1]
    r = np.zeros(n)
    ones = np.full((n, n), 1.0 / n)
    for _ in range(max_iter):
        s = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))
        g = np.sum(p - s, axis=1)
        if np.abs(g).max() < tol:
            return r
        w = s * (1.0 - s)
        lap = np.diag(w.sum(axis=1)) - w
        r = r + np.linalg.solve(lap + ones, g)
        r -= r.mean()
    raise ConfigError(f"the Bradley–Terry fit did not converge in {max_iter} Newton steps")


def bt_log_likelihood_grad(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``∂ℓ/∂r_i = Σ_j (P_ij − σ(r_i − r_j))`` (per unit pair weight), shape ``[M, N]``.

    Zero at the MLE (``P_ij + P_ji = 1`` makes the two orders of a pair combine to this).
    """
    p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
    s = 1.0 / (1.0 + np.exp(-(r[..., :, None] - r[..., None, :])))
    return np.sum(p - s, axis=-1)


class BTRewardOracle:
    """Rewards and BT preferences ``P(a ≻ b) = σ(r(x, a) − r(x, b))`` from a fitted table.

    Implements both :class:`inpo.selection.RewardOracle` (``rewards``) and
    :class:`inpo.oracles.base.PreferenceOracle` (``prob_prefers``), with ``stats`` and
    ``oracle_id``.

    Args:
        rewards: ``[M, N]`` rewards, one row per prompt.
        prompts: the ``M`` prompts.
        responses: the ``N`` enumerable responses (shared by every prompt).
        source_id: the ``oracle_id`` of the preference the rewards were fitted to.

    A response outside the enumerable set (e.g. a sampled sequence longer than ``max_len``)
    gets its prompt's *lowest* reward: it ranks with the worst enumerable response. Such
    lookups are counted in ``stats.extra["outside_set"]``. An unknown prompt raises
    :class:`~inpo.errors.OracleError`.
    """

    def __init__(
        self,
        rewards: np.ndarray,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        source_id: str,
    ) -> None:
        r = np.asarray(rewards, dtype=np.float64)
        if r.shape != (len(prompts), len(responses)):
            raise ConfigError(
                f"rewards have shape {r.shape}; expected ({len(prompts)}, {len(responses)})"
            )
        self.table = r
        self.prompts = list(prompts)
        self.responses = list(responses)
        self._prompt_index = {x: i for i, x in enumerate(self.prompts)}
        self._response_index = {y: j for j, y in enumerate(self.responses)}
        self._floor = r.min(axis=1)
        self.stats = OracleStats(extra={"outside_set": 0})
        digest = hashlib.sha256(
            json.dumps([source_id, self.prompts, self.responses]).encode("utf-8")
        ).hexdigest()[:16]
        self.oracle_id = f"bt-fit-v{_VERSION}:{digest}"

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``r(x_i, y_i)``, float64 ``[n]``."""
        if len(prompts) != len(responses):
            raise OracleError(f"rewards got {len(prompts)} prompts and {len(responses)} responses")
        out = np.empty(len(prompts))
        for k, (x, y) in enumerate(zip(prompts, responses)):
            m = self._prompt_index.get(x)
            if m is None:
                raise OracleError(f"BTRewardOracle has no rewards for prompt {x!r}")
            j = self._response_index.get(y)
            if j is None:
                self.stats.extra["outside_set"] += 1
                out[k] = self._floor[m]
            else:
                out[k] = self.table[m, j]
        return out

    def prob_prefers(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        """``σ(r(x, a) − r(x, b))``, float64 ``[n]``."""
        n = len(prompts)
        if len(responses_a) != n or len(responses_b) != n:
            raise OracleError(
                f"prob_prefers got {n} prompts, {len(responses_a)} responses_a and "
                f"{len(responses_b)} responses_b; they must have the same length"
            )
        diff = self.rewards(prompts, responses_a) - self.rewards(prompts, responses_b)
        self.stats.queries += n
        self.stats.backend_calls += 1
        return np.exp(-np.logaddexp(0.0, -diff))

    def matrix(self, prompt: str) -> np.ndarray:
        """The BT preference matrix ``[N, N]`` of ``prompt`` over the enumerable responses."""
        m = self._prompt_index.get(prompt)
        if m is None:
            raise OracleError(f"BTRewardOracle has no rewards for prompt {prompt!r}")
        r = self.table[m]
        return np.exp(-np.logaddexp(0.0, -(r[:, None] - r[None, :])))
