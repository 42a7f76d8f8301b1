"""The exact preference-game testbed: tabular games, their exact solutions, and exact updates.

``inpo.game`` needs only NumPy and SciPy (``inpo.game.sampled`` also torch). See
:mod:`inpo.game.matrices` (games), :mod:`inpo.game.exact` (value, best response, duality gap,
exploitability, regularised Nash, LP Nash), :mod:`inpo.game.algorithms` (INPO and peers) and
:mod:`inpo.game.sampled` (a softmax-table policy trained with :mod:`inpo.losses`).
"""

from inpo.game.algorithms import ALGORITHMS, Trajectory, inpo_local_rate, run_algorithm
from inpo.game.exact import (
    best_response,
    duality_gap,
    exploitability,
    game_value,
    kl,
    nash_lp,
    regularized_nash,
    win_rates,
)
from inpo.game.matrices import GAMES, load_matrix, make_game, validate_matrix

__all__ = [
    "ALGORITHMS",
    "GAMES",
    "Trajectory",
    "best_response",
    "duality_gap",
    "exploitability",
    "game_value",
    "inpo_local_rate",
    "kl",
    "load_matrix",
    "make_game",
    "nash_lp",
    "regularized_nash",
    "run_algorithm",
    "validate_matrix",
    "win_rates",
]
