"""The one narrow protocol every preference oracle implements.

An oracle answers, for each of ``n`` prompts with two responses, the probability that the first
response is preferred: ``P(a ≻ b | prompt) ∈ [0, 1]``. Hard labels and ties derive from it
(``P > 1/2``: a wins; ``P == 1/2``: a tie). Failures are explicit: a backend raises
:class:`inpo.errors.OracleError` after its retries, never returns a sentinel such as ``-1``.
Every oracle counts its queries in an :class:`OracleStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["OracleStats", "PreferenceOracle", "check_lengths"]


@dataclass
class OracleStats:
    """Counters an oracle keeps: pairwise queries answered, backend calls, cache hits, failures."""

    queries: int = 0
    backend_calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    retries: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "queries": self.queries,
            "backend_calls": self.backend_calls,
            "cache_hits": self.cache_hits,
            "failures": self.failures,
            "retries": self.retries,
            **self.extra,
        }


@runtime_checkable
class PreferenceOracle(Protocol):
    """Anything with ``prob_prefers`` (and, by convention, ``stats`` and ``oracle_id``).

    ``prob_prefers(prompts, responses_a, responses_b)`` takes three equal-length lists of strings
    and returns a float64 NumPy array ``[n]`` of ``P(a_i ≻ b_i | prompt_i)``. Implementations
    handle position bias themselves (querying both orders where the backend has one) and raise
    :class:`inpo.errors.OracleError` on failure.
    """

    def prob_prefers(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray: ...


def check_lengths(
    prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
) -> int:
    """The number of queries ``n``; ``ValueError`` unless the three lists have ``n`` items each."""
    n = len(prompts)
    if not n == len(responses_a) == len(responses_b):
        raise ValueError(
            f"prob_prefers needs equal lengths, got {n}, {len(responses_a)}, {len(responses_b)}"
        )
    return n
