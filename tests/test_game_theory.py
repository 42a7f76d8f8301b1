"""INPO's theory reproduced in the tabular testbed: the rates of Theorems 3 and 4, as log-log slopes.

* Theorem 3: with a constant ``η`` chosen for the horizon (``η ∝ √T``), the duality gap of the
  *uniform mixture* of the iterates is ``O(1/√T)``. On the unregularised game (``τ = 0``, where the
  last iterate of multiplicative weights cycles) the measured slope of the mixture's
  exploitability over ``T ∈ {256, 1024, 4096}`` is −0.5 within 0.1, on three random games;
  the last iterate does not converge.
* Theorem 4: with ``η_t = τ (t + 2) / 2`` the last iterate's ``KL(π* ‖ π_T)`` is ``O(1/T)``. The
  bound's ``1/T`` comes from the error each update's step makes; the exact (noise-free) update on
  these games is far faster (slope ≈ −4: the bound holds, with room). With the win rates
  estimated — Gaussian noise of std 0.05 on ``P(y ≻ π_t)`` each update, as a sampled oracle gives
  — the slope over ``T ∈ {64, 256, 1024}`` is −1 within 0.2, while a constant ``η`` stalls at a
  noise floor (slope ≈ 0): the reason for the schedule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from inpo.game import make_game
from inpo.game.algorithms import run_algorithm, schedule_eta
from inpo.game.exact import kl, regularized_nash

SEEDS = (0, 1, 2)


def _slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _game(seed: int):
    p = make_game("random", size=8, prompts=10, seed=seed)
    return p, np.full(p.shape[:2], 1 / 8)


@pytest.mark.parametrize("seed", SEEDS)
def test_theorem_3_the_average_iterate_gap_falls_as_one_over_root_t(seed):
    p, ref = _game(seed)
    horizons = [256, 1024, 4096]
    avg, last = [], []
    for t in horizons:
        tr = run_algorithm(
            "inpo", p, ref, eta=0.5 * np.sqrt(t), tau=0.0, iterations=t, average=True
        )
        avg.append(tr.avg_exploitability[-1])
        last.append(tr.exploitability[-1])
    assert abs(_slope(horizons, avg) + 0.5) < 0.1, avg
    assert min(last) > 2 * avg[-1]  # the last iterate cycles: only the average converges


@pytest.mark.parametrize("seed", SEEDS)
def test_theorem_4_the_decay_schedule_gives_a_one_over_t_last_iterate(seed):
    p, ref = _game(seed)
    tau = 0.3
    star = regularized_nash(p, ref, tau)

    def kl_after(t, schedule, noise):
        tr = run_algorithm(
            "inpo", p, ref, eta=1.0, tau=tau, iterations=t, schedule=schedule, noise=noise,
            seed=seed,
        )  # fmt: skip
        return float(kl(star, tr.policy).mean())

    horizons = [64, 256, 1024]
    noisy = [kl_after(t, "decay", 0.05) for t in horizons]
    assert abs(_slope(horizons, noisy) + 1.0) < 0.2, noisy
    constant = [kl_after(t, "constant", 0.05) for t in horizons]
    assert abs(_slope(horizons, constant)) < 0.2 and constant[-1] > 10 * noisy[-1]
    exact = [kl_after(t, "decay", 0.0) for t in (16, 64, 256)]
    assert _slope((16, 64, 256), exact) < -1.0  # the bound holds, and exact updates beat it


def test_the_decay_schedule_is_the_papers():
    etas = [schedule_eta("decay", t, eta=9.0, tau=0.2) for t in range(3)]
    assert etas == pytest.approx([0.2, 0.3, 0.4])  # tau (t + 2) / 2
    assert schedule_eta("constant", 5, eta=9.0, tau=0.2) == 9.0
    with pytest.raises(ValueError, match="needs tau > 0"):
        schedule_eta("decay", 0, eta=1.0, tau=0.0)
    with pytest.raises(ValueError, match="noise is supported for"):
        run_algorithm("comal", make_game("rps"), eta=1.0, tau=0.1, iterations=2, noise=0.1)


def test_inpo_game_schedule_average_and_noise_on_the_command_line(capsys, tmp_path):
    from inpo.cli import main

    args = ["game", "--game", "random", "--size", "6", "--prompts", "3", "--tau", "0.3",
            "--algorithms", "inpo,sppo", "--iterations", "40", "--plot", "none"]  # fmt: skip
    assert main([*args, "--schedule", "decay", "--average", "--noise", "0.05", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schedule"] == "decay" and out["noise"] == 0.05
    assert len(out["results"]["inpo"]["avg_gap"]) == 40
    assert main([*args, "--schedule", "decay", "--average"]) == 0
    text = capsys.readouterr().out
    assert "eta_t=tau(t+2)/2" in text and "uniform mixture of the iterates" in text
    assert main([*args, "--schedule", "decay", "--tau", "0"]) == 2
    assert "needs --tau > 0" in capsys.readouterr().err
    assert main([*args, "--algorithms", "comal", "--noise", "0.1"]) == 2
    assert "--noise is supported for" in capsys.readouterr().err
