"""The LM loss code held to the exact updates on a softmax table (SPEC check 2)."""

from __future__ import annotations

import numpy as np
import pytest

from inpo.game import matrices as G
from inpo.game.algorithms import dpo_step, inpo_step, online_ipo_step
from inpo.game.sampled import fit_table_policy, population_pairs, sampled_iteration, sampled_pairs


def _setup(seed=0, m=3, n=6):
    rng = np.random.default_rng(seed)
    p = G.random_intransitive(n, m, seed=seed)
    return p, rng.dirichlet(np.ones(n), size=m), rng.dirichlet(np.ones(n), size=m)


@pytest.mark.parametrize("eta,tau", [(0.5, 0.2), (1.0, 1.0 / 3), (2.0, 0.0), (0.3, 0.3)])
def test_check2_population_minimiser_is_exact_inpo_update(eta, tau):
    p, ref, pi_t = _setup()
    got = sampled_iteration(p, pi_t, ref, eta=eta, tau=tau)
    want = inpo_step(p, pi_t, ref, eta=eta, tau=tau)
    assert np.abs(got - want).max() <= 1e-6


def test_population_ipo_and_dpo_minimisers():
    p, ref, pi_t = _setup(1)
    pairs = population_pairs(p, pi_t)
    ipo = fit_table_policy("ipo", pairs, ref, pi_t, beta=0.3)
    assert np.abs(ipo - online_ipo_step(p, pi_t, ref, eta=1.0, tau=0.3)).max() <= 1e-6
    # The DPO loss on π_t-pairs lands on π_ref·exp(r̂_BT/β): the tabular iterative DPO.
    dpo = fit_table_policy("dpo", pairs, ref, pi_t, beta=0.3)
    assert np.abs(dpo - dpo_step(p, pi_t, ref, eta=1.0, tau=0.3, ridge=0.0)).max() <= 1e-6


def test_population_pairs_weights():
    p, _, pi_t = _setup(2, m=2, n=4)
    pairs = population_pairs(p, pi_t)
    assert len(pairs) == 2 * 4 * 3
    # Σ over ordered pairs with i ≠ j of π_i π_j (P_ij) = (1 − Σ π_i²)/2 per prompt (P_ij + P_ji = 1).
    per_prompt = np.bincount(pairs.prompt, weights=pairs.weight) * 2
    assert np.allclose(per_prompt, (1 - (pi_t**2).sum(-1)) / 2)


def test_sampled_pairs_follow_the_matrix():
    p = G.cyclic3()
    pi = np.full((1, 3), 1 / 3)
    pairs = sampled_pairs(p, pi, 30000, np.random.default_rng(0))
    # Among (a, b) comparisons, b wins 90%.
    ab = ((pairs.chosen == 1) & (pairs.rejected == 0)).sum()
    ba = ((pairs.chosen == 0) & (pairs.rejected == 1)).sum()
    assert ab / (ab + ba) == pytest.approx(0.9, abs=0.015)


def test_sampled_iteration_approaches_exact_update():
    p, ref, pi_t = _setup(3, m=1, n=4)
    eta, tau = 1.0, 0.3
    want = inpo_step(p, pi_t, ref, eta=eta, tau=tau)
    errs = []
    for n_pairs in (500, 50000):
        got = sampled_iteration(
            p, pi_t, ref, eta=eta, tau=tau, num_pairs=n_pairs, rng=np.random.default_rng(0)
        )
        errs.append(np.abs(got - want).max())
    assert errs[1] < 0.01 and errs[1] < errs[0]


def test_sampled_inpo_iterates_towards_regularised_nash():
    from inpo.game import duality_gap

    p = G.cyclic3()
    ref = np.full((1, 3), 1 / 3)
    rng = np.random.default_rng(0)
    pi = np.array([[0.7, 0.2, 0.1]])  # start away from the Nash
    g_start = duality_gap(p, pi, ref, 0.1)[0]
    for _ in range(8):
        pi = sampled_iteration(p, pi, ref, eta=1.0, tau=0.1, num_pairs=20000, rng=rng)
    assert duality_gap(p, pi, ref, 0.1)[0] < 0.5 * g_start


def test_tournament_pairs_on_a_transitive_table():
    """With deterministic labels the tournament keeps (best, worst) of each draw of K samples."""
    ranking = G.condorcet_panel([[3, 1, 0, 2]])  # one annotator: 3 ≻ 1 ≻ 0 ≻ 2, no noise
    pi = np.full((1, 4), 0.25)
    pairs = sampled_pairs(ranking, pi, 200, np.random.default_rng(0), selection="tournament", k=8)
    assert len(pairs) > 150  # draws of 8 that are all one response make no pair
    order = {3: 0, 1: 1, 0: 2, 2: 3}
    assert all(order[c] < order[r] for c, r in zip(pairs.chosen, pairs.rejected))
    # Best and worst of 8 uniform draws over 4 responses are almost always 3 and 2.
    assert np.mean((pairs.chosen == 3) & (pairs.rejected == 2)) > 0.8


def test_tournament_inpo_iteration_moves_towards_nash():
    from inpo.game import duality_gap

    p = G.cyclic3()
    ref = np.full((1, 3), 1 / 3)
    pi = np.array([[0.7, 0.2, 0.1]])
    g_start = duality_gap(p, pi, ref, 0.1)[0]
    nxt = sampled_iteration(
        p,
        pi,
        ref,
        eta=1.0,
        tau=0.1,
        num_pairs=3000,
        rng=np.random.default_rng(1),
        selection="tournament",
        k=4,
    )
    assert duality_gap(p, nxt, ref, 0.1)[0] < g_start
