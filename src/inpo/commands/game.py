"""``inpo game``: run INPO and its peers on an exact tabular preference game.

Prints the duality gap of the ``τ``-regularised game and the unregularised exploitability per
iteration, for each algorithm; ``--json`` prints one JSON object instead; a log-scale
convergence plot (PNG) compares the algorithms.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from inpo.commands._args import ArgumentParser, non_negative_int
from inpo.console import progress
from inpo.errors import InpoError, did_you_mean

DEFAULT_ALGORITHMS = "inpo,online_ipo,sppo,nash_md,mmd,extragradient,comal,dpo,ipo"
NEEDS_TAU = {"online_ipo", "comal", "dpo", "ipo"}


def _parser() -> ArgumentParser:
    from inpo.game import ALGORITHMS, GAMES  # deferred: loads scipy

    games = ", ".join(GAMES)
    algs = ", ".join(ALGORITHMS)
    p = ArgumentParser(
        prog="inpo game",
        description="Run preference-learning algorithms on an exact tabular game and report the "
        "duality gap (KL-regularised game, the given tau) and exploitability per iteration.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--game", default="cyclic3", help=f"built-in game: {games} (default cyclic3)")
    src.add_argument(
        "--matrix", type=Path, help="preference matrix file (.npy N×N or M×N×N, .csv N×N)"
    )
    p.add_argument(
        "--reference",
        type=Path,
        help="reference policy file (.npy/.csv, [N] or [M, N]); default uniform",
    )
    p.add_argument("--algorithms", default=DEFAULT_ALGORITHMS, help=f"comma-separated: {algs}")
    p.add_argument(
        "--eta", type=float, default=1.0, help="eta > 0: the inverse step size (default 1.0)"
    )
    p.add_argument(
        "--tau", type=float, default=0.1, help="tau in [0, eta]: KL strength (default 0.1)"
    )
    p.add_argument("--iterations", type=int, default=100, help="number of updates (default 100)")
    p.add_argument(
        "--schedule",
        choices=("constant", "decay"),
        default="constant",
        help="eta of each update: constant (--eta), or decay: INPO's Theorem 4 "
        "eta_t = tau (t + 2) / 2 (needs tau > 0; --eta unused)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="std of Gaussian noise on the win rates P(y > pi_t) of every update (a sampled "
        "oracle's estimation error; inpo, online_ipo, sppo, mmd; seeded by --seed)",
    )
    p.add_argument(
        "--average",
        action="store_true",
        help="also report the uniform mixture of the iterates so far (INPO's Theorem 3 bounds "
        "its duality gap by O(1/sqrt(T)) with eta ~ sqrt(T))",
    )
    p.add_argument(
        "--size", type=int, default=8, help="responses for random/bt/gpm games (default 8)"
    )
    p.add_argument("--prompts", type=int, default=1, help="prompts (independent games) (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for random games (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", default="inpo-game.png", help="PNG path for the plot, or 'none'")
    p.add_argument(
        "--every",
        type=non_negative_int,
        default=0,
        help="print every k-th iteration (default 0: auto)",
    )
    return p


def _load_reference(path: Path, shape: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise InpoError(f"--reference file '{path}' does not exist")
    try:
        ref = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=1)
    except ValueError as err:
        raise InpoError(f"--reference file '{path}' is not numeric: {err}") from err
    ref = np.atleast_2d(np.asarray(ref, dtype=np.float64))
    if ref.shape[-1] != shape[1] or ref.shape[0] not in (1, shape[0]):
        raise InpoError(
            f"--reference in '{path}' has shape {ref.shape}; the game needs [{shape[1]}] or {list(shape)}"
        )
    bad = np.argwhere(~np.isfinite(ref) | (ref < 0))
    if len(bad):
        raise InpoError(
            f"--reference in '{path}' entry {tuple(bad[0])} = {ref[tuple(bad[0])]!r} is not a probability"
        )
    sums = ref.sum(axis=-1)
    if (np.abs(sums - 1) > 1e-6).any():
        raise InpoError(f"--reference in '{path}' must sum to 1 per row, got {sums.tolist()}")
    return np.broadcast_to(ref / sums[:, None], shape).copy()


def _validate(args) -> list[str]:
    from inpo.game import ALGORITHMS, GAMES  # deferred: loads scipy

    if not (math.isfinite(args.eta) and args.eta > 0):
        raise InpoError(f"--eta must be a number > 0, got {args.eta!r}")
    if not (math.isfinite(args.tau) and 0 <= args.tau <= args.eta):
        raise InpoError(f"--tau must be in [0, eta] = [0, {args.eta!r}], got {args.tau!r}")
    if args.iterations < 1:
        raise InpoError(f"--iterations must be >= 1, got {args.iterations}")
    if args.size < 2 or args.prompts < 1:
        raise InpoError(f"--size must be >= 2 and --prompts >= 1, got {args.size}, {args.prompts}")
    if args.matrix is None and args.game not in GAMES:
        hint = did_you_mean(args.game, GAMES)
        raise InpoError(f"unknown game '{args.game}' (allowed: {', '.join(GAMES)}){hint}")
    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not names:
        raise InpoError("--algorithms is empty")
    for name in names:
        if name not in ALGORITHMS:
            hint = did_you_mean(name, ALGORITHMS)
            raise InpoError(f"unknown algorithm '{name}' (allowed: {', '.join(ALGORITHMS)}){hint}")
        if name in NEEDS_TAU and args.tau == 0:
            raise InpoError(f"algorithm '{name}' needs --tau > 0 (allowed: (0, eta]), got 0")
    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise InpoError(f"--noise must be a number >= 0, got {args.noise!r}")
    from inpo.game.algorithms import NOISY  # deferred: loads scipy

    if args.noise and set(names) - NOISY:
        raise InpoError(
            f"--noise is supported for {', '.join(sorted(NOISY))}; not for "
            f"{', '.join(sorted(set(names) - NOISY))}"
        )
    if args.schedule == "decay" and args.tau == 0:
        raise InpoError("--schedule decay (eta_t = tau (t + 2) / 2) needs --tau > 0")
    return names


def _rows(iterations: int, every: int) -> list[int]:
    if every > 0:
        idx = list(range(every - 1, iterations, every))
    elif iterations <= 20:
        idx = list(range(iterations))
    else:
        idx = sorted({round(float(x)) - 1 for x in np.geomspace(1, iterations, 15)})
    if iterations - 1 not in idx:
        idx.append(iterations - 1)
    return idx


def plot_convergence(results: dict, path: Path, title: str) -> None:
    """Log-scale duality gap and exploitability per iteration, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ("-", "--", "-.", ":")
    for k, (name, res) in enumerate(results.items()):
        for ax, key in zip(axes, ("gap", "exploitability")):
            ys = np.maximum(np.asarray([res[f"initial_{key}"], *res[key]]), 1e-17)
            (line,) = ax.plot(np.arange(len(ys)), ys, label=name, lw=1.5, ls=styles[k % 4])
            if f"avg_{key}" in res:  # the iterates' uniform mixture, thin, in the same colour
                avg = np.maximum(np.asarray([res[f"initial_{key}"], *res[f"avg_{key}"]]), 1e-17)
                ax.plot(np.arange(len(avg)), avg, label=f"{name} (average)", lw=0.8,
                        color=line.get_color(), alpha=0.7)  # fmt: skip
    for ax, label in zip(axes, ("duality gap (regularised game)", "exploitability (τ = 0)")):
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    names = _validate(args)
    from inpo.game import load_matrix, make_game, run_algorithm  # deferred: loads scipy

    if args.matrix is not None:
        try:
            p = load_matrix(args.matrix)
        except ValueError as err:
            raise InpoError(str(err)) from err
        game_name = str(args.matrix)
    else:
        p = make_game(args.game, size=args.size, prompts=args.prompts, seed=args.seed)
        game_name = args.game
    shape = p.shape[:2]
    ref = _load_reference(args.reference, shape) if args.reference else np.full(shape, 1 / shape[1])

    total = args.iterations * len(names)
    bar = progress(total, "inpo game", enabled=total >= 2000, unit=" iterations")
    results: dict[str, dict] = {}
    for name in names:
        try:
            tr = run_algorithm(
                name,
                p,
                ref,
                eta=args.eta,
                tau=args.tau,
                iterations=args.iterations,
                callback=lambda _t: bar.update(1),
                schedule=args.schedule,
                average=args.average,
                noise=args.noise,
                seed=args.seed,
            )
        except (ValueError, RuntimeError) as err:
            raise InpoError(f"{name}: {err}") from err
        results[name] = {
            "gap": tr.gap,
            "exploitability": tr.exploitability,
            "initial_gap": tr.initial_gap,
            "initial_exploitability": tr.initial_exploitability,
            "final_policy": tr.policy.tolist(),
        }
        if args.average:
            results[name]["avg_gap"] = tr.avg_gap
            results[name]["avg_exploitability"] = tr.avg_exploitability
    bar.close()

    eta_text = "eta_t=tau(t+2)/2" if args.schedule == "decay" else f"eta={args.eta:g}"
    title = (
        f"{game_name}: {eta_text}, tau={args.tau:g}, {shape[0]} prompt(s) × {shape[1]} responses"
    )
    plot_path = None if args.plot.lower() == "none" else Path(args.plot)
    if plot_path is not None:
        plot_convergence(results, plot_path, title)
    if args.json:
        out = {
            "game": game_name,
            "eta": args.eta,
            "schedule": args.schedule,
            "noise": args.noise,
            "tau": args.tau,
            "iterations": args.iterations,
            "results": results,
            "plot": str(plot_path) if plot_path else None,
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0

    print(title)
    rows = _rows(args.iterations, args.every)
    width = max(11, *(len(n) + 1 for n in names))
    blocks = [
        ("gap", f"duality gap of the tau={args.tau:g}-regularised game (mean over prompts)"),
        ("exploitability", "exploitability max_y P(y > pi) - 1/2 (unregularised)"),
    ]
    if args.average:
        blocks += [
            ("avg_gap", "duality gap of the uniform mixture of the iterates so far"),
            ("avg_exploitability", "exploitability of the uniform mixture of the iterates so far"),
        ]
    for key, label in blocks:
        print(f"\n{label}, after each update:")
        print("iter".rjust(6) + "".join(n.rjust(width) for n in names))
        initial = "initial_" + key.removeprefix("avg_")  # the mixture of π_0 alone is π_0
        print("0".rjust(6) + "".join(f"{results[n][initial]:{width}.2e}" for n in names))
        for t in rows:
            print(f"{t + 1:6d}" + "".join(f"{results[n][key][t]:{width}.2e}" for n in names))
    if plot_path is not None:
        print(f"plot: {plot_path}")
    return 0
