"""A softmax-table policy trained with the *same* ``inpo.losses`` functions as language models.

This is how the LM loss code is held to the exact update (SPEC check 2): the policy is a table of
logits ``θ [M, N]`` (``log π = log_softmax θ``), pairs are drawn from ``π_t`` and labelled by the
preference matrix, and the loss is whatever :class:`inpo.losses.LossSpec` the caller names — the
batch columns it declares (``ref_*``, ``prev_*``, ``*_winrates``) are filled from the table, just
as the precompute stage fills them for a language model.

* :func:`population_pairs` — every ordered pair ``(y_w, y_l) = (i, j)`` with its exact probability
  ``π_t(i) π_t(j) P(i ≻ j)`` (sampling two responses, then labelling them).
* :func:`sampled_pairs` — ``n`` pairs drawn from ``π_t`` and labelled by a Bernoulli draw of ``P``,
  or chosen by the INPO tournament on ``K`` samples (``selection="tournament"``).
* :func:`fit_table_policy` — minimise the weighted mean loss over ``θ`` (float64 L-BFGS to
  machine precision). On the population pairs, INPO's minimiser is the exact update
  (Lemma 5): the tests check it to 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inpo.game.exact import _TINY, _p, _pi
from inpo.losses import LossSpec, get_loss
from inpo.selection import tournament

__all__ = ["Pairs", "fit_table_policy", "population_pairs", "sampled_iteration", "sampled_pairs"]


@dataclass
class Pairs:
    """Preference pairs over a table: prompt index, chosen and rejected response, weight [n]."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    weight: np.ndarray
    ties: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt)


def population_pairs(p: np.ndarray, pi_t: np.ndarray) -> Pairs:
    """All ordered pairs with weight ``π_t(i) π_t(j) P(i ≻ j)`` (normalised per prompt)."""
    p = _p(p)
    pi_t = _pi(pi_t, p)
    m, n = pi_t.shape
    mm, ii, jj = np.meshgrid(np.arange(m), np.arange(n), np.arange(n), indexing="ij")
    w = pi_t[:, :, None] * pi_t[:, None, :] * p
    keep = (ii != jj).reshape(-1)
    return Pairs(
        mm.reshape(-1)[keep], ii.reshape(-1)[keep], jj.reshape(-1)[keep], w.reshape(-1)[keep] / m
    )


def sampled_pairs(
    p: np.ndarray,
    pi_t: np.ndarray,
    num_pairs: int,
    rng: np.random.Generator,
    *,
    selection: str = "random",
    k: int = 8,
) -> Pairs:
    """Pairs from ``π_t`` labelled by sampling the matrix (``num_pairs`` per prompt).

    ``selection="random"``: two independent samples, label ``y ≻ y'`` with probability
    ``P(y ≻ y')``. ``selection="tournament"``: ``K`` samples per draw, the INPO tournament of
    :mod:`inpo.selection` with hard labels sampled from ``P`` (a draw whose final comparison
    does not confirm the pair yields no pair). Identical responses make no pair.
    """
    p = _p(p)
    pi_t = _pi(pi_t, p)
    m, n = pi_t.shape
    prompts, chosen, rejected = [], [], []
    for x in range(m):
        if selection == "random":
            a = rng.choice(n, size=num_pairs, p=pi_t[x])
            b = rng.choice(n, size=num_pairs, p=pi_t[x])
            a_wins = rng.random(num_pairs) < p[x, a, b]
            w = np.where(a_wins, a, b)
            ell = np.where(a_wins, b, a)
            keep = w != ell
            prompts += [x] * int(keep.sum())
            chosen += list(w[keep])
            rejected += list(ell[keep])
        elif selection == "tournament":
            oracle = _SampledTableOracle(p[x], rng)
            for _ in range(num_pairs):
                ys = rng.choice(n, size=k, p=pi_t[x])
                res = tournament(oracle, str(x), [str(y) for y in ys])
                if res[0] is not None and ys[res[0]] != ys[res[1]]:
                    prompts.append(x)
                    chosen.append(int(ys[res[0]]))
                    rejected.append(int(ys[res[1]]))
        else:
            raise ValueError(f"unknown selection '{selection}' (random, tournament)")
    cnt = len(prompts)
    return Pairs(
        np.asarray(prompts, dtype=int),
        np.asarray(chosen, dtype=int),
        np.asarray(rejected, dtype=int),
        np.full(cnt, 1.0 / max(cnt, 1)),
    )


class _SampledTableOracle:
    """Hard binary labels drawn from a preference matrix (responses named by their index)."""

    def __init__(self, p: np.ndarray, rng: np.random.Generator):
        self.p, self.rng = p, rng
        self.oracle_id = "sampled-table"

    def prob_prefers(self, prompts, responses_a, responses_b) -> np.ndarray:
        a = np.array([int(s) for s in responses_a])
        b = np.array([int(s) for s in responses_b])
        return (self.rng.random(len(a)) < self.p[a, b]).astype(np.float64)


def _columns(
    spec: LossSpec, logp: torch.Tensor, pairs: Pairs, ref: np.ndarray, pi_t: np.ndarray, winrates
):
    x = torch.as_tensor(pairs.prompt)
    c = torch.as_tensor(pairs.chosen)
    r = torch.as_tensor(pairs.rejected)
    log_ref = torch.as_tensor(np.log(np.maximum(ref, _TINY)))
    log_prev = torch.as_tensor(np.log(np.maximum(pi_t, _TINY)))
    batch = {
        "policy_chosen_logps": logp[x, c],
        "policy_rejected_logps": logp[x, r],
        "ref_chosen_logps": log_ref[x, c],
        "ref_rejected_logps": log_ref[x, r],
        "prev_chosen_logps": log_prev[x, c],
        "prev_rejected_logps": log_prev[x, r],
        "chosen_lengths": torch.ones(len(pairs), dtype=torch.float64),
        "rejected_lengths": torch.ones(len(pairs), dtype=torch.float64),
    }
    if pairs.ties is not None:
        batch["ties"] = torch.as_tensor(pairs.ties)
    if spec.needs_winrates:
        wr = torch.as_tensor(winrates)
        batch["chosen_winrates"] = wr[x, c]
        batch["rejected_winrates"] = wr[x, r]
    return batch


def fit_table_policy(
    loss: str | LossSpec,
    pairs: Pairs,
    ref: np.ndarray,
    pi_t: np.ndarray,
    *,
    init: np.ndarray | None = None,
    winrates: np.ndarray | None = None,
    max_iter: int = 500,
    **hparams: float,
) -> np.ndarray:
    """Minimise ``Σ_k weight_k · loss_k(θ)`` over softmax-table logits ``θ [M, N]``; return ``π_θ``.

    ``loss`` names a :data:`inpo.losses.LOSSES` entry (or is a :class:`LossSpec`); ``hparams``
    are its hyper-parameters. ``init`` defaults to ``π_t`` (training starts from the previous
    iterate's weights, as in the LM pipeline).
    """
    spec = get_loss(loss) if isinstance(loss, str) else loss
    ref = np.asarray(ref, dtype=np.float64)
    pi_t = np.asarray(pi_t, dtype=np.float64)
    start = np.log(np.maximum(pi_t if init is None else init, _TINY))
    theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    weight = torch.as_tensor(pairs.weight, dtype=torch.float64)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, dim=-1)
        out = spec(_columns(spec, logp, pairs, ref, pi_t, winrates), **hparams)
        value = torch.sum(weight * out[0])
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(theta, dim=-1).numpy()


def sampled_iteration(
    p: np.ndarray,
    pi_t: np.ndarray,
    ref: np.ndarray,
    *,
    eta: float,
    tau: float,
    num_pairs: int | None = None,
    rng: np.random.Generator | None = None,
    selection: str = "random",
    k: int = 8,
) -> np.ndarray:
    """One INPO iteration on a table with ``inpo.losses.inpo_loss``: exact expectations when
    ``num_pairs`` is ``None``, else ``num_pairs`` sampled pairs a prompt."""
    p = _p(p)
    pi_t = np.array(_pi(pi_t, p))
    ref = np.array(_pi(ref, p))
    if num_pairs is None:
        pairs = population_pairs(p, pi_t)
    else:
        pairs = sampled_pairs(
            p, pi_t, num_pairs, rng or np.random.default_rng(0), selection=selection, k=k
        )
    return fit_table_policy("inpo", pairs, ref, pi_t, eta=eta, tau=tau)
