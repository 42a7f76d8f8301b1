"""Preference losses as pure functions of per-sequence log-prob tensors.

Every function takes 1-D tensors of shape ``[B]`` (one entry per preference pair; each entry the
**sum** of a completion's token log-probs unless the function says otherwise) and returns a
:class:`LossOutput` whose first item is the per-pair loss ``[B]`` (not reduced), followed by
detached diagnostics. Hyper-parameters carry the papers' names: ``eta`` (INPO's inverse
mirror-descent step, SPPO's ``η_s``), ``tau`` (KL strength), ``beta`` (DPO/IPO).

Each loss is also described by a :class:`LossSpec` in :data:`LOSSES`, which *declares* which
inputs it reads (reference log-probs, previous-iterate log-probs, win-rate estimates, tie flags)
and whether log-probs are sums or means. A training loop reads the spec to know what to
precompute and which batch columns to pass; nothing here dispatches on a loss name.

Notation follows ``SPEC.md``: ``Δ_π = log π(y_w) − log π(y_l)`` and likewise ``Δ_ref``, ``Δ_t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from inpo.errors import did_you_mean

__all__ = [
    "LOSSES",
    "LossOutput",
    "LossSpec",
    "dpo_loss",
    "get_loss",
    "inpo_loss",
    "ipo_length_normalized_loss",
    "ipo_loss",
    "sppo_loss",
    "todo_loss",
]


class LossOutput(NamedTuple):
    """Per-pair loss ``[B]`` and detached diagnostics ``[B]``.

    ``chosen_rewards``/``rejected_rewards`` are the implicit rewards (the policy's log-ratio
    against the loss's effective reference, times the loss's scale); ``margins`` is the
    quantity the loss acts on (for INPO: ``h_t(π, y_w, y_l)``).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_shapes(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"log-prob tensors must share one shape, got {shape} and {t.shape}")


def inpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    prev_chosen_logps: Tensor,
    prev_rejected_logps: Tensor,
    *,
    eta: float,
    tau: float,
    ties: Tensor | None = None,
) -> LossOutput:
    """INPO's squared loss (Zhang et al. 2024, eq. 8; SPEC "INPO").

    With ``r = tau / eta``::

        h = Δ_π − r·Δ_ref − (1 − r)·Δ_t
        loss = (h − 1/(2·eta))²

    i.e. IPO against the effective reference ``r·log π_ref + (1 − r)·log π_t``. Its population
    minimiser is the exact INPO update (SPEC check 2). ``tau = eta`` is online IPO against
    ``π_ref`` with ``beta = eta``; ``tau = 0`` is "INPO without KL" (IPO against ``π_t``).

    Args:
        *_logps: summed completion log-probs, shape ``[B]``.
        eta: ``η > 0``, the inverse of the mirror-descent step (paper default 0.005).
        tau: ``τ ∈ [0, η]``, the KL strength (paper default ``η/3``).
        ties: optional bool ``[B]``; a tie is a label with no preference, whose target margin
            is 0 (the average of the two orders' squared losses, up to a constant).

    Returns:
        :class:`LossOutput` with per-pair losses ``[B]``.
    """
    _check_positive("eta", eta)
    if not (isinstance(tau, int | float) and math.isfinite(tau) and 0.0 <= tau <= eta):
        raise ValueError(f"tau must satisfy 0 <= tau <= eta (eta={eta!r}), got {tau!r}")
    _check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        prev_chosen_logps,
        prev_rejected_logps,
    )
    r = tau / eta
    eff_chosen = r * ref_chosen_logps + (1.0 - r) * prev_chosen_logps
    eff_rejected = r * ref_rejected_logps + (1.0 - r) * prev_rejected_logps
    chosen_logratio = policy_chosen_logps - eff_chosen
    rejected_logratio = policy_rejected_logps - eff_rejected
    h = chosen_logratio - rejected_logratio
    target = torch.full_like(h, 1.0 / (2.0 * eta))
    if ties is not None:
        target = torch.where(ties.to(torch.bool), torch.zeros_like(target), target)
    losses = (h - target) ** 2
    return LossOutput(
        losses,
        (eta * chosen_logratio).detach(),
        (eta * rejected_logratio).detach(),
        h.detach(),
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    ties: Tensor | None = None,
) -> LossOutput:
    """IPO (Azar et al. 2023) on **summed** log-probs: ``((Δ_π − Δ_ref) − 1/(2β))²``.

    For the length-normalised variant some libraries call "IPO", use
    :func:`ipo_length_normalized_loss`. Shapes ``[B]``; ``beta > 0``.
    """
    _check_positive("beta", beta)
    _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratio - rejected_logratio
    target = torch.full_like(margin, 1.0 / (2.0 * beta))
    if ties is not None:
        target = torch.where(ties.to(torch.bool), torch.zeros_like(target), target)
    losses = (margin - target) ** 2
    return LossOutput(
        losses,
        (beta * chosen_logratio).detach(),
        (beta * rejected_logratio).detach(),
        margin.detach(),
    )


def ipo_length_normalized_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO on **mean** token log-probs (summed log-probs divided by completion lengths).

    This is the variant TRL calls ``loss_type="ipo"``; it is a different objective from
    :func:`ipo_loss`, so it has its own name. Lengths are token counts ``[B]`` (> 0).
    """
    if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
        raise ValueError("completion lengths must be positive")
    cl = chosen_lengths.to(policy_chosen_logps.dtype)
    rl = rejected_lengths.to(policy_rejected_logps.dtype)
    return ipo_loss(
        policy_chosen_logps / cl,
        policy_rejected_logps / rl,
        ref_chosen_logps / cl,
        ref_rejected_logps / rl,
        beta=beta,
    )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023): ``−log σ(β (Δ_π − Δ_ref))`` on summed log-probs.

    ``label_smoothing = ε`` gives the conservative DPO of Mitchell (2023):
    ``−(1−ε) log σ(βm) − ε log σ(−βm)``. At zero margin the loss is ``log 2``.
    """
    _check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratio - rejected_logratio
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * margin)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-beta * margin)
    return LossOutput(
        losses,
        (beta * chosen_logratio).detach(),
        (beta * rejected_logratio).detach(),
        margin.detach(),
    )


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    prev_chosen_logps: Tensor,
    prev_rejected_logps: Tensor,
    chosen_winrates: Tensor,
    rejected_winrates: Tensor,
    *,
    eta: float,
) -> LossOutput:
    """SPPO (Wu et al. 2024) with soft win-rate targets, summed over the pair's two responses.

    Per response: ``(log π(y)/π_t(y) − (P̂(y ≻ π_t) − 1/2) / eta)²``, whose minimiser is the
    multiplicative-weights step ``π_{t+1}(y) ∝ π_t(y) exp(P(y ≻ π_t)/eta)``. ``*_winrates`` are
    the estimates ``P̂ ∈ [0, 1]``, shape ``[B]``. ``eta`` is SPPO's ``η_s`` (> 0).
    """
    _check_positive("eta", eta)
    _check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        prev_chosen_logps,
        prev_rejected_logps,
        chosen_winrates,
        rejected_winrates,
    )
    chosen_logratio = policy_chosen_logps - prev_chosen_logps
    rejected_logratio = policy_rejected_logps - prev_rejected_logps
    chosen_target = (chosen_winrates - 0.5) / eta
    rejected_target = (rejected_winrates - 0.5) / eta
    losses = (chosen_logratio - chosen_target) ** 2 + (rejected_logratio - rejected_target) ** 2
    return LossOutput(
        losses,
        (eta * chosen_logratio).detach(),
        (eta * rejected_logratio).detach(),
        (chosen_logratio - rejected_logratio).detach(),
    )


def todo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    ties: Tensor,
    *,
    beta: float,
    alpha: float = 0.5,
) -> LossOutput:
    """Tie-aware DPO: TODO (Guo et al. 2024, seed 003) under the tie-rank Bradley–Terry model.

    With ``u = β (Δ_π − Δ_ref)`` and tie threshold ``α > 0`` (Rao–Kupper with ``θ = e^α``)::

        P(y_w ≻ y_l) = σ(u − α)        P(tie) = (e^{2α} − 1) σ(u − α) σ(−u − α)

    A strict pair's loss is ``−log σ(u − α)``; a tie's is ``−log P(tie)``, minimised at ``u = 0``
    ("no preference"). ``ties`` is a bool tensor ``[B]``.
    """
    _check_positive("beta", beta)
    _check_positive("alpha", alpha)
    _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratio - rejected_logratio
    u = beta * margin
    strict = -F.logsigmoid(u - alpha)
    log_tie_const = math.log(math.expm1(2.0 * alpha))
    tie = -(log_tie_const + F.logsigmoid(u - alpha) + F.logsigmoid(-u - alpha))
    losses = torch.where(ties.to(torch.bool), tie, strict)
    return LossOutput(
        losses,
        (beta * chosen_logratio).detach(),
        (beta * rejected_logratio).detach(),
        margin.detach(),
    )


# ----------------------------------------------------------------------------------------------
# Loss specs: what each loss reads, declared as data for the training loop.
# ----------------------------------------------------------------------------------------------

#: Batch columns a loss may read (names match the loss functions' arguments).
POLICY_INPUTS = ("policy_chosen_logps", "policy_rejected_logps")


@dataclass(frozen=True)
class LossSpec:
    """Declares a loss's inputs and hyper-parameters for a training loop.

    Attributes:
        name: registry key.
        fn: the pure loss function.
        inputs: positional inputs, by batch-column name, in the function's order. Names starting
            with ``policy_`` are computed by the policy in the training step; the others
            (``ref_*``, ``prev_*``, ``*_winrates``, ``ties``, ``*_lengths``) are precomputed
            columns of the dataset.
        optional_inputs: keyword inputs used when the dataset has the column (e.g. ``ties``).
        hyperparameters: the keyword hyper-parameters the function takes.
        logp_reduction: ``"sum"`` or ``"mean"`` over completion tokens.
    """

    name: str
    fn: Callable[..., LossOutput]
    inputs: tuple[str, ...]
    hyperparameters: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    logp_reduction: str = "sum"

    @property
    def needs_ref(self) -> bool:
        return any(i.startswith("ref_") for i in self.inputs)

    @property
    def needs_prev(self) -> bool:
        return any(i.startswith("prev_") for i in self.inputs)

    @property
    def needs_winrates(self) -> bool:
        return any(i.endswith("_winrates") for i in self.inputs)

    @property
    def needs_ties(self) -> bool:
        return "ties" in self.inputs

    @property
    def precomputed_inputs(self) -> tuple[str, ...]:
        """Inputs that are dataset columns rather than policy outputs."""
        return tuple(i for i in self.inputs if not i.startswith("policy_"))

    def __call__(self, batch: dict[str, Tensor], **hparams: float) -> LossOutput:
        unknown = set(hparams) - set(self.hyperparameters)
        if unknown:
            raise ValueError(
                f"loss '{self.name}' takes hyper-parameters {self.hyperparameters}, got {sorted(unknown)}"
            )
        missing = [i for i in self.inputs if i not in batch]
        if missing:
            raise KeyError(f"loss '{self.name}' needs batch columns {missing}")
        args = [batch[i] for i in self.inputs]
        kwargs = {i: batch[i] for i in self.optional_inputs if batch.get(i) is not None}
        return self.fn(*args, **kwargs, **hparams)


_REF = ("ref_chosen_logps", "ref_rejected_logps")
_PREV = ("prev_chosen_logps", "prev_rejected_logps")

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("inpo", inpo_loss, POLICY_INPUTS + _REF + _PREV, ("eta", "tau"), ("ties",)),
        LossSpec("ipo", ipo_loss, POLICY_INPUTS + _REF, ("beta",), ("ties",)),
        LossSpec(
            "ipo_length_normalized",
            ipo_length_normalized_loss,
            (*POLICY_INPUTS, *_REF, "chosen_lengths", "rejected_lengths"),
            ("beta",),
            logp_reduction="mean",
        ),
        LossSpec("dpo", dpo_loss, POLICY_INPUTS + _REF, ("beta", "label_smoothing")),
        LossSpec(
            "sppo",
            sppo_loss,
            (*POLICY_INPUTS, *_PREV, "chosen_winrates", "rejected_winrates"),
            ("eta",),
        ),
        LossSpec("todo", todo_loss, (*POLICY_INPUTS, *_REF, "ties"), ("beta", "alpha")),
    )
}


def get_loss(name: str) -> LossSpec:
    """Look up a :class:`LossSpec`; an unknown name raises ``ValueError`` with a suggestion."""
    if name not in LOSSES:
        hint = did_you_mean(name, LOSSES)
        raise ValueError(f"unknown loss '{name}' (known: {', '.join(LOSSES)}){hint}")
    return LOSSES[name]
