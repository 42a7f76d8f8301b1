"""Preference oracles: anything that answers ``P(a ≻ b | prompt)``.

The protocol is :class:`inpo.oracles.base.PreferenceOracle`; backends live in their own modules
and are imported lazily (``inpo.oracles`` itself imports only NumPy).
"""

from inpo.oracles.base import OracleStats, PreferenceOracle

__all__ = ["OracleStats", "PreferenceOracle"]
