"""Exact updates of INPO and its peers (SPEC checks 1, 3 and 4)."""

from __future__ import annotations

import numpy as np
import pytest

from inpo.game import (
    ALGORITHMS,
    duality_gap,
    exploitability,
    inpo_local_rate,
    nash_lp,
    regularized_nash,
    run_algorithm,
    win_rates,
)
from inpo.game import matrices as G
from inpo.game.algorithms import bt_fit, inpo_step, sppo_step


def _rand(rng, m, n):
    return rng.dirichlet(np.ones(n), size=m)


@pytest.mark.parametrize("eta,tau", [(0.005, 0.005 / 3), (0.5, 0.2), (2.0, 0.0), (1.0, 1.0)])
def test_check1_exact_update_identity(eta, tau):
    """h_t(π_{t+1}, y, y') = (P(y ≻ π_t) − P(y' ≻ π_t))/η for every pair."""
    rng = np.random.default_rng(0)
    p = G.random_intransitive(6, 3, seed=0)
    ref, pi_t = _rand(rng, 3, 6), _rand(rng, 3, 6)
    nxt = inpo_step(p, pi_t, ref, eta=eta, tau=tau)
    r = tau / eta
    logs = np.log(nxt) - r * np.log(ref) - (1 - r) * np.log(pi_t)
    h = logs[:, :, None] - logs[:, None, :]
    w = win_rates(p, pi_t)
    want = (w[:, :, None] - w[:, None, :]) / eta
    assert np.abs(h - want).max() <= 1e-9 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("algorithm", ["inpo", "mmd", "extragradient"])
def test_check3_iterated_updates_reach_regularised_nash(seed, algorithm):
    """On random 8×8 games (η = 1, τ = η/3: inside the stable range) the gap falls to ≤ 1e-8."""
    p = G.random_intransitive(8, 4, seed=seed)
    ref = _rand(np.random.default_rng(seed + 100), 4, 8)
    eta, tau = 1.0, 1.0 / 3
    assert (inpo_local_rate(p, ref, eta=eta, tau=tau) < 1).all()
    tr = run_algorithm(algorithm, p, ref, eta=eta, tau=tau, iterations=150)
    assert tr.gap[-1] <= 1e-8
    assert np.abs(tr.policy - regularized_nash(p, ref, tau)).max() < 1e-6


@pytest.mark.parametrize("algorithm", ["inpo", "mmd", "extragradient", "online_ipo", "ipo"])
def test_regularised_nash_is_a_fixed_point(algorithm):
    p = G.random_intransitive(6, 2, seed=9)
    ref = _rand(np.random.default_rng(2), 2, 6)
    tau = 0.2
    star = regularized_nash(p, ref, tau)
    step = ALGORITHMS[algorithm][0]
    kwargs = {"ridge": 0.0} if algorithm == "ipo" else {}
    assert np.abs(step(p, star, ref, eta=1.0, tau=tau, **kwargs) - star).max() < 1e-9


def test_unregularised_nash_is_comal_fixed_point():
    p = G.cyclic3()
    star = nash_lp(p)
    assert np.abs(ALGORITHMS["comal"][0](p, star, None, eta=1.0, tau=0.1) - star).max() < 1e-9


def test_stable_range_and_paper_default_outside_it():
    p = G.cyclic3()
    assert inpo_local_rate(p, eta=1.0, tau=0.1)[0] < 1
    # The paper's LLM default step is far outside the tabular stable range: INPO cycles.
    eta = 0.005
    assert inpo_local_rate(p, eta=eta, tau=eta / 3)[0] > 1
    tr = run_algorithm("inpo", p, eta=eta, tau=eta / 3, iterations=300)
    assert min(tr.gap[-50:]) > 1e-3


def test_check4_cyclic3_inpo_converges_dpo_ipo_do_not():
    """COMAL's observation on P(b≻a)=P(c≻b)=0.9, P(a≻c)=0.8 (η = 1, τ = 0.1)."""
    p = G.cyclic3()
    eta, tau = 1.0, 0.1
    inpo = run_algorithm("inpo", p, eta=eta, tau=tau, iterations=300)
    assert inpo.gap[-1] <= 1e-8
    for name in ("dpo", "ipo", "online_ipo"):
        tr = run_algorithm(name, p, eta=eta, tau=tau, iterations=300)
        tail = np.array(tr.gap[-60:])
        assert tail.min() > 1e-2, name  # never near the regularised Nash
        assert tail.max() - tail.min() > 1e-1, name  # it keeps cycling
    # COMAL's outer loop reaches the unregularised Nash (4/11, 3/11, 4/11).
    comal = run_algorithm("comal", p, eta=eta, tau=tau, iterations=60)
    assert comal.exploitability[-1] <= 1e-10
    assert np.allclose(comal.policy, nash_lp(p), atol=1e-8)
    # Plain multiplicative weights (SPPO's exact update) does not converge in the last iterate.
    sppo = run_algorithm("sppo", p, eta=eta, tau=tau, iterations=300)
    assert min(sppo.exploitability[-100:]) > 1e-2


def test_comal_drives_exploitability_down_on_random_games():
    """Random 8×8 games often have a Nash on a face (some responses unplayed) and sometimes a
    degenerate Nash set; COMAL's KL-proximal steps then approach it sublinearly, so we check the
    exploitability, not the distance to one LP solution."""
    p = G.random_intransitive(8, 3, seed=21)
    tr = run_algorithm("comal", p, eta=1.0, tau=0.1, iterations=300)
    assert tr.exploitability[-1] <= 1e-3 * tr.initial_exploitability
    assert tr.exploitability[-1] <= 1e-3


def test_condorcet_winner_pure_nash_by_comal():
    p = G.condorcet_winner(5, seed=3)
    tr = run_algorithm("comal", p, eta=1.0, tau=0.05, iterations=300)
    assert tr.policy[0, 0] > 1 - 1e-4


def test_rps_nash_is_uniform():
    p = G.rps()
    ref = np.array([[0.6, 0.3, 0.1]])
    assert np.allclose(nash_lp(p), 1 / 3)
    tr = run_algorithm("comal", p, ref, eta=1.0, tau=0.1, iterations=200)
    assert np.allclose(tr.policy, 1 / 3, atol=1e-6)


def test_nash_md_constant_step_is_biased_but_close():
    """Nash-MD with a constant step has a fixed point near, not at, π* (Munos et al., Thm 1)."""
    p = G.cyclic3()
    tr = run_algorithm("nash_md", p, eta=1.0, tau=0.1, iterations=500)
    assert 1e-7 < tr.gap[-1] < 1e-3


def test_sppo_equals_inpo_without_kl():
    rng = np.random.default_rng(3)
    p = G.random_intransitive(5, 2, seed=3)
    pi, ref = _rand(rng, 2, 5), _rand(rng, 2, 5)
    assert np.allclose(sppo_step(p, pi, ref, eta=0.7), inpo_step(p, pi, ref, eta=0.7, tau=0.0))


def test_bt_fit_matches_win_rates_against_sampling_policy():
    """The population BT MLE's score equations: P_BT(y ≻ π) = P(y ≻ π) for every y with π(y) > 0."""
    rng = np.random.default_rng(4)
    p = G.random_intransitive(6, 3, seed=4)
    pi = _rand(rng, 3, 6)
    r = bt_fit(p, pi)
    p_bt = 1 / (1 + np.exp(-(r[:, :, None] - r[:, None, :])))
    assert np.abs(win_rates(p_bt, pi) - win_rates(p, pi)).max() < 1e-10
    # On a BT game the fit recovers the rewards (centred).
    true = np.array([0.5, -1.0, 2.0, 0.0])
    fit = bt_fit(G.bradley_terry(true), _rand(rng, 1, 4))
    assert np.allclose(fit[0], true - true.mean(), atol=1e-8)


def test_run_algorithm_unknown_name():
    with pytest.raises(ValueError, match="did you mean 'nash_md'"):
        run_algorithm("nashmd", G.rps(), eta=1.0, tau=0.1, iterations=1)


def test_metrics_are_means_over_prompts():
    p = G.random_intransitive(5, 3, seed=1)
    tr = run_algorithm("inpo", p, eta=1.0, tau=0.2, iterations=1)
    from inpo.game.algorithms import inpo_step

    nxt = inpo_step(p, np.full((3, 5), 0.2), np.full((3, 5), 0.2), eta=1.0, tau=0.2)
    assert tr.gap[0] == pytest.approx(duality_gap(p, nxt, None, 0.2).mean())
    assert tr.exploitability[0] == pytest.approx(exploitability(p, nxt).mean())
