"""Every ``algorithm=X``, as one record: its loss and hyper-parameters, its sampler, its pair
selection, its reference schedule (with its default), what it costs a ``compare`` budget, and
the paper and equation its LM form follows.

``inpo run``'s config, the annotate stage, the run loop and ``inpo compare`` read these records;
nothing else tests an algorithm's name. Each is INPO's squared loss (or DPO/IPO's) with its own
sampler and prior (SPEC.md, "one loss, every algorithm").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from inpo.errors import ConfigError, did_you_mean
from inpo.selection import tournament_queries

__all__ = [
    "ALGORITHMS",
    "DNO_MARGIN",
    "TIE_LOSSES",
    "Algorithm",
    "default_tau",
    "get_algorithm",
]

#: Losses that train on tie labels (``annotate.tie_policy=tie``); the others would read a tie
#: as a strict preference.
TIE_LOSSES = ("inpo", "ipo", "todo")


def default_tau(eta: float) -> float:
    """INPO's default KL strength τ = η/3 (the INPO paper's default, SPEC.md), for the run's
    ``tau`` and ``inpo train``'s ``loss.tau`` alike."""
    return eta / 3.0


#: DNO's default margin: the least win-rate gap between a kept pair's chosen and rejected.
DNO_MARGIN = 0.25

#: ``(eta, tau, beta, alpha) -> the loss's hyper-parameters``.
HParams = Callable[[float, float, float, float], dict[str, float]]


@dataclass(frozen=True)
class Algorithm:
    """What ``algorithm=NAME`` means, in one place.

    Attributes:
        name: the value of ``algorithm=``.
        loss: a key of :data:`inpo.losses.LOSSES`.
        selection: the default pair-selection rule (``tournament``: INPO's knock-out, 3K/2 − 1
            queries; ``all_pairs``: every pair, for win-rate estimates).
        hparams: the loss's hyper-parameters from the run's ``eta, tau, beta, alpha``.
        sampler: ``policy`` (π_t samples) or ``mixture`` (Nash-MD: the token-level geometric
            mixture π_t^(1−β) π_ref^β with β = τ/η).
        reference: the loss's reference: ``fixed`` (π_ref), ``moving`` (moved to the policy
            every ``ref_update_every`` iterations: COMAL's anchor, MPO's magnet) or
            ``previous`` (π_t, DNO-Prct).
        ref_update_every: a moving reference's default schedule.
        exact: the :mod:`inpo.game.algorithms` update a moving-reference algorithm maps to.
        two_steps: two policy steps an iteration (a half step, then the full step on the half
            step's samples: extragradient); its compare budget halves K.
        pair_filter: DNO-Prct's margin (and teacher) filter on the selected pairs.
        doc: one line for ``inpo run --help``.
        paper: the paper and equation the LM form follows.
    """

    name: str
    loss: str
    selection: Literal["tournament", "all_pairs"]
    hparams: HParams
    doc: str
    paper: str
    sampler: Literal["policy", "mixture"] = "policy"
    reference: Literal["fixed", "moving", "previous"] = "fixed"
    ref_update_every: int | None = None
    exact: str | None = None
    two_steps: bool = False
    pair_filter: bool = False

    @property
    def win_rates(self) -> bool:
        """Whether it trains on win-rate estimates (all pairs of the K samples compared)."""
        return self.selection == "all_pairs"

    @property
    def takes_ties(self) -> bool:
        return self.loss in TIE_LOSSES

    def equal_budget_k(self, k: int) -> int:
        """The samples a prompt that spend about the tournament's ``3K/2 − 1`` queries of
        ``k`` (``inpo compare equal_budget=true``): all-pairs rules the largest ``K'`` with
        ``K'(K'−1)/2`` within it (K = 8: 5, 10 queries against 11); two steps an iteration the
        largest power of two whose two tournaments fit (K = 8: 4, 2 × 5); else ``k``."""
        budget = tournament_queries(k)
        best = 2
        if self.win_rates:
            while (best + 1) * best // 2 <= budget:
                best += 1
            return best
        if self.two_steps:
            while 2 * tournament_queries(best * 2) <= budget:
                best *= 2
            return best
        return k

    def mixture_beta(self, eta: float, tau: float) -> float | None:
        """Nash-MD's β = τ/η: the weight of π_ref in the sampler (``None``: sample π_t)."""
        return tau / eta if self.sampler == "mixture" else None


def _eta_tau(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"eta": eta, "tau": tau}


def _magnetic(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"eta": eta + tau, "tau": tau}  # MMD's step is INPO's at eta + tau


def _online_ipo(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"eta": eta, "tau": eta}


def _no_kl(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"eta": eta, "tau": 0.0}


def _eta(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"eta": eta}


def _beta(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"beta": beta}


def _beta_alpha(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"beta": beta, "alpha": alpha}


def _dno(eta: float, tau: float, beta: float, alpha: float) -> dict[str, float]:
    return {"beta": eta}  # DNO's eta multiplies the log-ratios: DPO's beta


_RECORDS = (
    Algorithm(
        name="inpo",
        loss="inpo",
        selection="tournament",
        hparams=_eta_tau,
        doc="INPO (eta, tau)",
        paper=(
            "Zhang et al. 2024, Iterative Nash Policy Optimization (arXiv "
            "2407.00617): the OMD step Eq. (4) pi_{t+1} ∝ pi_ref^(tau/eta) "
            "pi_t^(1-tau/eta) exp(P(y ≻ pi_t)/eta), learnt by minimising the squared "
            "loss L_t of Eq. (8) (Algorithm 1)"
        ),
    ),
    Algorithm(
        name="online_ipo",
        loss="inpo",
        selection="tournament",
        hparams=_online_ipo,
        doc="INPO with tau = eta: IPO against pi_ref with beta = eta on fresh samples",
        paper=(
            "Calandriello et al. 2024, Human Alignment of LLMs through Online "
            "Preference Optimisation (arXiv 2403.08635): IPO's loss (Azar et al. "
            "2023, arXiv 2310.12036) on fresh pairs of pi_t, whose optimum is pi_ref "
            "exp(P(y ≻ pi_t)/tau)"
        ),
    ),
    Algorithm(
        name="inpo_no_kl",
        loss="inpo",
        selection="tournament",
        hparams=_no_kl,
        doc="INPO with tau = 0: IPO against the previous iterate",
        paper=(
            "Zhang et al. 2024 (arXiv 2407.00617), the ablation 'INPO w/o KL': Eq. "
            "(8) with tau = 0, i.e. pi_{t+1} ∝ pi_t exp(P(y ≻ pi_t)/eta)"
        ),
    ),
    Algorithm(
        name="dpo",
        loss="dpo",
        selection="tournament",
        hparams=_beta,
        doc="iterative DPO (beta)",
        paper=(
            "Rafailov et al. 2023 (arXiv 2305.18290), the DPO loss Eq. (7), iterated "
            "on pi_t's tournament pairs (Xiong et al. 2024, arXiv 2312.11456)"
        ),
    ),
    Algorithm(
        name="ipo",
        loss="ipo",
        selection="tournament",
        hparams=_beta,
        doc="iterative IPO (beta)",
        paper=(
            "Azar et al. 2023 (arXiv 2310.12036), IPO's squared loss (h - 1/(2 "
            "beta))^2, iterated on pi_t's tournament pairs"
        ),
    ),
    Algorithm(
        name="sppo",
        loss="sppo",
        selection="all_pairs",
        hparams=_eta,
        doc="SPPO (eta), all-pairs win rates",
        paper=(
            "Wu et al. 2024, Self-Play Preference Optimization (arXiv 2405.00675): "
            "the squared loss (log pi/pi_t - eta_s (P̂(y ≻ pi_t) - 1/2))^2 with "
            "SPPO's eta_s = 1/eta, whose optimum is the multiplicative-weights step "
            "pi_t exp(P(y ≻ pi_t)/eta)"
        ),
    ),
    Algorithm(
        name="nash_md",
        loss="inpo",
        selection="tournament",
        hparams=_eta_tau,
        sampler="mixture",
        doc=(
            "Nash-MD (Munos et al. 2023) as IPO-MD: samples from the token-level "
            "geometric mixture pi_t^(1-beta) pi_ref^beta, beta = tau/eta, trained "
            "with INPO's loss"
        ),
        paper=(
            "Munos et al. 2023, Nash Learning from Human Feedback (arXiv 2312.00886):"
            " the Nash-MD step on the regularised policy pi_t^(1-beta) pi_ref^beta, "
            "in its squared-loss form IPO-MD (Calandriello et al. 2024, arXiv "
            "2403.08635)"
        ),
    ),
    Algorithm(
        name="comal",
        loss="inpo",
        selection="tournament",
        hparams=_eta_tau,
        reference="moving",
        ref_update_every=2,
        exact="inpo",
        doc=(
            "COMAL (Liu et al. 2024): INPO iterations against an anchor, replaced by "
            "the last policy every ref_update_every iterations (a prox-point outer "
            "loop)"
        ),
        paper=(
            "Liu et al. 2024, COMAL (arXiv 2410.23223): the conceptual prox-point "
            "outer loop over INPO inner iterations, the anchor replaced by the last "
            "iterate"
        ),
    ),
    Algorithm(
        name="mpo",
        loss="inpo",
        selection="tournament",
        hparams=_magnetic,
        reference="moving",
        ref_update_every=2,
        exact="mmd",
        doc=(
            "magnetic mirror descent (MPO, Wang et al. 2025): INPO's loss at eta + "
            "tau, tau; the magnet (reference) moved to the policy every "
            "ref_update_every iterations"
        ),
        paper=(
            "Wang et al. 2025, Magnetic Preference Optimization (ICLR 2025, arXiv "
            "2410.16714): the magnetic mirror descent step pi_{t+1} ∝ (pi_t "
            "pi_ref^(tau/eta) exp(P(y ≻ pi_t)/eta))^(1/(1+tau/eta)), the magnet moved"
            " every few iterations"
        ),
    ),
    Algorithm(
        name="egpo",
        loss="inpo",
        selection="tournament",
        hparams=_magnetic,
        two_steps=True,
        doc=(
            "extragradient (EGPO, Zhou et al. 2025): a half step from pi_t on pi_t's "
            "samples, then the full step from pi_t on the half-step policy's samples,"
            " each MPO's loss (INPO's at eta + tau, tau)"
        ),
        paper=(
            "Zhou, Fazel and Du 2025, Extragradient Preference Optimization (arXiv "
            "2503.08942): the extragradient (half step, full step) pair of online-IPO"
            " updates"
        ),
    ),
    Algorithm(
        name="mirror_prox",
        loss="inpo",
        selection="tournament",
        hparams=_magnetic,
        two_steps=True,
        doc="Nash mirror-prox (Tiapkin et al. 2025): the same two steps as egpo",
        paper=(
            "Tiapkin et al. 2025, Accelerating Nash Learning from Human Feedback via "
            "Mirror Prox: the same extragradient pair as egpo"
        ),
    ),
    Algorithm(
        name="dno",
        loss="dpo",
        selection="all_pairs",
        hparams=_dno,
        reference="previous",
        pair_filter=True,
        doc=(
            "DNO-Prct (Rosset et al. 2024): the best and worst of the K samples (and "
            "the teacher's response) by win rate, kept when their win rates differ by"
            " at least margin, trained with DPO against pi_t (its beta is DNO's eta)"
        ),
        paper=(
            "Rosset et al. 2024, Direct Nash Optimization (arXiv 2404.03715), "
            "Algorithm 2 (DNO-Prct): best vs worst by win rate above a margin, DPO "
            "against pi_t"
        ),
    ),
    Algorithm(
        name="todo",
        loss="todo",
        selection="tournament",
        hparams=_beta_alpha,
        doc=(
            "TODO: tie-aware DPO (beta, alpha); with annotate.tie_policy=tie, tied "
            "finals train as ties"
        ),
        paper=(
            "Guo et al. 2024, TODO: Enhancing LLM Alignment with Ternary Preferences:"
            " DPO's loss with a tie term (alpha)"
        ),
    ),
)

#: Every algorithm by name, in ``inpo run --help``'s order.
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in _RECORDS}


def get_algorithm(name: str, key: str = "algorithm") -> Algorithm:
    """The record of ``name``; a ConfigError naming ``key`` and the choices otherwise."""
    if name not in ALGORITHMS:
        raise ConfigError(
            f"{key} must be one of {', '.join(ALGORITHMS)}; got '{name}'"
            f"{did_you_mean(name, ALGORITHMS)}"
        )
    return ALGORITHMS[name]
