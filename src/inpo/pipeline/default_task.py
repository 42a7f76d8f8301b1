"""The embedded default task (:mod:`inpo.tasks.default`) as a pipeline task.

What ``inpo run`` does with no config: a prompt grammar, 399 enumerable responses, a cyclic
annotator panel with label noise as the oracle (or, with ``annotate.oracle=task_bt``, the
Bradley–Terry reward model fitted to it), a tiny Llama turned into ``π_ref`` by a short SFT
(cached under ``$INPO_CACHE_DIR`` or ``~/.cache/inpo``), and exact evaluation on held-out
prompts. :data:`RUN_DEFAULTS` are the run settings this task uses instead of the paper's LLM
values (a tiny model needs a larger learning rate; 1–3-word responses a larger ``eta``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inpo.pipeline.config import AnnotateConfig, RunConfig
from inpo.pipeline.tasks import build_oracle

__all__ = ["RUN_DEFAULTS", "DefaultPipelineTask"]

#: Run settings of the default task (precedence: paper < these < YAML < key=value).
RUN_DEFAULTS: dict[str, Any] = {
    "eta": 0.35,
    "tau": 0.05,
    "beta": 0.05,
    "iterations": 3,
    "prompt_repeats": 16,
    "generate": {"k": 8, "temperature": 1.0, "max_new_tokens": 4, "batch_size": 64},
    "train": {
        "learning_rate": 1e-3,
        "warmup_ratio": 0.03,
        "global_batch_size": 32,
        "per_device_batch_size": 32,
        "epochs": 2,
        "max_prompt_length": 16,
        "max_completion_length": 8,
        "save_steps": 20,
    },
    "annotate": {"batch_size": 512},
}


class DefaultPipelineTask:
    """Prompts, reference, oracle and exact evaluation of the default task for the pipeline."""

    def __init__(self, cfg: RunConfig):
        from inpo.tasks.default import DefaultTask, DefaultTaskConfig

        self.cfg = cfg
        self.task = DefaultTask(DefaultTaskConfig(seed=0, tau=cfg.tau_value, eta=cfg.eta))
        self._ref_tables: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        from inpo.config import config_to_dict

        return {
            "task": "default",
            "config": config_to_dict(self.task.config),
        }

    def train_prompts(self) -> list[str]:
        return list(self.task.prompts_train)

    def reference_model(self, run_dir: Path) -> Path:
        return self.task.build_reference()

    def oracle(self, acfg: AnnotateConfig, *, cache: Path):
        base = self.task.bt_reward_oracle() if acfg.oracle == "task_bt" else self.task.panel()
        return build_oracle(acfg, cache, task_oracle=base, seed=self.cfg.seed)

    def _ref_table(self, ref: Path, prompts: list[str]):
        key = f"{ref}:{len(prompts)}:{prompts[0]}"
        if key not in self._ref_tables:
            model, tok = self.task.load_reference(ref)
            self._ref_tables[key] = self.task.policy_table(model, tok, prompts)
        return self._ref_tables[key]

    def evaluate(self, policy: Path, ref: Path) -> dict[str, Any]:
        """Exact metrics on the held-out prompts (:meth:`inpo.tasks.DefaultTask.evaluate`)."""
        model, tok = self.task.load_reference(policy)
        prompts = self.task.prompts_eval
        return self.task.evaluate(model, tok, self._ref_table(ref, prompts), prompts)
