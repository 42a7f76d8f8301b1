"""The run's preference oracle: the configured backend behind the persistent query cache.

In a multi-process run each rank has its own copy of the backend (a local model on its own
device, or its own HTTP client) and its own cache file beside the shared one
(:class:`inpo.oracles.cache.RankQueryCache`); rank 0 folds the rank files into
``oracle_cache.sqlite`` between stages, so no query is lost or asked twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inpo.errors import ConfigError
from inpo.oracles.cache import CachedOracle, QueryCache, RankQueryCache
from inpo.oracles.gpm import GPMOracle
from inpo.oracles.http import HTTPJudgeOracle
from inpo.oracles.pairwise import PairwisePreferenceOracle
from inpo.oracles.reward_model import RewardModelOracle
from inpo.oracles.synthetic import HardLabelOracle, ThresholdLabelOracle
from inpo.pipeline.config import AnnotateConfig

__all__ = ["build_oracle"]


def _store(cache: Path, rank: int, world: int) -> Any:
    return RankQueryCache(cache, rank) if world > 1 else QueryCache(cache)


def build_oracle(
    acfg: AnnotateConfig,
    cache: Path,
    *,
    task_oracle: Any = None,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    device: Any = None,
):
    """The configured oracle behind the persistent query cache (and hard labels if asked).

    Reward-model oracles keep their ``rewards`` method for best-of-K/worst-of-K selection. Its
    ``probabilities`` attribute is the backend's ``P(a ≻ b)`` through the same cache, without the
    labels (``annotate.labels`` is a training-time choice; evaluation reads probabilities).
    """

    device_kw = {"device": str(device)} if device is not None else {}
    if acfg.oracle in ("task", "task_bt"):
        if task_oracle is None:
            raise ConfigError(f"annotate.oracle={acfg.oracle}: this task has no oracle of its own")
        base = task_oracle
    elif acfg.oracle == "reward_model":
        base = RewardModelOracle(acfg.model, **device_kw)
    elif acfg.oracle == "pairwise":
        base = PairwisePreferenceOracle(acfg.model, format=acfg.pairwise_format, **device_kw)
    elif acfg.oracle == "gpm":
        base = GPMOracle(acfg.model, **device_kw)
    else:
        base = HTTPJudgeOracle(acfg.url, acfg.judge_model, api_key_env=acfg.api_key_env)
    store = _store(cache, rank, world)
    labelled = _labels(acfg.labels, base, seed)
    if hasattr(base, "rewards") and not hasattr(base, "preference_matrix"):
        # Selection by reward needs rewards; a BT reward oracle's labels are σ(r_a − r_b).
        oracle: Any = _RewardCached(base, labelled, store)
    else:
        oracle = CachedOracle(labelled, store)
    # Evaluation reads the oracle's probabilities P(a ≻ b), never its training labels (a
    # Bernoulli draw would add its own noise to every win rate), through the same cache.
    oracle.probabilities = oracle if labelled is base else CachedOracle(base, store)
    return oracle


def _labels(kind: str, base: Any, seed: int) -> Any:
    """The oracle answering with the configured labels (``annotate.labels``)."""

    if kind == "sample":
        return HardLabelOracle(base, seed=seed)
    if kind == "threshold":
        return ThresholdLabelOracle(base)
    return base


class _RewardCached:
    """A reward oracle: ``rewards`` from the backend, pairwise answers through the cache."""

    def __init__(self, reward_oracle: Any, pairwise: Any, cache: Any):
        self._reward = reward_oracle
        self._cached = CachedOracle(pairwise, cache)
        self.oracle_id = self._cached.oracle_id
        self.stats = self._cached.stats

    def rewards(self, prompts, responses):
        return self._reward.rewards(prompts, responses)

    def prob_prefers(self, prompts, responses_a, responses_b):
        return self._cached.prob_prefers(prompts, responses_a, responses_b)
