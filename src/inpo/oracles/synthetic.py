"""Synthetic preference oracles with exact answers, for tests and the tabular testbed.

* :class:`TableOracle` — an enumerable response set with a given preference matrix
  ``P[i, j] = P(y_i ≻ y_j)`` (``P + Pᵀ = 1``), optionally one matrix per prompt.
* :class:`AnnotatorPanel` — weighted groups of annotators with different tastes and label noise
  ``ε``; its majority can be cyclic (:meth:`AnnotatorPanel.condorcet`), so it is a general
  preference that no reward explains.
* :class:`HardLabelOracle` — turns any probabilistic oracle into binary labels (INPO trains on
  binary labels), drawn deterministically from a hash of ``(seed, prompt, pair)``.

All are deterministic given their seed, and count their queries in ``stats``. Only the standard
library and NumPy are imported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inpo.errors import ConfigError, OracleError
from inpo.oracles.base import OracleStats, PreferenceOracle

__all__ = [
    "AnnotatorGroup",
    "AnnotatorPanel",
    "HardLabelOracle",
    "TableOracle",
    "Taste",
    "ThresholdLabelOracle",
    "brevity",
    "hard_labels",
    "keyword",
    "lexicographic",
    "pair_uniform",
    "score_taste",
    "threshold_labels",
    "validate_preference_matrix",
]

_VERSION = "1"


def _digest(*parts: object) -> str:
    payload = json.dumps(parts, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _check_lengths(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> int:
    n = len(prompts)
    if len(a) != n or len(b) != n:
        raise OracleError(
            f"prob_prefers got {n} prompts, {len(a)} responses_a and {len(b)} responses_b; "
            "they must have the same length"
        )
    return n


# ---------------------------------------------------------------------------------------------
# Deterministic hard labels
# ---------------------------------------------------------------------------------------------


def pair_uniform(seed: int, prompt: str, a: str, b: str) -> float:
    """A uniform number in ``[0, 1)`` from SHA-256 of ``(seed, prompt, {a, b})`` (53 bits).

    The pair is taken unordered (sorted), so ``(a, b)`` and ``(b, a)`` share one draw.
    """
    lo, hi = sorted((a, b))
    h = hashlib.sha256(json.dumps([seed, prompt, lo, hi], ensure_ascii=False).encode("utf-8"))
    return (int.from_bytes(h.digest()[:8], "big") >> 11) / float(1 << 53)


def hard_labels(
    probs: np.ndarray, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *, seed: int
) -> np.ndarray:
    """Binary labels ``∈ {0, 1}`` with ``E[label] = P(a ≻ b)``, and ``½`` where ``P`` is ``½``.

    Each label is a Bernoulli draw with ``u = pair_uniform(seed, prompt, a, b)``: the same query
    always gets the same label, whatever the batch it comes in. The draw is made for the pair in
    sorted order, so labels are antisymmetric: ``label(a, b) = 1 − label(b, a)``. A probability
    of exactly ``½`` (e.g. a response against itself) stays a tie label ``½``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    out = np.empty_like(probs)
    for i, (p, x, ya, yb) in enumerate(zip(probs, prompts, a, b)):
        if p == 0.5:
            out[i] = 0.5
            continue
        u = pair_uniform(seed, x, ya, yb)
        if ya <= yb:  # canonical order: a first
            out[i] = 1.0 if u < p else 0.0
        else:  # canonical order is (b, a): draw for P(b ≻ a) = 1 − p, and flip
            out[i] = 0.0 if u < 1.0 - p else 1.0
    return out


class HardLabelOracle:
    """Any probabilistic oracle, answering with hard labels ``P ∈ {0, ½, 1}`` (see
    :func:`hard_labels`): ``E[answer] = P_inner(a ≻ b)``, deterministic given ``seed``."""

    def __init__(self, oracle: PreferenceOracle, *, seed: int = 0) -> None:
        inner = getattr(oracle, "oracle_id", None)
        if not isinstance(inner, str) or not inner:
            raise ConfigError(f"{type(oracle).__name__} has no oracle_id to derive one from")
        self.oracle = oracle
        self.seed = int(seed)
        self.oracle_id = f"hard-labels-v{_VERSION}(seed={self.seed})/{inner}"
        self.stats = OracleStats()

    def prob_prefers(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        n = _check_lengths(prompts, responses_a, responses_b)
        probs = np.asarray(
            self.oracle.prob_prefers(prompts, responses_a, responses_b), dtype=np.float64
        )
        if probs.shape != (n,):
            raise OracleError(f"inner oracle returned shape {probs.shape} for {n} queries")
        bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
        if bad.any():  # a label drawn from NaN or 1.7 would be cached as if it were an answer
            j = int(np.flatnonzero(bad)[0])
            raise OracleError(
                f"inner oracle returned P = {float(probs[j])!r} for query {j} (prompt "
                f"{str(prompts[j])[:60]!r}); expected a value in [0, 1]"
            )
        self.stats.queries += n
        self.stats.backend_calls += 1
        return self._label(probs, prompts, responses_a, responses_b)

    def _label(self, probs, prompts, responses_a, responses_b):
        return hard_labels(probs, prompts, responses_a, responses_b, seed=self.seed)


def threshold_labels(probs: np.ndarray) -> np.ndarray:
    """``1`` where ``P(a ≻ b) > ½``, ``0`` where ``P < ½``, ``½`` at ``½``: the INPO authors'
    labels (their annotation code thresholds the preference model's probability at ½).
    Deterministic, antisymmetric, and biased where the theory's Bernoulli draw is not:
    ``E[label] ≠ P`` unless ``P ∈ {0, ½, 1}``."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.where(probs > 0.5, 1.0, np.where(probs < 0.5, 0.0, 0.5))


class ThresholdLabelOracle(HardLabelOracle):
    """Any probabilistic oracle, answering with :func:`threshold_labels` (``annotate.labels=
    threshold``)."""

    def __init__(self, oracle: PreferenceOracle) -> None:
        super().__init__(oracle, seed=0)
        self.oracle_id = f"threshold-labels-v{_VERSION}/{self.oracle_id.split('/', 1)[1]}"

    def _label(self, probs, prompts, responses_a, responses_b):
        return threshold_labels(probs)


# ---------------------------------------------------------------------------------------------
# A given preference matrix
# ---------------------------------------------------------------------------------------------


def validate_preference_matrix(
    matrix: object, *, atol: float = 1e-9, name: str = "matrix"
) -> np.ndarray:
    """Check a preference matrix: square, finite, entries in ``[0, 1]``, ``P + Pᵀ = 1``.

    Returns it as float64 ``[N, N]``; raises :class:`~inpo.errors.ConfigError` naming the first
    offending entry.
    """
    try:
        p = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} is not a numeric array: {exc}") from None
    if p.ndim != 2 or p.shape[0] != p.shape[1] or p.shape[0] == 0:
        raise ConfigError(f"{name} has shape {p.shape}; expected a non-empty square [N, N] array")
    bad = ~np.isfinite(p) | (p < -atol) | (p > 1 + atol)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ConfigError(f"{name}[{i}, {j}] = {float(p[i, j])!r}; entries must be in [0, 1]")
    off = np.abs(p + p.T - 1.0) > atol
    if off.any():
        i, j = (int(v) for v in np.argwhere(off)[0])
        pij, pji = float(p[i, j]), float(p[j, i])
        raise ConfigError(
            f"{name}[{i}, {j}] = {pij!r} and {name}[{j}, {i}] = {pji!r} sum to {pij + pji!r}; "
            "a preference matrix needs P + Pᵀ = 1 (so P[i, i] = 0.5)"
        )
    return np.clip(p, 0.0, 1.0)


class TableOracle:
    """Exact answers from a preference matrix over an enumerable response set.

    ``prob_prefers`` returns ``matrix[index(a), index(b)]`` exactly; a response outside the set
    raises :class:`~inpo.errors.OracleError` naming it.

    Args:
        matrix: ``[N, N]`` with ``matrix[i, j] = P(y_i ≻ y_j)``, ``P + Pᵀ = 1`` (e.g. from
            ``inpo.game`` or :meth:`AnnotatorPanel.preference_matrix`). Ignored when
            ``per_prompt`` is given (pass ``None``).
        responses: the ``N`` distinct response strings, one per row/column.
        per_prompt: optional ``{prompt: (matrix, responses)}``; a prompt not in it uses the
            default ``(matrix, responses)`` if given, else raises ``OracleError``.
        seed: seed for :meth:`sample_labels`.
    """

    def __init__(
        self,
        matrix: object | None,
        responses: Sequence[str] | None,
        *,
        per_prompt: Mapping[str, tuple[object, Sequence[str]]] | None = None,
        seed: int = 0,
    ) -> None:
        self.seed = int(seed)
        self.stats = OracleStats()
        self._default = None
        if matrix is not None or responses is not None:
            if matrix is None or responses is None:
                raise ConfigError("TableOracle needs both matrix and responses (or neither)")
            self._default = self._table(matrix, responses, "matrix")
        self._per_prompt = {
            prompt: self._table(m, r, f"per_prompt[{prompt!r}]")
            for prompt, (m, r) in (per_prompt or {}).items()
        }
        if self._default is None and not self._per_prompt:
            raise ConfigError("TableOracle needs a matrix and responses, or per_prompt tables")
        parts: list[object] = [
            "table",
            _VERSION,
            None if self._default is None else self._fingerprint(*self._default),
        ]
        parts += sorted((k, self._fingerprint(*v)) for k, v in self._per_prompt.items())
        self.oracle_id = f"table-v{_VERSION}:{_digest(*parts)[:16]}"

    @staticmethod
    def _table(
        matrix: object, responses: Sequence[str], name: str
    ) -> tuple[np.ndarray, dict[str, int]]:
        p = validate_preference_matrix(matrix, name=name)
        responses = list(responses)
        if len(responses) != p.shape[0]:
            raise ConfigError(
                f"{name} is {p.shape[0]}×{p.shape[0]} but has {len(responses)} responses"
            )
        index: dict[str, int] = {}
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise ConfigError(f"{name} response {i} is {type(r).__name__}, not a string")
            if r in index:
                raise ConfigError(f"{name} lists response {r!r} twice (at {index[r]} and {i})")
            index[r] = i
        return p, index

    @staticmethod
    def _fingerprint(p: np.ndarray, index: dict[str, int]) -> str:
        return _digest(list(index), p.round(12).tolist())

    def _lookup(self, prompt: str) -> tuple[np.ndarray, dict[str, int]]:
        table = self._per_prompt.get(prompt, self._default)
        if table is None:
            raise OracleError(f"TableOracle has no table for prompt {prompt!r}")
        return table

    def _table_for(self, prompt: str | None) -> tuple[np.ndarray, dict[str, int]]:
        if prompt is not None:
            return self._lookup(prompt)
        if self._default is None:
            raise ConfigError("this TableOracle has only per-prompt tables; name the prompt")
        return self._default

    def responses(self, prompt: str | None = None) -> list[str]:
        """The response set (of ``prompt``'s table, or the default one)."""
        return list(self._table_for(prompt)[1])

    def matrix(self, prompt: str | None = None) -> np.ndarray:
        """A copy of the preference matrix ``[N, N]`` (of ``prompt``'s table, or the default)."""
        return self._table_for(prompt)[0].copy()

    def prob_prefers(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        """``P(a_i ≻ b_i | prompt_i)`` exactly from the table, float64 ``[n]``."""
        n = _check_lengths(prompts, responses_a, responses_b)
        out = np.empty(n, dtype=np.float64)
        for i, (x, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
            p, index = self._lookup(x)
            for r in (a, b):
                if r not in index:
                    raise OracleError(
                        f"TableOracle: response {r!r} (query {i}, prompt {x!r}) is not in the "
                        f"table's {len(index)} responses"
                    )
            out[i] = p[index[a], index[b]]
        self.stats.queries += n
        self.stats.backend_calls += 1
        return out

    def sample_labels(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        """Hard labels ``{0, ½, 1}`` drawn deterministically (see :func:`hard_labels`)."""
        probs = self.prob_prefers(prompts, responses_a, responses_b)
        return hard_labels(probs, prompts, responses_a, responses_b, seed=self.seed)


# ---------------------------------------------------------------------------------------------
# A panel of annotators with different tastes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Taste:
    """A named total preorder on responses: ``compare(prompt, a, b)`` is ``+1`` if ``a`` is
    better, ``-1`` if ``b`` is, ``0`` for a tie. The name is part of the panel's ``oracle_id``,
    so two different tastes must have different names."""

    name: str
    compare: Callable[[str, str, str], int]


def score_taste(name: str, score: Callable[[str, str], float]) -> Taste:
    """A taste from a scalar score ``score(prompt, response)`` (higher is better)."""

    def compare(prompt: str, a: str, b: str) -> int:
        sa, sb = score(prompt, a), score(prompt, b)
        return (sa > sb) - (sa < sb)

    return Taste(name, compare)


def brevity() -> Taste:
    """Shorter is better (length in characters)."""
    return score_taste("brevity", lambda _prompt, r: -len(r))


def keyword(word: str) -> Taste:
    """More occurrences of ``word`` (case-insensitive) is better."""
    w = word.lower()
    if not w:
        raise ConfigError("keyword taste needs a non-empty word")
    return score_taste(f"keyword({word!r})", lambda _prompt, r: r.lower().count(w))


def lexicographic(*, reverse: bool = False) -> Taste:
    """Alphabetically earlier is better (later, with ``reverse=True``): an 'order' taste."""

    def compare(_prompt: str, a: str, b: str) -> int:
        c = (a < b) - (a > b)
        return -c if reverse else c

    return Taste(f"lexicographic(reverse={reverse})", compare)


@dataclass(frozen=True)
class AnnotatorGroup:
    """A group of annotators who share one taste; ``weight`` is its share of the panel."""

    taste: Taste
    weight: float = 1.0


class AnnotatorPanel:
    """A weighted panel of annotator groups with label noise ``ε``.

    ``P(a ≻ b) = Σ_g w_g [(1 − ε)·1{a ≻_g b} + ε·1{b ≻_g a} + ½·1{a ~_g b}]`` with the weights
    normalised to sum to 1: a group's vote flips with probability ``ε`` and a tie is a coin.
    The majority can be cyclic (a Condorcet cycle, :meth:`condorcet`), so the panel is a general
    preference, not a Bradley–Terry model.

    Args:
        groups: the annotator groups (at least one, positive weights, distinct taste names).
        epsilon: label noise ``ε ∈ [0, ½]``.
        seed: seed for :meth:`sample_labels`.
    """

    def __init__(
        self, groups: Sequence[AnnotatorGroup], *, epsilon: float = 0.0, seed: int = 0
    ) -> None:
        groups = list(groups)
        if not groups:
            raise ConfigError("AnnotatorPanel needs at least one group")
        if not 0.0 <= epsilon <= 0.5:
            raise ConfigError(f"epsilon={epsilon}; label noise must be in [0, 0.5]")
        names = [g.taste.name for g in groups]
        for i, g in enumerate(groups):
            if not (np.isfinite(g.weight) and g.weight > 0):
                raise ConfigError(f"group {i} ({g.taste.name}) has weight {g.weight}; must be > 0")
            if names.index(g.taste.name) != i:
                raise ConfigError(f"two groups share the taste name {g.taste.name!r}")
        total = float(sum(g.weight for g in groups))
        self.groups = groups
        self.weights = np.array([g.weight / total for g in groups], dtype=np.float64)
        self.epsilon = float(epsilon)
        self.seed = int(seed)
        self.stats = OracleStats()
        self.oracle_id = (
            f"panel-v{_VERSION}:"
            + _digest("panel", _VERSION, names, self.weights.round(12).tolist(), self.epsilon)[:16]
        )

    @classmethod
    def condorcet(
        cls, *, epsilon: float = 0.0, seed: int = 0, word: str = "please"
    ) -> tuple[AnnotatorPanel, list[str]]:
        """Three equal groups — brevity, ``keyword(word)``, lexicographic — and three responses
        whose majority preference is a Condorcet cycle ``r0 ≻ r1 ≻ r2 ≻ r0``.

        The groups rank ``r0 > r1 > r2`` (brevity), ``r1 > r2 > r0`` (keyword count) and
        ``r2 > r0 > r1`` (alphabetical), so each majority is 2 to 1:
        ``P(r0 ≻ r1) = P(r1 ≻ r2) = P(r2 ≻ r0) = ⅔(1 − ε) + ⅓ε``.
        """
        responses = [
            "b ok",  # shortest, no keyword, middle alphabetically
            f"c {word} {word}",  # middle length, keyword twice, last alphabetically
            f"a {word}, thank you very much",  # longest, keyword once, first alphabetically
        ]
        groups = [
            AnnotatorGroup(brevity()),
            AnnotatorGroup(keyword(word)),
            AnnotatorGroup(lexicographic()),
        ]
        return cls(groups, epsilon=epsilon, seed=seed), responses

    def _prob(self, prompt: str, a: str, b: str) -> float:
        eps = self.epsilon
        p = 0.0
        for w, g in zip(self.weights, self.groups):
            c = g.taste.compare(prompt, a, b)
            p += w * ((1.0 - eps) if c > 0 else eps if c < 0 else 0.5)
        return min(max(p, 0.0), 1.0)

    def prob_prefers(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        """The exact panel probability ``P(a_i ≻ b_i | prompt_i)``, float64 ``[n]``."""
        n = _check_lengths(prompts, responses_a, responses_b)
        out = np.array(
            [self._prob(x, a, b) for x, a, b in zip(prompts, responses_a, responses_b)],
            dtype=np.float64,
        )
        self.stats.queries += n
        self.stats.backend_calls += 1
        return out

    def preference_matrix(self, prompt: str, responses: Sequence[str]) -> np.ndarray:
        """The exact ``[K, K]`` matrix ``P(y_i ≻ y_j | prompt)`` (diagonal ½), for an exact game
        (e.g. ``TableOracle(panel.preference_matrix(x, ys), ys)``). Not counted as queries."""
        k = len(responses)
        p = np.full((k, k), 0.5)
        for i in range(k):
            for j in range(i + 1, k):
                p[i, j] = self._prob(prompt, responses[i], responses[j])
                p[j, i] = 1.0 - p[i, j]
        return p

    def sample_labels(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        """Hard labels ``{0, ½, 1}`` drawn deterministically (see :func:`hard_labels`)."""
        probs = self.prob_prefers(prompts, responses_a, responses_b)
        return hard_labels(probs, prompts, responses_a, responses_b, seed=self.seed)
