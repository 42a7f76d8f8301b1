"""Tasks the pipeline runs: the embedded default task, or prompts from a file.

A task gives the pipeline its prompts, its reference model, its preference oracle and its
evaluation. ``task=default`` is the embedded synthetic task (:mod:`inpo.tasks`), whose response
space is enumerable, so its evaluation is exact. ``task=prompts`` reads TRL prompt-only data
(``prompts=FILE``: JSONL/JSON/Parquet or a ``datasets`` folder with a ``prompt`` column) and
evaluates by the oracle's win rate against the reference on held-out prompts, with a 95%
confidence interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from inpo.errors import ConfigError, DataError
from inpo.pipeline.config import AnnotateConfig, RunConfig

__all__ = ["PromptFileTask", "build_oracle", "get_task", "load_prompts", "wilson_interval"]


def build_oracle(acfg: AnnotateConfig, cache: Path, *, task_oracle: Any = None, seed: int = 0):
    """The configured oracle behind the persistent query cache (and hard labels if asked).

    Reward-model oracles keep their ``rewards`` method for best-of-K/worst-of-K selection.
    """
    from inpo.oracles.cache import CachedOracle
    from inpo.oracles.synthetic import HardLabelOracle

    if acfg.oracle in ("task", "task_bt"):
        if task_oracle is None:
            raise ConfigError(f"annotate.oracle={acfg.oracle}: this task has no oracle of its own")
        base = task_oracle
    elif acfg.oracle == "reward_model":
        from inpo.oracles.reward_model import RewardModelOracle

        base = RewardModelOracle(acfg.model)
    elif acfg.oracle == "pairwise":
        from inpo.oracles.pairwise import PairwisePreferenceOracle

        base = PairwisePreferenceOracle(acfg.model)
    else:
        from inpo.oracles.http import HTTPJudgeOracle

        base = HTTPJudgeOracle(acfg.url, acfg.judge_model, api_key_env=acfg.api_key_env)
    if hasattr(base, "rewards") and not hasattr(base, "preference_matrix"):
        # Selection by reward needs rewards; a BT reward oracle's labels are σ(r_a − r_b).
        if acfg.hard_labels:
            return _RewardCached(base, HardLabelOracle(base, seed=seed), cache)
        return _RewardCached(base, base, cache)
    oracle = HardLabelOracle(base, seed=seed) if acfg.hard_labels else base
    return CachedOracle(oracle, cache)


class _RewardCached:
    """A reward oracle: ``rewards`` from the backend, pairwise answers through the cache."""

    def __init__(self, reward_oracle: Any, pairwise: Any, cache: Path):
        from inpo.oracles.cache import CachedOracle

        self._reward = reward_oracle
        self._cached = CachedOracle(pairwise, cache)
        self.oracle_id = self._cached.oracle_id
        self.stats = self._cached.stats

    def rewards(self, prompts, responses):
        return self._reward.rewards(prompts, responses)

    def prob_prefers(self, prompts, responses_a, responses_b):
        return self._cached.prob_prefers(prompts, responses_a, responses_b)


def load_prompts(path: str | Path) -> list[Any]:
    """Prompts in TRL's prompt-only format: a ``prompt`` column (text or a message list)."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if hasattr(data, "keys") and not hasattr(data, "column_names"):
            data = data[next(iter(data.keys()))]
        rows = list(data)
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        rows = []
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise DataError(f"{path}: row {i}: not valid JSON ({err})") from err
    elif path.suffix == ".parquet":
        from datasets import Dataset

        rows = list(Dataset.from_parquet(str(path)))
    else:
        raise DataError(f"{path}: prompts must be .jsonl, .json, .parquet or a datasets folder")
    prompts = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{path}: row {i}: missing field 'prompt'")
        p = row["prompt"]
        ok = (isinstance(p, str) and p.strip()) or (
            isinstance(p, list) and p and all(isinstance(m, dict) and "content" in m for m in p)
        )
        if not ok:
            raise DataError(f"{path}: row {i}: field 'prompt' must be non-empty text or messages")
        prompts.append(p)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a win rate (ties count half)."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class PromptFileTask:
    """Prompts from a file, any oracle backend, evaluation by win rate against the reference."""

    def __init__(self, cfg: RunConfig):
        if not cfg.prompts:
            raise ConfigError("task=prompts needs prompts=FILE (TRL prompt-only format)")
        if not cfg.policy and not cfg.reference:
            raise ConfigError("task=prompts needs reference=MODEL_DIR (and optionally policy=)")
        self.cfg = cfg
        self._train = load_prompts(cfg.prompts)
        self._eval = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else None
        self._oracle = None

    def describe(self) -> dict[str, Any]:
        return {"task": "prompts", "prompts": self.cfg.prompts, "eval": self.cfg.eval_prompts}

    def train_prompts(self) -> list[Any]:
        return list(self._train)

    def eval_prompts(self) -> list[Any]:
        if self._eval is not None:
            return self._eval[: self.cfg.evaluate.num_prompts]
        return self._train[-self.cfg.evaluate.num_prompts :]

    def reference_model(self, run_dir: Path) -> Path:
        return Path(self.cfg.reference or self.cfg.policy)

    def oracle(self, acfg: AnnotateConfig, *, cache: Path):
        self._oracle = build_oracle(acfg, cache, seed=self.cfg.seed)
        return self._oracle

    def evaluate(self, policy: Path, ref: Path) -> dict[str, Any]:
        """Win rate of one sample of π_t against one of π_ref per held-out prompt, by the
        oracle; response lengths; a Monte-Carlo KL estimate ``E_{y~π_t}[log π_t − log π_ref]``."""
        import torch

        from inpo.generation import GenerationSettings, sample_responses
        from inpo.logprobs import completion_logps
        from inpo.pipeline.run import _load, _oracle_prompt

        prompts = self.eval_prompts()
        g = self.cfg.generate
        settings = GenerationSettings(g.temperature, g.top_p, g.max_new_tokens, g.batch_size)
        k = self.cfg.evaluate.k
        model, tok = _load(policy)
        ys = sample_responses(model, tok, prompts, k, settings, seed=12345)
        flat_p = [p for p, rs in zip(prompts, ys) for _ in rs]
        flat_y = [y for rs in ys for y in rs]
        lp_pol = completion_logps(model, tok, flat_p, flat_y)
        del model
        ref_model, ref_tok = _load(ref)
        yr = sample_responses(ref_model, ref_tok, prompts, k, settings, seed=54321)
        lp_ref = completion_logps(ref_model, ref_tok, flat_p, flat_y)
        del ref_model
        flat_r = [y for rs in yr for y in rs]
        oprompts = [_oracle_prompt(p) for p in flat_p]
        probs = self._oracle.prob_prefers(oprompts, flat_y, flat_r)
        n = len(probs)
        wins = float(sum(probs))
        lo, hi = wilson_interval(wins, n)
        lengths = [len(tok(y, add_special_tokens=False)["input_ids"]) for y in flat_y]
        return {
            "win_rate_vs_ref": wins / n,
            "win_rate_ci": [lo, hi],
            "kl_to_ref": float(torch.mean(lp_pol - lp_ref)),
            "mean_length": sum(lengths) / len(lengths),
            "eval_prompts": len(prompts),
        }


def get_task(cfg: RunConfig):
    """The task named by ``cfg.task``."""
    if cfg.task == "default":
        from inpo.pipeline.default_task import DefaultPipelineTask

        return DefaultPipelineTask(cfg)
    if cfg.task == "prompts":
        return PromptFileTask(cfg)
    raise ConfigError(f"task must be 'default' or 'prompts', got '{cfg.task}'")


def task_defaults(task: str) -> dict[str, Any]:
    """The run-config values a task prefers over the paper's (applied before the YAML)."""
    if task == "default":
        from inpo.pipeline.default_task import RUN_DEFAULTS

        return RUN_DEFAULTS
    return {}
