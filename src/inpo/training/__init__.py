"""Training a causal LM on preference pairs with any loss of :data:`inpo.losses.LOSSES`.

``TrainConfig`` (and its parts) is the typed config of ``inpo train``; :func:`train` is the loop.
Heavy libraries (transformers, accelerate, datasets, peft) are imported inside functions.
"""

from __future__ import annotations

from inpo.training.config import (
    PAPER_DEFAULTS,
    DataConfig,
    LoggingConfig,
    LoraSettings,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from inpo.training.loop import BATCH_COLUMNS, TrainResult, check_loss_columns, train

__all__ = [
    "BATCH_COLUMNS",
    "PAPER_DEFAULTS",
    "DataConfig",
    "LoggingConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "check_loss_columns",
    "train",
]
