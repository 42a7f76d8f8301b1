"""Benchmark: solving the regularised Nash of many tabular games, and iterations to 1e-8.

1. Time to solve the τ-regularised Nash to duality gap ≤ 1e-10 for 10k prompts × 8×8 games,
   batched (damped Newton, ``inpo.game.regularized_nash``), against two baselines in the same
   run: the same solver one prompt at a time (on a subsample, extrapolated), and the batched
   first-order INPO iteration run until every prompt's gap ≤ 1e-10. Target: < 1 s batched.
2. Iterations for each algorithm to reach gap ≤ 1e-8 on random 8×8 games (η = 1, τ = η/3),
   median over prompts; "—" where it never gets there.

Writes ``benchmarks/results/game_nash.md``. Run: ``python benchmarks/game_nash.py``.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np

from inpo.game import ALGORITHMS, duality_gap, regularized_nash
from inpo.game import matrices as G
from inpo.game.algorithms import inpo_step

OUT = Path(__file__).parent / "results" / "game_nash.md"


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> int:
    m, n = 10_000, 8
    sub = 200  # prompts timed one at a time (then extrapolated)
    rows = []
    for tau in (0.1, 0.01):
        p = G.random_intransitive(n, m, seed=0)
        t_batched, star = best_of(lambda p=p, tau=tau: regularized_nash(p, tau=tau))
        gap = duality_gap(p, star, tau=tau).max()
        t_loop, _ = best_of(
            lambda p=p, tau=tau: [regularized_nash(p[k], tau=tau) for k in range(sub)], 1
        )
        t_loop *= m / sub

        def first_order(p=p, tau=tau):
            pi = np.full((m, n), 1 / n)
            eta = 3 * tau if tau >= 0.1 else 1.0
            for it in range(1, 3001):
                pi = inpo_step(p, pi, None, eta=eta, tau=tau)
                if it % 10 == 0 and duality_gap(p, pi, tau=tau).max() <= 1e-10:
                    return it, 1e-10
            return None, float(duality_gap(p, pi, tau=tau).max())

        t_fo, (iters, fo_gap) = best_of(first_order, 1)
        rows.append((tau, t_batched, gap, t_loop, t_fo, iters, fo_gap))
        print(
            f"tau={tau}: batched {t_batched:.3f}s (max gap {gap:.1e}), one-by-one {t_loop:.2f}s, "
            f"INPO iteration {t_fo:.2f}s ({iters} its)",
            file=sys.stderr,
        )

    eta, tau = 1.0, 1.0 / 3
    p = G.random_intransitive(n, 200, seed=1)
    its = {}
    for name in ALGORITHMS:
        pi = np.full((200, n), 1 / n)
        step = ALGORITHMS[name][0]
        first = np.full(200, -1)
        for t in range(1, 1001):
            pi = step(p, pi, np.full((200, n), 1 / n), eta=eta, tau=tau)
            g = duality_gap(p, pi, tau=tau)
            first[(first < 0) & (g <= 1e-8)] = t
        reached = first[first > 0]
        its[name] = (np.median(reached) if len(reached) == 200 else None, len(reached))

    lines = [
        "# Regularised Nash of tabular games",
        "",
        f"Measured {datetime.date.today()} on {platform.machine()} "
        f"({platform.processor() or 'cpu'}), Python {platform.python_version()}, NumPy {np.__version__}; "
        "command `python benchmarks/game_nash.py` (best of 3 for the batched solver).",
        "",
        f"## Solve to duality gap ≤ 1e-10: {m:,} prompts × {n}×{n} random games, uniform reference",
        "",
        "| τ | batched Newton (s) | max gap | one prompt at a time (s, extrapolated) | speed-up | "
        "batched INPO iteration to 1e-10 (s) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for tau_, tb, gap, tl, tf, iters, fo_gap in rows:
        fo = f"{tf:.2f} ({iters} its)" if iters else f"> {tf:.1f} (3000 its: max gap {fo_gap:.1e})"
        lines.append(
            f"| {tau_} | {tb:.3f} | {gap:.1e} | {tl:.2f} | {tl / tb:.0f}× | {fo} | {tf / tb:.0f}× |"
        )
    lines += [
        "",
        "Target: < 1 s batched. The INPO iteration uses η = 3τ for τ = 0.1 (the paper's ratio) "
        "and η = 1 for τ = 0.01 (η = 3τ is outside the stable range there; even with η = 1 "
        "some of the 10k games are outside it, λ_max² ≥ τ(2η − τ), and cycle).",
        "",
        f"## Iterations to gap ≤ 1e-8 (η = {eta}, τ = η/3, 200 random 8×8 games, from uniform)",
        "",
        "| algorithm | median iterations | games that reached 1e-8 in 1000 |",
        "|---|---|---|",
    ]
    for name, (med, cnt) in its.items():
        lines.append(f"| {name} | {'—' if med is None else int(med)} | {cnt}/200 |")
    lines += [
        "",
        "nash_md (constant step) has a biased fixed point; sppo has no KL term and cycles; "
        "comal solves a different (unregularised) target, so its regularised gap does not vanish; "
        "dpo (BT fit) does not target the general-preference Nash. online_ipo and ipo converge "
        "here only because τ = 1/3 is large (see `tests/test_game_algorithms.py` for τ = 0.1).",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
