"""The typed config of ``inpo train-oracle``: a preference model from a preference dataset.

Sections are ``inpo train``'s (``model``, ``optim``, ``logging``: the same keys, meanings and
checks) plus ``data`` for the pairs and an eval file, and ``gpm`` for the General Preference
Model's head. Defaults for the learning rate and batch follow reward-model practice
(HelpSteer2-Preference / RLHFlow: 2e-6 to 1e-5, batch 32–128, one epoch); the tiny models of
the tests and the docs set their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inpo.errors import ConfigError
from inpo.training.config import LoggingConfig, ModelConfig, OptimConfig

__all__ = ["GPMSettings", "OracleDataConfig", "OracleTrainConfig"]

KINDS = ("bt", "pairwise", "gpm")


@dataclass
class OracleDataConfig:
    """The preference pairs (TRL's standard or conversational format; an optional ``tie``
    column and an optional margin column) and an eval file of the same format."""

    #: Pairs in TRL's preference format: JSONL/JSON/Parquet, or a ``datasets`` folder.
    train_file: str = ""
    #: Instead of train_file: a hub dataset id in the local HF cache, or a folder of data files.
    dataset_name: str = ""
    #: The hub dataset's configuration (null: its default).
    dataset_config: str | None = None
    #: The split to read (null: ``train``, or the only one).
    split: str | None = None
    #: Held-out pairs (same format): accuracy, Brier score and ECE reported after training.
    eval_file: str | None = None
    #: The column with a per-pair margin for the Bradley–Terry loss (kind=bt): used when present.
    margin_column: str = "margin"
    #: Longest tokenised sequence; longer ones keep their last tokens (kind=pairwise: refused).
    max_length: int = 1024
    #: Skip and count malformed rows instead of stopping at the first (named) one.
    skip_bad_rows: bool = False
    #: Shuffle the pairs each epoch (seeded).
    shuffle: bool = True

    @property
    def source(self) -> str:
        return self.train_file or self.dataset_name

    def validate(self) -> None:
        if bool(self.train_file) == bool(self.dataset_name):
            raise ConfigError(
                "set one of data.train_file (a JSONL/JSON/Parquet file of pairs) and "
                "data.dataset_name (a hub dataset in the local Hugging Face cache)"
                + (", not both" if self.train_file else "")
            )
        if self.train_file and not Path(self.train_file).exists():
            raise ConfigError(f"data.train_file '{self.train_file}' does not exist")
        if self.eval_file and not Path(self.eval_file).exists():
            raise ConfigError(f"data.eval_file '{self.eval_file}' does not exist")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")


@dataclass
class GPMSettings:
    """The General Preference Model's head (kind=gpm; Zhang et al. 2024, arXiv 2410.02197)."""

    #: The preference embedding's dimension 2k (k skew-symmetric 2×2 blocks).
    dim: int = 6
    #: Prompt-dependent eigenvalue scale gates λ_l(x) ≥ 0 (false: λ = 1).
    prompt_scales: bool = True
    #: The temperature β of P = σ(s / β).
    beta: float = 0.1

    def validate(self) -> None:
        if self.dim < 2 or self.dim % 2:
            raise ConfigError(f"gpm.dim must be an even number >= 2, got {self.dim}")
        if not self.beta > 0:
            raise ConfigError(f"gpm.beta must be > 0, got {self.beta}")


def _oracle_optim() -> OptimConfig:
    return OptimConfig(learning_rate=1e-5, global_batch_size=32, per_device_batch_size=8)


@dataclass
class OracleTrainConfig:
    """Top level of ``inpo train-oracle``'s config."""

    #: bt (a Bradley–Terry reward model), pairwise (RLHFlow's A/B model) or gpm.
    kind: Literal["bt", "pairwise", "gpm"] = "bt"
    #: Where the model, metrics, eval results and checkpoints go.
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: OracleDataConfig = field(default_factory=OracleDataConfig)
    optim: OptimConfig = field(default_factory=_oracle_optim)
    gpm: GPMSettings = field(default_factory=GPMSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Seeds data order and the new heads' initialisation.
    seed: int = 42
    #: bf16 autocast over fp32 master weights (``auto``: where CUDA supports bf16).
    bf16: Literal["auto", True, False] = "auto"
    #: Write a checkpoint every ``save_steps`` optimizer steps (and at the end).
    save_steps: int | None = 500
    #: Keep only the newest ``keep_checkpoints`` checkpoints (null keeps all).
    keep_checkpoints: int | None = 2
    #: ``auto`` continues from the newest checkpoint; ``never`` starts over; or a checkpoint.
    resume: str = "auto"

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}; got '{self.kind}'")
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if not self.model.path:
            raise ConfigError("model.path is required (the model to start from)")
        if self.save_steps is not None and self.save_steps < 1:
            raise ConfigError(f"save_steps must be >= 1 or null, got {self.save_steps}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1 or null, got {self.keep_checkpoints}")
        if self.model.lora is not None and self.model.dtype == "float16":
            raise ConfigError("model.dtype=float16 with LoRA is not supported; use bfloat16")
