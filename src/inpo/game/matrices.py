"""Preference matrices of tabular games (SPEC "Notation").

A game over ``N`` responses for ``M`` prompts is a float64 array ``P`` of shape ``[M, N, N]`` with
``P[m, i, j] = P(y_i ≻ y_j | x_m)``, entries in ``[0, 1]``, ``P + Pᵀ = 1`` (so the diagonal is
``1/2``). Every constructor returns that batched shape (``M = 1`` unless ``prompts`` says
otherwise). ``P − 1/2`` is the skew-symmetric payoff of the symmetric zero-sum game.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from inpo.errors import did_you_mean

__all__ = [
    "GAMES",
    "bradley_terry",
    "condorcet_panel",
    "condorcet_winner",
    "cyclic3",
    "gpm",
    "load_matrix",
    "make_game",
    "random_intransitive",
    "rps",
    "validate_matrix",
]


def _batched(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p[None] if p.ndim == 2 else p


def validate_matrix(
    p: np.ndarray, *, atol: float = 1e-9, name: str = "preference matrix"
) -> np.ndarray:
    """Return ``p`` as ``[M, N, N]`` float64, or raise ``ValueError`` naming the first bad entry.

    Checks: square, finite, entries in ``[0, 1]``, ``P + Pᵀ = 1`` (to ``atol``).
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim not in (2, 3) or p.shape[-1] != p.shape[-2] or p.shape[-1] < 1:
        raise ValueError(f"{name} must be square N×N (or M×N×N), got shape {p.shape}")
    p = _batched(p)
    bad = ~np.isfinite(p) | (p < -atol) | (p > 1 + atol)
    if bad.any():
        m, i, j = np.argwhere(bad)[0]
        where = f"[{i}, {j}]" if p.shape[0] == 1 else f"[{m}, {i}, {j}]"
        raise ValueError(f"{name} entry {where} = {float(p[m, i, j])!r} is not in [0, 1]")
    err = np.abs(p + np.swapaxes(p, -1, -2) - 1.0)
    if (err > atol).any():
        m, i, j = np.argwhere(err > atol)[0]
        where = f"[{i}, {j}]" if p.shape[0] == 1 else f"[{m}, {i}, {j}]"
        rev = f"[{j}, {i}]" if p.shape[0] == 1 else f"[{m}, {j}, {i}]"
        raise ValueError(
            f"{name} violates P + Pᵀ = 1 at {where}: P{where} = {float(p[m, i, j])!r}, "
            f"P{rev} = {float(p[m, j, i])!r} (sum {float(p[m, i, j] + p[m, j, i])!r})"
        )
    return np.clip(p, 0.0, 1.0)


def load_matrix(path: str | Path) -> np.ndarray:
    """Load a preference matrix from ``.npy`` (N×N or M×N×N) or ``.csv`` (N×N) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"matrix file '{path}' does not exist")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif path.suffix == ".csv":
        try:
            arr = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as err:
            raise ValueError(f"matrix file '{path}' is not a numeric CSV: {err}") from err
    else:
        raise ValueError(f"matrix file '{path}' must end in .npy or .csv")
    return validate_matrix(arr, name=f"matrix in '{path}'")


def _tile(p: np.ndarray, prompts: int) -> np.ndarray:
    return np.repeat(_batched(p), prompts, axis=0) if prompts > 1 else _batched(p)


def rps(prompts: int = 1) -> np.ndarray:
    """Rock–paper–scissors (responses R, P, S): deterministic wins, a pure cycle; Nash is uniform."""
    p = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])
    return _tile(p, prompts)


def cyclic3(prompts: int = 1) -> np.ndarray:
    """The 3×3 cycle of SPEC check 4 (responses a, b, c): ``P(b≻a)=P(c≻b)=0.9``, ``P(a≻c)=0.8``."""
    p = np.array([[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]])
    return _tile(p, prompts)


def bradley_terry(rewards: Sequence[float] | np.ndarray) -> np.ndarray:
    """Transitive game from rewards ``[N]`` or ``[M, N]``: ``P(i ≻ j) = σ(r_i − r_j)``."""
    r = np.atleast_2d(np.asarray(rewards, dtype=np.float64))
    diff = r[:, :, None] - r[:, None, :]
    return 1.0 / (1.0 + np.exp(-diff))


def random_intransitive(n: int = 8, prompts: int = 1, seed: int = 0) -> np.ndarray:
    """Random games: ``P = 1/2 + (U − Uᵀ)/2`` with ``U ~ Uniform[−1/2, 1/2]^{N×N}``.

    Entries lie in ``[0, 1]``; generic draws are intransitive (no reward reproduces them).
    """
    rng = np.random.default_rng(seed)
    u = rng.uniform(-0.5, 0.5, size=(prompts, n, n))
    return 0.5 + (u - np.swapaxes(u, -1, -2)) / 2.0


def condorcet_panel(
    rankings: Sequence[Sequence[int]] | None = None,
    weights: Sequence[float] | None = None,
    noise: float = 0.0,
) -> np.ndarray:
    """A panel of annotator groups, each with its own strict ranking (best first).

    ``P(i ≻ j) = Σ_g w_g [(1 − ε)·1{i ≻_g j} + ε·1{j ≻_g i}]`` with label noise ``ε``. The default
    is the classic Condorcet panel over three responses — rankings ``abc``, ``bca``, ``cab`` with
    equal weights — whose majority is cyclic (``P(a≻b) = P(b≻c) = P(c≻a) = 2/3``).
    """
    rankings = [list(r) for r in (rankings or [[0, 1, 2], [1, 2, 0], [2, 0, 1]])]
    n = len(rankings[0])
    if any(sorted(r) != list(range(n)) for r in rankings):
        raise ValueError(f"each ranking must be a permutation of 0..{n - 1}, got {rankings}")
    w = (
        np.full(len(rankings), 1.0 / len(rankings))
        if weights is None
        else np.asarray(weights, float)
    )
    if len(w) != len(rankings) or (w < 0).any() or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"weights must be {len(rankings)} non-negative numbers summing to 1")
    if not 0.0 <= noise <= 0.5:
        raise ValueError(f"noise must be in [0, 0.5], got {noise!r}")
    p = np.full((n, n), 0.5)
    for rank, wg in zip(rankings, w):
        pos = np.empty(n, dtype=int)
        pos[rank] = np.arange(n)
        better = pos[:, None] < pos[None, :]
        worse = pos[:, None] > pos[None, :]
        p += wg * ((1 - noise) * better + noise * worse - 0.5 * (better | worse))
    return p[None]


def condorcet_winner(n: int = 5, seed: int = 0, margin: float = 0.1) -> np.ndarray:
    """A random intransitive game with a Condorcet winner: response 0 beats every other.

    Its ``τ = 0`` Nash is the pure strategy on response 0.
    """
    p = random_intransitive(n, 1, seed)[0]
    rng = np.random.default_rng(seed + 1)
    wins = 0.5 + rng.uniform(margin, 0.5, size=n - 1)
    p[0, 1:] = wins
    p[1:, 0] = 1.0 - wins
    return p[None]


def gpm(
    n: int = 8, dim: int = 4, prompts: int = 1, seed: int = 0, scale: float = 2.0
) -> np.ndarray:
    """General preference model (seed 003): skew-symmetric embeddings.

    Each response has an embedding ``v ∈ R^{2k}``; ``P(i ≻ j) = σ(scale · v_iᵀ R v_j)`` with
    ``R`` block-diagonal of 2×2 rotations ``[[0, −1], [1, 0]]``, so the score is skew-symmetric
    and cycles are representable (a Bradley–Terry reward cannot).
    """
    if dim % 2:
        raise ValueError(f"gpm dim must be even, got {dim}")
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(prompts, n, dim)) / np.sqrt(dim)
    r = np.zeros((dim, dim))
    for k in range(0, dim, 2):
        r[k, k + 1], r[k + 1, k] = -1.0, 1.0
    s = np.einsum("mid,de,mje->mij", v, r, v)
    return 1.0 / (1.0 + np.exp(-scale * s))


#: Built-in games by name: each maker takes ``(size, prompts, seed)``.
GAMES: dict[str, tuple[Callable[[int, int, int], np.ndarray], str]] = {
    "rps": (lambda n, m, s: rps(m), "rock–paper–scissors (3 responses)"),
    "cyclic3": (lambda n, m, s: cyclic3(m), "3×3 cycle P(b≻a)=P(c≻b)=0.9, P(a≻c)=0.8"),
    "random": (lambda n, m, s: random_intransitive(n, m, s), "random intransitive N×N"),
    "bt": (
        lambda n, m, s: bradley_terry(np.random.default_rng(s).normal(size=(m, n))),
        "Bradley–Terry (transitive) with Gaussian rewards",
    ),
    "condorcet": (lambda n, m, s: _tile(condorcet_panel()[0], m), "3-group panel, cyclic majority"),
    "condorcet_winner": (
        lambda n, m, s: _tile(condorcet_winner(n, s)[0], m),
        "random game where response 0 beats all",
    ),
    "gpm": (lambda n, m, s: gpm(n, 4, m, s), "skew-symmetric embedding model (GPM)"),
}


def make_game(name: str, *, size: int = 8, prompts: int = 1, seed: int = 0) -> np.ndarray:
    """Build the built-in game ``name`` (see :data:`GAMES`) as ``[prompts, N, N]``."""
    if name not in GAMES:
        hint = did_you_mean(name, GAMES)
        raise ValueError(f"unknown game '{name}' (known: {', '.join(GAMES)}){hint}")
    return validate_matrix(GAMES[name][0](size, prompts, seed), name=f"game '{name}'")
