"""The exact game objects against closed forms and independent computations (SPEC check 3)."""

from __future__ import annotations

import numpy as np
import pytest

from inpo.game import (
    best_response,
    duality_gap,
    exploitability,
    game_value,
    kl,
    make_game,
    nash_lp,
    regularized_nash,
    validate_matrix,
    win_rates,
)
from inpo.game import matrices as G


@pytest.mark.parametrize("name", list(G.GAMES))
def test_builtin_games_are_valid_preference_matrices(name):
    p = make_game(name, size=6, prompts=2, seed=3)
    assert p.ndim == 3 and p.shape[0] == 2
    assert np.allclose(p + np.swapaxes(p, 1, 2), 1.0)
    assert (p >= 0).all() and (p <= 1).all()


def test_validate_names_first_bad_entry():
    p = G.cyclic3()[0].copy()
    p[0, 2] = 1.3
    with pytest.raises(ValueError, match=r"\[0, 2\] = 1.3"):
        validate_matrix(p)
    p = G.cyclic3()[0].copy()
    p[1, 2] = 0.3  # P[2, 1] = 0.9: sum 1.2
    with pytest.raises(ValueError, match=r"P \+ Pᵀ = 1 at \[1, 2\]"):
        validate_matrix(p)
    with pytest.raises(ValueError, match="square"):
        validate_matrix(np.zeros((2, 3)))


def test_condorcet_panel_majority_is_cyclic():
    p = G.condorcet_panel()[0]
    assert p[0, 1] == pytest.approx(2 / 3) and p[1, 2] == pytest.approx(2 / 3)
    assert p[2, 0] == pytest.approx(2 / 3)
    noisy = G.condorcet_panel(noise=0.1)[0]
    assert noisy[0, 1] == pytest.approx(2 / 3 * 0.9 + 1 / 3 * 0.1)


def _random_policy(rng, m, n):
    return rng.dirichlet(np.ones(n), size=m)


@pytest.mark.parametrize("tau", [0.5, 0.1, 0.01])
def test_gap_closed_form_matches_best_responses(tau):
    rng = np.random.default_rng(0)
    p = G.random_intransitive(5, 4, seed=1)
    ref = _random_policy(rng, 4, 5)
    pi = _random_policy(rng, 4, 5)
    br = best_response(p, pi, ref, tau)
    # min over π2 of J(π, π2): by symmetry (P(π ≻ π2) = 1 − P(π2 ≻ π)) it is attained at BR(π).
    direct = game_value(p, br, pi, ref, tau) - game_value(p, pi, br, ref, tau)
    assert np.allclose(duality_gap(p, pi, ref, tau), direct, atol=1e-12)
    # BR beats any other policy against π.
    for _ in range(20):
        other = _random_policy(rng, 4, 5)
        assert (game_value(p, br, pi, ref, tau) >= game_value(p, other, pi, ref, tau) - 1e-12).all()
    assert (duality_gap(p, pi, ref, tau) > 0).all()


def test_unregularised_gap_and_exploitability():
    p = G.cyclic3()
    pi = np.array([[1.0, 0.0, 0.0]])
    # Against pure a, b wins with 0.9: gap = 2·0.9 − 1, exploitability 0.4.
    assert duality_gap(p, pi)[0] == pytest.approx(0.8)
    assert exploitability(p, pi)[0] == pytest.approx(0.4)
    assert kl(np.array([[0.5, 0.5, 0.0]]), np.array([[0.25, 0.25, 0.5]]))[0] == pytest.approx(
        np.log(2)
    )


@pytest.mark.parametrize("name", ["random", "gpm", "bt", "cyclic3", "rps", "condorcet_winner"])
@pytest.mark.parametrize("tau", [1.0, 0.1, 0.005])
def test_regularized_nash_fixed_point_and_zero_gap(name, tau):
    p = make_game(name, size=8, prompts=3, seed=7)
    rng = np.random.default_rng(1)
    ref = _random_policy(rng, p.shape[0], p.shape[1])
    star = regularized_nash(p, ref, tau)
    # Fixed point π* ∝ π_ref exp(P(y ≻ π*)/τ), checked in log space.
    logits = np.log(ref) + win_rates(p, star) / tau
    fixed = np.exp(logits - logits.max(-1, keepdims=True))
    fixed /= fixed.sum(-1, keepdims=True)
    assert np.abs(np.log(fixed) - np.log(star)).max() < 1e-10
    assert duality_gap(p, star, ref, tau).max() <= 1e-10
    assert np.allclose(best_response(p, star, ref, tau), star, atol=1e-10)


def test_regularized_nash_batched_equals_one_by_one():
    p = G.random_intransitive(8, 50, seed=2)
    star = regularized_nash(p, tau=0.05)
    for k in (0, 17, 49):
        assert np.allclose(regularized_nash(p[k], tau=0.05)[0], star[k], atol=1e-12)


def test_regularized_nash_rejects_tau_zero():
    with pytest.raises(ValueError, match="nash_lp"):
        regularized_nash(G.rps(), tau=0.0)


def test_lp_nash_known_answers():
    assert np.allclose(nash_lp(G.rps()), 1 / 3)
    assert np.allclose(nash_lp(G.cyclic3()), [[4 / 11, 3 / 11, 4 / 11]])
    assert np.allclose(nash_lp(G.condorcet_panel()), 1 / 3)
    # A Condorcet winner gives a pure Nash at τ = 0.
    assert np.allclose(nash_lp(G.condorcet_winner(6, seed=4)), [[1, 0, 0, 0, 0, 0]])
    # BT: the best response is pure on the highest reward.
    r = np.array([0.3, 2.0, -1.0, 0.5])
    assert np.allclose(nash_lp(G.bradley_terry(r)), np.eye(4)[1])


def test_lp_nash_is_unexploitable_on_random_games():
    p = G.random_intransitive(8, 10, seed=5)
    star = nash_lp(p)
    assert exploitability(p, star).max() <= 1e-9
    assert duality_gap(p, star, tau=0.0).max() <= 2e-9


def test_regularized_nash_approaches_lp_nash_as_tau_vanishes():
    p = G.random_intransitive(6, 5, seed=11)
    lp = nash_lp(p)
    small = regularized_nash(p, tau=1e-4)
    assert np.abs(small - lp).max() < 1e-2
    assert exploitability(p, small).max() < 2e-3
    # RPS with a uniform reference: the regularised Nash is uniform for every τ.
    assert np.allclose(regularized_nash(G.rps(), tau=0.01), 1 / 3)
