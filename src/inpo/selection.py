"""Choosing which pair of sampled responses to train on.

Three ways, all over ``K`` responses to one prompt:

* :func:`tournament` — the INPO knock-out tournament (Zhang et al. 2024, §4.1; SPEC "Pair
  selection"): ``3K/2 − 1`` pairwise queries for even ``K`` (11 for ``K = 8``), against
  ``K(K − 1)/2`` for all pairs. :func:`tournament_batch` runs many prompts in lock-step with one
  oracle call per round.
* :func:`best_worst_by_reward` — best-of-K and worst-of-K by a scalar reward (``K`` reward
  evaluations, no pairwise query).
* :func:`win_rates` — all-pairs win-rates ``P̂(y_i ≻ π_t)`` over the empirical distribution of
  the ``K`` samples, for SPPO.

Only the standard library and NumPy are imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np

from inpo.errors import ConfigError, OracleError
from inpo.oracles.base import PreferenceOracle

__all__ = [
    "TIE_POLICIES",
    "RewardOracle",
    "TiePolicy",
    "TournamentResult",
    "WinRates",
    "best_worst_by_reward",
    "best_worst_by_reward_batch",
    "checked_probs",
    "tournament",
    "tournament_batch",
    "tournament_queries",
    "win_rates",
    "win_rates_batch",
]

TiePolicy = Literal["first", "random", "drop", "tie"]
TIE_POLICIES: tuple[str, ...] = ("first", "random", "drop", "tie")

RngLike = np.random.Generator | int | None


class TournamentResult(NamedTuple):
    """The pair a selection rule keeps for one prompt.

    ``chosen`` / ``rejected``: indices into the prompt's responses, both ``None`` when no pair is
    kept (``K < 2``, the final comparison rejected the pair, or a tie the policy drops).
    ``queries``: pairwise oracle queries actually asked (reward evaluations for
    :func:`best_worst_by_reward`). ``is_tie``: the kept pair is a tie label (policy ``"tie"``).
    ``winner`` / ``loser``: the brackets' results even when the final did not confirm them.
    ``p_final``: ``P(winner ≻ loser)`` from the final comparison (``None`` if it was not asked).
    """

    chosen: int | None
    rejected: int | None
    queries: int
    is_tie: bool = False
    winner: int | None = None
    loser: int | None = None
    p_final: float | None = None


@runtime_checkable
class RewardOracle(Protocol):
    """A scalar reward: ``rewards(prompts, responses)`` → float64 array ``[n]`` (higher is better)."""

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def checked_probs(values: object, n: int, what: str = "oracle") -> np.ndarray:
    """Validate an oracle's answer: a finite float64 array ``[n]`` with entries in ``[0, 1]``."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise OracleError(f"{what} returned a non-numeric answer: {exc}") from None
    if arr.shape != (n,):
        raise OracleError(f"{what} returned shape {arr.shape} for {n} queries; expected ({n},)")
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise OracleError(
            f"{what} returned P = {float(arr[i])!r} for query {i}; expected a value in [0, 1]"
        )
    return arr


def _check_policy(tie_policy: str) -> None:
    if tie_policy not in TIE_POLICIES:
        raise ConfigError(f"tie_policy={tie_policy!r}; expected one of {', '.join(TIE_POLICIES)}")


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def _final_tie(tie_policy: str, rng: np.random.Generator) -> tuple[bool, bool]:
    """What a tie between the overall winner and loser does: ``(keep_pair, is_tie)``."""
    if tie_policy == "first":  # the winner is listed first in the final: the tie goes to it
        return True, False
    if tie_policy == "random":  # a fair coin decides whether the winner "won" the final
        return bool(rng.random() < 0.5), False
    if tie_policy == "drop":
        return False, False
    return True, True  # "tie": keep the pair, flagged as a tie label


def tournament_queries(k: int) -> int:
    """Oracle queries :func:`tournament` asks for ``k`` responses when no bracket ends in a cycle.

    ``⌊K/2⌋`` first-round matches, ``⌈K/2⌉ − 1`` in each of the winners' and losers' brackets
    (a knock-out of ``m`` players plays ``m − 1`` matches) and one final: ``3K/2 − 1`` for even
    ``K`` (11 for ``K = 8``), ``(3K − 1)/2`` for odd ``K ≥ 3``, and 0 for ``K = 1``.
    """
    if k < 1:
        raise ConfigError(f"tournament over {k} responses; need at least 1")
    if k == 1:
        return 0
    return k // 2 + 2 * ((k + 1) // 2 - 1) + 1


# ---------------------------------------------------------------------------------------------
# The INPO tournament
# ---------------------------------------------------------------------------------------------


@dataclass
class _Bracket:
    """One prompt's tournament state (indices into its responses)."""

    prompt: str
    responses: Sequence[str]
    rng: np.random.Generator
    winners: list[int] = field(default_factory=list)
    losers: list[int] = field(default_factory=list)
    queries: int = 0
    result: TournamentResult | None = None


def _pairs(players: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Adjacent pairs ``(p0, p1), (p2, p3), …`` and the odd one out (a bye), if any."""
    matches = [(players[i], players[i + 1]) for i in range(0, len(players) - 1, 2)]
    bye = [players[-1]] if len(players) % 2 else []
    return matches, bye


def tournament(
    oracle: PreferenceOracle,
    prompt: str,
    responses: Sequence[str],
    *,
    tie_policy: TiePolicy = "drop",
    rng: RngLike = None,
    tie_tol: float = 0.0,
) -> TournamentResult:
    """The INPO knock-out tournament over ``K`` responses to one prompt (INPO §4.1).

    1. **First round**: compare the disjoint pairs ``(y0, y1), (y2, y3), …``.
    2. **Brackets**: the first-round winners play a knock-out among themselves (the winner of
       each match advances) and, in the same rounds, the first-round losers play a knock-out in
       which the *loser* of each match advances, until one overall winner ``y_w`` and one
       overall loser ``y_l`` remain.
    3. **Final**: compare ``(y_w, y_l)``; keep the pair only if ``y_w`` wins. With a cyclic
       preference the final can reject it (then ``chosen = rejected = None``).

    Query count (oracle queries actually asked; in a bracket match the first-listed response,
    asked first, is the lower index; in the final it is ``y_w``): for ``K = 8`` it is ``4`` first-round ``+ 3``
    winners' ``+ 3`` losers' ``+ 1`` final ``= 11`` — SPEC's ``3K/2 − 1`` — and ``3K/2 − 1`` for
    every even ``K`` (see :func:`tournament_queries`). Other cases:

    * **Odd** ``K``: the odd one out (the last response) gets a bye into *both* brackets, and in
      any bracket round with an odd number of players the last one gets a bye to the next round,
      so every response can still end as the winner or the loser. That is ``(3K − 1)/2``
      queries (4 for ``K = 3``, 7 for ``K = 5``). If a cycle makes the same response both the
      overall winner and the overall loser, there is no pair and the final is not asked (one
      query fewer).
    * ``K = 1``: no pair, 0 queries.
    * ``K = 2``: the first round decides the winner and the loser; the final is still asked, as
      ``(y_w, y_l)``, so ``K = 2`` costs 2 queries, matching ``3K/2 − 1``. It repeats the
      first-round query when ``y0`` won (free behind a :class:`~inpo.oracles.cache.CachedOracle`,
      and the same answer from a deterministic oracle) and asks the reversed order when ``y1``
      won (which a position-biased judge may answer differently).

    A match ``(a, b)`` is won by ``a`` if ``P(a ≻ b) > ½ + tie_tol``, by ``b`` if
    ``P(a ≻ b) < ½ − tie_tol``, and is a tie otherwise. ``tie_policy``:

    * ``"drop"`` (the default, the paper's rule and the INPO authors' annotation code): bracket
      ties go to the first-listed response; a tied final keeps no pair (``chosen is None``),
      since the paper keeps ``(y_w, y_l)`` only if ``y_w`` wins.
    * ``"first"``: every tie goes to the first-listed response; in the final that is ``y_w``,
      so a tied final keeps the pair (inpo's default before 0.2).
    * ``"random"``: every tie (bracket or final) is decided by a fair coin from ``rng``
      (a ``numpy.random.Generator`` or an int seed; ``None`` means seed 0). The rng is drawn
      from only on ties.
    * ``"tie"``: bracket ties go to the first-listed response; a tied final keeps the pair with
      ``is_tie=True`` (a tie label, for losses that accept one).

    Args:
        oracle: anything with ``prob_prefers(prompts, responses_a, responses_b) -> [n]``.
        prompt: the prompt.
        responses: the ``K ≥ 1`` responses.

    Returns:
        :class:`TournamentResult` ``(chosen, rejected, queries, is_tie, winner, loser, p_final)``.
    """
    return tournament_batch(
        oracle, [prompt], [responses], tie_policy=tie_policy, rng=[_as_rng(rng)], tie_tol=tie_tol
    )[0]


def tournament_batch(
    oracle: PreferenceOracle,
    prompts: Sequence[str],
    responses_per_prompt: Sequence[Sequence[str]],
    *,
    tie_policy: TiePolicy = "drop",
    rng: RngLike | Sequence[np.random.Generator] = None,
    tie_tol: float = 0.0,
) -> list[TournamentResult]:
    """:func:`tournament` for many prompts in lock-step: one ``prob_prefers`` call per round.

    The rounds are the first round, then the brackets' rounds (both brackets of every prompt in
    the same call), then the finals: ``2 + ⌈log2 ⌈K_max/2⌉⌉`` oracle calls in all, whatever the
    number of prompts. Each prompt's result (pair and query count) equals what
    :func:`tournament` returns for it alone. Prompts may have different ``K``.

    ``rng`` (for ``tie_policy="random"``): one generator per prompt, or one generator/seed from
    which per-prompt generators are spawned (``Generator.spawn``), so that
    ``tournament_batch(..., rng=g)`` equals ``[tournament(..., rng=c) for c in g.spawn(n)]``
    for a fresh ``g`` with the same seed.
    """
    _check_policy(tie_policy)
    if len(prompts) != len(responses_per_prompt):
        raise ConfigError(
            f"{len(prompts)} prompts but {len(responses_per_prompt)} response lists; "
            "they must have the same length"
        )
    if tie_tol < 0 or tie_tol >= 0.5:
        raise ConfigError(f"tie_tol={tie_tol}; expected 0 <= tie_tol < 0.5")
    if isinstance(rng, Sequence):
        rngs = list(rng)
        if len(rngs) != len(prompts):
            raise ConfigError(f"{len(rngs)} generators for {len(prompts)} prompts")
    else:
        rngs = _as_rng(rng).spawn(len(prompts))

    brackets = []
    for i, (prompt, resp) in enumerate(zip(prompts, responses_per_prompt)):
        if len(resp) < 1:
            raise ConfigError(f"prompt {i} has no responses; the tournament needs at least one")
        brackets.append(_Bracket(prompt, resp, rngs[i]))

    def play(matches: list[tuple[_Bracket, int, int]]) -> list[tuple[float, int]]:
        """Ask all matches in one call; return ``(P(a ≻ b), outcome)`` with outcome +1/−1/0."""
        if not matches:
            return []
        probs = checked_probs(
            oracle.prob_prefers(
                [br.prompt for br, _, _ in matches],
                [br.responses[a] for br, a, _ in matches],
                [br.responses[b] for br, _, b in matches],
            ),
            len(matches),
        )
        out = []
        for (br, _, _), p in zip(matches, probs):
            br.queries += 1
            p = float(p)
            outcome = 1 if p > 0.5 + tie_tol else -1 if p < 0.5 - tie_tol else 0
            out.append((p, outcome))
        return out

    def decide(br: _Bracket, a: int, b: int, outcome: int) -> tuple[int, int]:
        """(winner, loser) of a bracket match; ties go to ``a`` unless the policy is random."""
        if outcome == 0:
            a_wins = not (tie_policy == "random" and br.rng.random() >= 0.5)
        else:
            a_wins = outcome > 0
        return (a, b) if a_wins else (b, a)

    # ---- Round 1: disjoint pairs; the odd one out enters both brackets ----------------------
    first = [(br, a, b) for br in brackets for a, b in _pairs(list(range(len(br.responses))))[0]]
    for (br, a, b), (_, outcome) in zip(first, play(first)):
        win, lose = decide(br, a, b, outcome)
        br.winners.append(win)
        br.losers.append(lose)
    for br in brackets:
        if len(br.responses) % 2:
            br.winners.append(len(br.responses) - 1)
            br.losers.append(len(br.responses) - 1)

    # ---- Brackets: winners keep winners, losers keep losers, all prompts in lock-step -------
    while any(len(br.winners) > 1 or len(br.losers) > 1 for br in brackets):
        matches: list[tuple[_Bracket, int, int]] = []
        plan: list[tuple[_Bracket, list[int], list[int], int, int]] = []
        for br in brackets:
            w_matches, w_bye = _pairs(br.winners)
            l_matches, l_bye = _pairs(br.losers)
            plan.append((br, w_bye, l_bye, len(w_matches), len(l_matches)))
            matches += [(br, a, b) for a, b in w_matches] + [(br, a, b) for a, b in l_matches]
        results = iter(zip(matches, play(matches)))
        for br, w_bye, l_bye, n_w, n_l in plan:
            winners, losers = [], []
            for _ in range(n_w):
                (_, a, b), (_, outcome) = next(results)
                winners.append(decide(br, a, b, outcome)[0])
            for _ in range(n_l):
                (_, a, b), (_, outcome) = next(results)
                losers.append(decide(br, a, b, outcome)[1])
            br.winners, br.losers = winners + w_bye, losers + l_bye

    # ---- Final: keep (y_w, y_l) only if y_w wins -------------------------------------------
    finals = []
    for br in brackets:
        win, lose = br.winners[0], br.losers[0]
        if win == lose:  # K = 1, or a cycle made one response both winner and loser
            br.result = TournamentResult(None, None, br.queries, False, win, lose, None)
        else:
            finals.append((br, win, lose))
    for (br, win, lose), (p, outcome) in zip(finals, play(finals)):
        if outcome > 0:
            keep, is_tie = True, False
        elif outcome < 0:
            keep, is_tie = False, False
        else:
            keep, is_tie = _final_tie(tie_policy, br.rng)
        chosen, rejected = (win, lose) if keep else (None, None)
        br.result = TournamentResult(chosen, rejected, br.queries, is_tie, win, lose, p)
    return [br.result for br in brackets if br.result is not None]


# ---------------------------------------------------------------------------------------------
# Best-of-K / worst-of-K by a scalar reward
# ---------------------------------------------------------------------------------------------

RewardSource = RewardOracle | Callable[[Sequence[str], Sequence[str]], np.ndarray]


def _reward_fn(source: RewardSource) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    if isinstance(source, RewardOracle):
        return source.rewards
    if callable(source):
        return source
    raise ConfigError(
        f"{type(source).__name__} is neither a reward function nor has rewards(prompts, responses)"
    )


def best_worst_by_reward(
    reward: RewardSource,
    prompt: str,
    responses: Sequence[str],
    *,
    tie_policy: TiePolicy = "drop",
    rng: RngLike = None,
) -> TournamentResult:
    """Best-of-K and worst-of-K by a scalar reward (SPEC "Pair selection", last line).

    ``K`` reward evaluations in one call, no pairwise query (``queries = K``; 0 for ``K = 1``,
    which keeps no pair). ``chosen = argmax r``, ``rejected = argmin r``. Ties among equal
    rewards follow the tournament's rule: with ``"first"``/``"drop"``/``"tie"`` the
    first-listed response wins, so ``chosen`` is the *first* maximiser and ``rejected`` the
    *last* minimiser; with ``"random"`` both are drawn uniformly among the tied. When every
    reward is equal, chosen vs rejected is a tied final and the policy decides as in
    :func:`tournament`.

    Args:
        reward: an object with ``rewards(prompts, responses) -> [n]`` or such a function.
    """
    return best_worst_by_reward_batch(
        reward, [prompt], [responses], tie_policy=tie_policy, rng=[_as_rng(rng)]
    )[0]


def best_worst_by_reward_batch(
    reward: RewardSource,
    prompts: Sequence[str],
    responses_per_prompt: Sequence[Sequence[str]],
    *,
    tie_policy: TiePolicy = "drop",
    rng: RngLike | Sequence[np.random.Generator] = None,
) -> list[TournamentResult]:
    """:func:`best_worst_by_reward` for many prompts with one reward call for all responses."""
    _check_policy(tie_policy)
    fn = _reward_fn(reward)
    if len(prompts) != len(responses_per_prompt):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses_per_prompt)} response lists")
    rngs = list(rng) if isinstance(rng, Sequence) else _as_rng(rng).spawn(len(prompts))
    flat_p = [p for p, rs in zip(prompts, responses_per_prompt) if len(rs) > 1 for _ in rs]
    flat_r = [r for rs in responses_per_prompt if len(rs) > 1 for r in rs]
    all_rewards = np.empty(0)
    if flat_r:
        all_rewards = np.asarray(fn(flat_p, flat_r), dtype=np.float64)
        if all_rewards.shape != (len(flat_r),) or not np.isfinite(all_rewards).all():
            raise OracleError(
                f"reward function returned shape {all_rewards.shape} (or non-finite values) for "
                f"{len(flat_r)} responses; expected ({len(flat_r)},) finite floats"
            )
    out, start = [], 0
    for i, rs in enumerate(responses_per_prompt):
        k = len(rs)
        if k < 2:
            if k < 1:
                raise ConfigError(f"prompt {i} has no responses")
            out.append(TournamentResult(None, None, 0))
            continue
        r = all_rewards[start : start + k]
        start += k
        tops, bottoms = np.flatnonzero(r == r.max()), np.flatnonzero(r == r.min())
        if tie_policy == "random":
            best = int(rngs[i].choice(tops))
            rest = bottoms[bottoms != best]
            worst = int(rngs[i].choice(rest if rest.size else np.delete(np.arange(k), best)))
        else:
            best, worst = int(tops[0]), int(bottoms[-1])  # distinct: K ≥ 2
        keep, is_tie = True, False
        if r[best] == r[worst]:
            keep, is_tie = _final_tie(tie_policy, rngs[i])
        chosen, rejected = (best, worst) if keep else (None, None)
        out.append(TournamentResult(chosen, rejected, k, is_tie, best, worst, None))
    return out


# ---------------------------------------------------------------------------------------------
# All-pairs win-rates for SPPO
# ---------------------------------------------------------------------------------------------


class WinRates(NamedTuple):
    """``win_rates[i] = P̂(y_i ≻ π_t) = mean_j P(y_i ≻ y_j)`` (``[K]``), ``matrix[i, j] =
    P(y_i ≻ y_j)`` (``[K, K]``, ``matrix + matrix.T = 1``), ``queries`` asked."""

    win_rates: np.ndarray
    matrix: np.ndarray
    queries: int


def win_rates(
    oracle: PreferenceOracle,
    prompt: str,
    responses: Sequence[str],
    *,
    both_orders: bool = False,
) -> WinRates:
    """Win-rate of each sample against the empirical policy of the ``K`` samples (SPPO).

    ``P̂(y_i ≻ π_t) = (1/K) Σ_j P(y_i ≻ y_j)``, including ``j = i`` with ``P = ½`` (the exact
    formula over the empirical distribution of the samples). The oracle is asked each unordered
    pair once, ``(y_i, y_j)`` with ``i < j``: ``K(K − 1)/2`` queries, and ``P(y_j ≻ y_i) = 1 −
    P(y_i ≻ y_j)``. With ``both_orders=True`` each pair is asked in both orders (``K(K − 1)``
    queries) and ``matrix[i, j] = (P(y_i ≻ y_j) + 1 − P(y_j ≻ y_i)) / 2``, which averages out a
    judge's position bias when the oracle itself does not.
    """
    return win_rates_batch(oracle, [prompt], [responses], both_orders=both_orders)[0]


def win_rates_batch(
    oracle: PreferenceOracle,
    prompts: Sequence[str],
    responses_per_prompt: Sequence[Sequence[str]],
    *,
    both_orders: bool = False,
) -> list[WinRates]:
    """:func:`win_rates` for many prompts with a single ``prob_prefers`` call."""
    if len(prompts) != len(responses_per_prompt):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses_per_prompt)} response lists")
    qp: list[str] = []
    qa: list[str] = []
    qb: list[str] = []
    pairs_per_prompt = []
    for prompt, rs in zip(prompts, responses_per_prompt):
        ii, jj = np.triu_indices(len(rs), k=1)
        pairs_per_prompt.append((ii, jj))
        orders = [(ii, jj), (jj, ii)] if both_orders else [(ii, jj)]
        for first, second in orders:
            qp += [prompt] * len(first)
            qa += [rs[i] for i in first]
            qb += [rs[j] for j in second]
    probs = np.empty(0)
    if qp:
        probs = checked_probs(oracle.prob_prefers(qp, qa, qb), len(qp))
    out, start = [], 0
    for rs, (ii, jj) in zip(responses_per_prompt, pairs_per_prompt):
        k, m = len(rs), len(ii)
        upper = probs[start : start + m]
        start += m
        if both_orders:
            upper = (upper + 1.0 - probs[start : start + m]) / 2.0
            start += m
        matrix = np.full((k, k), 0.5)
        matrix[ii, jj] = upper
        matrix[jj, ii] = 1.0 - upper
        rates = matrix.mean(axis=1) if k else np.empty(0)
        out.append(WinRates(rates, matrix, m * (2 if both_orders else 1)))
    return out
