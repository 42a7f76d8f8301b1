"""Pair selection: the INPO tournament, best/worst by reward, all-pairs win-rates (SPEC check 5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inpo.errors import ConfigError, OracleError
from inpo.oracles.synthetic import AnnotatorPanel, TableOracle
from inpo.selection import (
    RewardOracle,
    TournamentResult,
    best_worst_by_reward,
    best_worst_by_reward_batch,
    tournament,
    tournament_batch,
    tournament_queries,
    win_rates,
    win_rates_batch,
)


def transitive_table(scores: list[float], *, prefix: str = "y") -> tuple[TableOracle, list[str]]:
    """``P(i ≻ j) = σ(s_i − s_j)``: a Bradley–Terry table (ties where scores are equal)."""
    s = np.asarray(scores, dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))
    p = (p + 1.0 - p.T) / 2.0  # exact antisymmetry despite rounding
    responses = [f"{prefix}{i}" for i in range(len(scores))]
    return TableOracle(p, responses), responses


class CountingOracle:
    """Wraps an oracle; records every call's size (to check one call per round)."""

    def __init__(self, inner):
        self.inner = inner
        self.oracle_id = inner.oracle_id
        self.calls: list[int] = []
        self.asked: list[tuple[str, str, str]] = []

    def prob_prefers(self, prompts, a, b):
        self.calls.append(len(prompts))
        self.asked += list(zip(prompts, a, b))
        return self.inner.prob_prefers(prompts, a, b)


def reference_tournament(prob, k: int) -> tuple[int | None, int | None, int]:
    """A direct, recursive statement of the bracket with ties to the first-listed (policy first).

    ``prob(i, j)`` is ``P(y_i ≻ y_j)``; returns ``(chosen, rejected, queries)``.
    """
    asked = 0

    def match(i: int, j: int) -> tuple[int, int]:
        nonlocal asked
        asked += 1
        return (i, j) if prob(i, j) >= 0.5 else (j, i)

    def knockout(players: list[int], keep_winner: bool) -> int:
        while len(players) > 1:
            nxt = [
                match(a, b)[0 if keep_winner else 1] for a, b in zip(players[::2], players[1::2])
            ]
            players = nxt + ([players[-1]] if len(players) % 2 else [])
        return players[0]

    firsts = [match(i, i + 1) for i in range(0, k - 1, 2)]
    bye = [k - 1] if k % 2 else []
    w = knockout([m[0] for m in firsts] + bye, True)
    lo = knockout([m[1] for m in firsts] + bye, False)
    if w == lo:
        return None, None, asked
    asked += 1
    return (w, lo, asked) if prob(w, lo) >= 0.5 else (None, None, asked)


# ---- query counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8, 16, 6, 10])
def test_even_k_costs_three_halves_k_minus_one(k):
    oracle, ys = transitive_table(list(range(k)))
    counted = CountingOracle(oracle)
    res = tournament(counted, "x", ys)
    assert res.queries == 3 * k // 2 - 1 == tournament_queries(k) == sum(counted.calls)
    if k == 8:
        assert res.queries == 11  # SPEC check 5: 4 + 3 + 3 + 1
        assert counted.calls == [4, 4, 2, 1]  # round 1; 2 bracket rounds (W + L together); final


@pytest.mark.parametrize(("k", "expected"), [(1, 0), (3, 4), (5, 7), (7, 10), (9, 13)])
def test_odd_k_query_counts(k, expected):
    oracle, ys = transitive_table([float(v) for v in range(k)])
    res = tournament(oracle, "x", ys)
    assert res.queries == expected == tournament_queries(k)
    if k > 1:
        assert res.queries == (3 * k - 1) // 2
        assert (res.chosen, res.rejected) == (k - 1, 0)  # the bye can win the winners' bracket


def test_k1_keeps_no_pair_and_asks_nothing():
    oracle, ys = transitive_table([0.0])
    assert tournament(oracle, "x", ys) == TournamentResult(None, None, 0, False, 0, 0, None)
    assert oracle.stats.queries == 0


def test_k2_asks_the_final_in_winner_first_order():
    oracle, ys = transitive_table([0.0, 3.0])  # y1 is better
    counted = CountingOracle(oracle)
    res = tournament(counted, "x", ys)
    assert (res.chosen, res.rejected, res.queries) == (1, 0, 2)
    assert counted.asked == [("x", "y0", "y1"), ("x", "y1", "y0")]


# ---- the right pair -----------------------------------------------------------------------------


def test_transitive_table_picks_best_and_worst():
    scores = [3.0, -1.0, 7.0, 0.5, 2.0, 9.0, -4.0, 1.0]
    oracle, ys = transitive_table(scores)
    res = tournament(oracle, "x", ys)
    assert (res.chosen, res.rejected) == (int(np.argmax(scores)), int(np.argmin(scores)))
    assert res.p_final == pytest.approx(1 / (1 + np.exp(-13.0)))


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(
        st.integers(min_value=-1000, max_value=1000), min_size=2, max_size=13, unique=True
    )
)
def test_property_random_transitive_tables(scores):
    oracle, ys = transitive_table([s / 100 for s in scores])
    res = tournament(oracle, "x", ys)
    assert res.chosen == int(np.argmax(scores))
    assert res.rejected == int(np.argmin(scores))
    assert res.queries == tournament_queries(len(scores))
    ref = reference_tournament(lambda i, j: oracle.matrix()[i, j], len(scores))
    assert (res.chosen, res.rejected, res.queries) == ref


@settings(max_examples=60, deadline=None)
@given(k=st.integers(min_value=1, max_value=12), seed=st.integers(0, 2**32 - 1))
def test_property_matches_reference_on_random_general_tables(k, seed):
    """Any preference matrix (cyclic included): same pair and count as the direct statement."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=(k, k))
    p = np.triu(p, 1) + np.tril(1.0 - p.T, -1) + 0.5 * np.eye(k)
    ys = [f"y{i}" for i in range(k)]
    res = tournament(TableOracle(p, ys), "x", ys)
    assert (res.chosen, res.rejected, res.queries) == reference_tournament(lambda i, j: p[i, j], k)


def test_cyclic_table_final_rejects_the_pair():
    # y0 ≻ y1, y2 ≻ y3 (first round); y0 ≻ y2 (winners); y3 loses to y1 (losers);
    # but y3 ≻ y0: a cycle, so the final (y0, y3) rejects the pair.
    p = np.full((4, 4), 0.5)

    def put(i, j, v):
        p[i, j], p[j, i] = v, 1.0 - v

    put(0, 1, 0.9)
    put(2, 3, 0.8)
    put(0, 2, 0.7)
    put(1, 3, 0.6)
    put(0, 3, 0.2)
    put(1, 2, 0.5)
    ys = ["a", "b", "c", "d"]
    res = tournament(TableOracle(p, ys), "x", ys)
    assert (res.winner, res.loser) == (0, 3)
    assert (res.chosen, res.rejected, res.queries) == (None, None, 5)
    assert res.p_final == pytest.approx(0.2)


def test_condorcet_panel_odd_k_cycle_gives_no_pair_without_a_final():
    panel, ys = AnnotatorPanel.condorcet()
    res = tournament(panel, "x", ys)
    # r0 beats r1; r2 (the bye) beats r0 in the winners' bracket and loses to r1 in the losers'.
    assert (res.winner, res.loser) == (2, 2)
    assert (res.chosen, res.rejected, res.queries) == (None, None, 3)


# ---- ties ---------------------------------------------------------------------------------------


def all_ties(k: int) -> tuple[TableOracle, list[str]]:
    return transitive_table([0.0] * k)


def test_tie_policy_first_keeps_the_first_listed():
    oracle, ys = all_ties(4)
    res = tournament(oracle, "x", ys, tie_policy="first")
    # Ties to the first-listed: (0,1)→0, (2,3)→2; winners (0,2)→0; losers (1,3): loser 3.
    assert (res.chosen, res.rejected, res.is_tie, res.queries) == (0, 3, False, 5)


def test_a_tied_final_keeps_no_pair_by_default():
    """The paper keeps (y_w, y_l) only if y_w wins, and the INPO authors' annotation code drops
    a tied final: the default is ``drop`` (bracket ties still go to the first-listed)."""
    oracle, ys = all_ties(4)
    res = tournament(oracle, "x", ys)
    assert (res.chosen, res.rejected, res.winner, res.loser) == (None, None, 0, 3)
    assert res.p_final == 0.5 and res.queries == 5
    (batched,) = tournament_batch(oracle, ["x"], [ys])
    assert batched.chosen is None
    assert best_worst_by_reward(lambda p, r: np.zeros(len(r)), "x", ys).chosen is None


def test_tie_policy_drop_and_tie():
    oracle, ys = all_ties(4)
    dropped = tournament(oracle, "x", ys, tie_policy="drop")
    assert (dropped.chosen, dropped.rejected, dropped.winner, dropped.loser) == (None, None, 0, 3)
    tied = tournament(oracle, "x", ys, tie_policy="tie")
    assert (tied.chosen, tied.rejected, tied.is_tie, tied.p_final) == (0, 3, True, 0.5)
    # A decided final is not a tie under either policy.
    oracle2, ys2 = transitive_table([1.0, 0.0, 0.0, 0.0])
    assert tournament(oracle2, "x", ys2, tie_policy="drop").chosen == 0
    assert tournament(oracle2, "x", ys2, tie_policy="tie").is_tie is False


def test_tie_policy_random_is_seeded_and_varies():
    oracle, ys = all_ties(8)
    outcomes = {tournament(oracle, "x", ys, tie_policy="random", rng=s)[:2] for s in range(40)}
    assert len(outcomes) > 3  # different seeds break ties differently
    assert (None, None) in outcomes  # a tied final is kept only half the time
    a = tournament(oracle, "x", ys, tie_policy="random", rng=np.random.default_rng(7))
    b = tournament(oracle, "x", ys, tie_policy="random", rng=np.random.default_rng(7))
    assert a == b


def test_tie_tol_treats_near_half_as_a_tie():
    p = np.array([[0.5, 0.51], [0.49, 0.5]])
    oracle = TableOracle(p, ["u", "v"])
    assert tournament(oracle, "x", ["v", "u"]).chosen == 1
    # a tied final: dropped by default, to the first-listed with "first"
    assert tournament(oracle, "x", ["v", "u"], tie_tol=0.05).chosen is None
    assert tournament(oracle, "x", ["v", "u"], tie_tol=0.05, tie_policy="first").chosen == 0
    assert tournament(oracle, "x", ["v", "u"], tie_tol=0.05, tie_policy="tie").is_tie


def test_bad_policy_and_bad_oracle_answers():
    oracle, ys = transitive_table([0.0, 1.0])
    with pytest.raises(ConfigError, match="tie_policy='maybe'"):
        tournament(oracle, "x", ys, tie_policy="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no responses"):
        tournament(oracle, "x", [])

    class Broken:
        def prob_prefers(self, prompts, a, b):
            return np.full(len(prompts), np.nan)

    with pytest.raises(OracleError, match="expected a value in"):
        tournament(Broken(), "x", ys)


# ---- batching ---------------------------------------------------------------------------------


def test_batch_equals_one_by_one_with_one_call_per_round():
    rng = np.random.default_rng(3)
    prompts, tables, lists = [], {}, []
    for i, k in enumerate([8, 5, 1, 2, 8, 3, 16, 7]):
        p = rng.uniform(size=(k, k))
        p = np.triu(p, 1) + np.tril(1.0 - p.T, -1) + 0.5 * np.eye(k)
        p[rng.uniform(size=(k, k)) < 0.15] = 0.5  # some ties, made symmetric next
        p = np.triu(p, 1) + np.tril(1.0 - np.triu(p, 1).T, -1) + 0.5 * np.eye(k)
        ys = [f"p{i}-y{j}" for j in range(k)]
        prompts.append(f"prompt {i}")
        tables[f"prompt {i}"] = (p, ys)
        lists.append(ys)
    oracle = TableOracle(None, None, per_prompt=tables)
    for policy in ("first", "random", "drop", "tie"):
        counted = CountingOracle(oracle)
        batched = tournament_batch(counted, prompts, lists, tie_policy=policy, rng=11)
        children = np.random.default_rng(11).spawn(len(prompts))
        single = [
            tournament(oracle, x, ys, tie_policy=policy, rng=g)
            for x, ys, g in zip(prompts, lists, children)
        ]
        assert batched == single
        assert len(counted.calls) == 2 + 3  # round 1, ⌈log2 8⌉ = 3 bracket rounds, finals
        assert sum(counted.calls) == sum(r.queries for r in batched)


# ---- best / worst by reward --------------------------------------------------------------------


class LengthReward:
    def __init__(self):
        self.calls = 0

    def rewards(self, prompts, responses):
        self.calls += 1
        return np.array([float(len(r)) for r in responses])


def test_best_worst_by_reward_uses_k_rewards_and_no_pairwise_query():
    rm = LengthReward()
    assert isinstance(rm, RewardOracle)
    ys = ["aaa", "a", "aaaaa", "aa"]
    res = best_worst_by_reward(rm, "x", ys)
    assert (res.chosen, res.rejected, res.queries, rm.calls) == (2, 1, 4, 1)
    # A plain function works too; K = 1 keeps nothing and costs nothing.
    fn_res = best_worst_by_reward(lambda p, r: -np.array([len(y) for y in r], float), "x", ys)
    assert (fn_res.chosen, fn_res.rejected) == (1, 2)
    assert best_worst_by_reward(rm, "x", ["only"]) == TournamentResult(None, None, 0)


def test_best_worst_ties_follow_the_policy():
    ys = ["bb", "aa", "c", "dd", "e"]  # rewards by length: ties at max (0,1,3) and min (2,4)
    rm = LengthReward()
    res = best_worst_by_reward(rm, "x", ys)
    assert (res.chosen, res.rejected) == (0, 4)  # first maximiser, last minimiser
    same = ["x", "y", "z"]
    assert best_worst_by_reward(rm, "x", same, tie_policy="first")[:2] == (0, 2)
    assert best_worst_by_reward(rm, "x", same, tie_policy="drop")[:2] == (None, None)
    assert best_worst_by_reward(rm, "x", same, tie_policy="tie").is_tie
    picks = {best_worst_by_reward(rm, "x", ys, tie_policy="random", rng=s)[:2] for s in range(30)}
    assert picks <= {(a, b) for a in (0, 1, 3) for b in (2, 4)} and len(picks) > 2


def test_best_worst_batch_one_reward_call():
    rm = LengthReward()
    out = best_worst_by_reward_batch(rm, ["p", "q", "r"], [["a", "aaa"], ["z"], ["bb", "b", "bbb"]])
    assert rm.calls == 1
    assert [r[:3] for r in out] == [(1, 0, 2), (None, None, 0), (2, 1, 3)]


# ---- win-rates ---------------------------------------------------------------------------------


def test_win_rates_match_exact_matrix_row_means():
    panel, _ = AnnotatorPanel.condorcet(epsilon=0.1)
    ys = ["b ok", "c please please", "a please, thank you very much", "please", "zz"]
    exact = panel.preference_matrix("x", ys)
    counted = CountingOracle(panel)
    wr = win_rates(counted, "x", ys)
    assert wr.queries == sum(counted.calls) == 5 * 4 // 2 and counted.calls == [10]
    np.testing.assert_allclose(wr.matrix, exact, atol=1e-12)
    np.testing.assert_allclose(wr.win_rates, exact.mean(axis=1), atol=1e-12)
    # Averaging over the empirical policy: mean win-rate is exactly 1/2.
    assert wr.win_rates.mean() == pytest.approx(0.5)


def test_win_rates_both_orders_averages_position_bias():
    class Biased:  # prefers whatever is shown first by 0.1 on top of a table
        def __init__(self, table):
            self.table = table

        def prob_prefers(self, prompts, a, b):
            return np.clip(self.table.prob_prefers(prompts, a, b) + 0.1, 0, 1)

    table, ys = transitive_table([0.0, 1.0, -1.0])
    wr = win_rates(Biased(table), "x", ys, both_orders=True)
    assert wr.queries == 6
    np.testing.assert_allclose(wr.matrix, table.matrix(), atol=1e-12)
    batch = win_rates_batch(table, ["x", "x"], [ys, ys[:1]])
    np.testing.assert_allclose(batch[0].win_rates, table.matrix().mean(axis=1))
    assert batch[1].queries == 0 and batch[1].win_rates.tolist() == [0.5]
