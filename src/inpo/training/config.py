"""The typed config of ``inpo train``: one dataclass per stage, validated before any model loads.

Loaded with :func:`inpo.config.load_config` (YAML + dotted ``key=value`` overrides; unknown keys
are rejected with a "did you mean"). Defaults are the INPO paper's (Zhang et al. 2024, §5):
learning rate ``5e-7``, 3% warm-up then cosine decay, global batch 128, ``eta = 0.005``,
``tau = eta / 3``, one epoch per iteration.

Loss hyper-parameters are named as in the papers and passed to a loss only when its
:class:`inpo.losses.LossSpec` declares them; setting one that the chosen loss does not take is an
error (it would otherwise be silently ignored). Their ranges are checked by the loss function's
own checks, run once on a dummy batch at validation time.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inpo.algorithms import default_tau
from inpo.errors import ConfigError
from inpo.hub import check_push_to_hub, looks_like_hub_id, resolve_dataset

__all__ = [
    "PAPER_DEFAULTS",
    "DataConfig",
    "LoggingConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
]

#: Default hyper-parameters per loss when the config leaves them unset, from each loss's paper:
#: INPO ``eta = 0.005`` (τ defaults to ``eta / 3``, below); DPO/IPO/TODO ``beta = 0.1``;
#: SPPO's ``η_s = 1e-3`` (its paper's ``η = 1e3`` multiplies ``P``; ours divides).
PAPER_DEFAULTS: dict[str, dict[str, float]] = {
    "inpo": {"eta": 0.005},
    "ipo": {"beta": 0.1},
    "ipo_length_normalized": {"beta": 0.1},
    "dpo": {"beta": 0.1},
    "sppo": {"eta": 1e-3},
    "todo": {"beta": 0.1},
}

#: Every loss hyper-parameter the config knows (the union over :data:`inpo.losses.LOSSES`).
_HPARAMS = ("eta", "tau", "beta", "alpha", "label_smoothing")


@dataclass
class LoraSettings:
    """LoRA adapter (Hu et al. 2021) via PEFT; merged into the weights when the model is saved."""

    #: The adapter's rank.
    r: int = 16
    #: LoRA's scale numerator (the update is scaled by alpha / r).
    alpha: float = 32.0
    #: Dropout on the adapter's input.
    dropout: float = 0.0
    #: The modules that get an adapter.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    def validate(self) -> None:
        # ValueErrors: the loader prefixes the section's own name (model.lora in `inpo train`,
        # train.model.lora in `inpo run`)
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


@dataclass
class ModelConfig:
    """The policy to train: a local ``from_pretrained`` folder (``trust_remote_code`` stays off)."""

    #: The policy to train: a ``save_pretrained`` folder or a hub id in the local HF cache.
    path: str = ""
    #: The weights' dtype (mixed precision is ``bf16``: autocast over fp32 weights).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: Recompute activations in the backward pass (less memory, more time).
    gradient_checkpointing: bool = False
    #: ``sdpa``, ``eager``, ``flash_attention_2``… (null: the model's default).
    attn_implementation: str | None = None
    #: A LoRA adapter (``model.lora.r=16`` …; null: full fine-tuning), merged when saved.
    lora: LoraSettings | None = None

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("model.path is required (a folder saved with save_pretrained)")


@dataclass
class DataConfig:
    """The preference pairs (see :func:`inpo.data.load_preference_dataset`)."""

    #: Pairs in TRL's preference format: JSONL/JSON/Parquet, or a ``datasets`` folder.
    train_file: str = ""
    #: Instead of train_file: a hub dataset id in the local HF cache, or a folder of data files.
    #: Read with ``datasets.load_dataset`` (offline: nothing is downloaded).
    dataset_name: str = ""
    #: The hub dataset's configuration (``load_dataset``'s ``name``; null: its default).
    dataset_config: str | None = None
    #: The split to read (null: ``train``, or the only one).
    split: str | None = None
    #: Prompt tokens kept, from the end (null: no limit). Use the limits that ``inpo
    #: precompute`` used, so reference log-probs score the same tokens.
    max_prompt_length: int | None = 512
    #: Response tokens kept, from the start (null: no limit); as ``inpo precompute`` used.
    max_completion_length: int | None = 512
    #: Skip and count malformed rows instead of stopping at the first (named) one.
    skip_bad_rows: bool = False
    #: Shuffle the pairs each epoch (seeded).
    shuffle: bool = True
    #: Sort the micro-batches of each optimizer step by length, so that each is padded to a
    #: similar length. The step's gradient is a sum over its pairs, so this changes no maths.
    group_by_length: bool = True
    #: Run each micro-batch's ``2B`` sequences as this many length-sorted forward passes, each
    #: cut to its longest sequence (exact with right padding; less padding computed). null: on
    #: CPU 4 for a micro-batch whose longest row has 128 tokens or more (1.26× one padded pass),
    #: else 1 (each pass has a fixed cost: 4 ran at 0.35-0.70× of one at 8-32 tokens); 1 on GPUs,
    #: where a micro-batch is launch-bound and 4 passes ran at 0.36× of one
    #: (benchmarks/results/packing.md, length_buckets.md, packing_gpu.md).
    length_buckets: int | None = None
    #: Run each pair as one row ``prompt + chosen + rejected`` (rejected tokens do not attend to
    #: chosen ones; positions restart after the prompt), so the prompt is computed once. Same
    #: log-probs and gradients up to float rounding (``inpo.logprobs.shared_prompt_logps``);
    #: needs ``sdpa``, ``eager`` or ``flex_attention`` and no sliding-window layers. The ``B`` rows of a
    #: micro-batch run in ``max(1, length_buckets // 2)`` length buckets.
    share_prompt: bool = False
    #: Pack each micro-batch's ``2B`` sequences into padding-free rows, position ids
    #: restarting per sequence (``inpo.logprobs.packed_sequence_logps``): no padding computed,
    #: the same log-probs. On CPU one row a micro-batch with attention one sequence at a time
    #: (``inpo.varlen``); elsewhere rows as long as the longest sequence. With ``share_prompt``
    #: the ``B`` rows ``prompt + chosen + rejected`` are packed, each pair in a segment of its
    #: own (``inpo.logprobs.packed_shared_prompt_logps``). The fastest layout measured on CPU
    #: and GPU (benchmarks/results/packing.md, packing_gpu.md). ``null`` (default): packed on
    #: CPU the micro-batches whose longest row has at least 64 tokens, for a model
    #: variable-length attention is exact for (``inpo.varlen``; where it measured faster than
    #: one padded pass and than length buckets, benchmarks/results/length_buckets.md), the
    #: others padded; on a CUDA GPU the unshared ones from 64 tokens, as masked rows, when the
    #: model keeps packed sequences apart (1.18× one padded pass, packing_gpu.md); off under
    #: FSDP or DeepSpeed.
    packing: bool | None = None

    def validate(self) -> None:
        if bool(self.train_file) == bool(self.dataset_name):
            raise ConfigError(
                "set one of data.train_file (a JSONL/JSON/Parquet file of pairs, or the folder "
                "`inpo precompute` writes) and data.dataset_name (a hub dataset in the local "
                "Hugging Face cache)" + (", not both" if self.train_file else "")
            )
        if self.dataset_name:
            if looks_like_hub_id(self.dataset_name):
                resolve_dataset(self.dataset_name, "data.dataset_name")
            elif not Path(self.dataset_name).is_dir():
                raise ConfigError(
                    f"data.dataset_name '{self.dataset_name}' is neither a folder nor a hub id "
                    "(owner/name)"
                )
        if self.length_buckets is not None and self.length_buckets < 1:
            raise ConfigError(f"data.length_buckets must be >= 1, got {self.length_buckets}")
        for key in ("max_prompt_length", "max_completion_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} must be >= 1 or null, got {value}")

    @property
    def source(self) -> str:
        """Where the pairs come from: ``train_file`` or ``dataset_name``."""
        return self.train_file or self.dataset_name


@dataclass
class LossConfig:
    """Which loss (a key of :data:`inpo.losses.LOSSES`) and its hyper-parameters.

    Unset hyper-parameters take :data:`PAPER_DEFAULTS`; INPO's ``tau`` defaults to ``eta / 3``.
    """

    #: inpo | ipo | ipo_length_normalized | dpo | sppo | todo.
    name: str = "inpo"
    #: INPO/SPPO's η (null: the paper's, 0.005 for INPO, 1e-3 for SPPO).
    eta: float | None = None
    #: INPO's τ (null: η/3).
    tau: float | None = None
    #: β of DPO, IPO and TODO (null: 0.1).
    beta: float | None = None
    #: TODO's tie margin α.
    alpha: float | None = None
    #: DPO's label smoothing (conservative DPO).
    label_smoothing: float | None = None

    def hparams(self) -> dict[str, float]:
        """The keyword hyper-parameters for ``spec(batch, **hparams)``, defaults filled in."""
        from inpo.losses import get_loss  # deferred: loads torch

        spec = get_loss(self.name)
        values = {**PAPER_DEFAULTS.get(self.name, {})}
        values.update({k: getattr(self, k) for k in _HPARAMS if getattr(self, k) is not None})
        if "tau" in spec.hyperparameters and "tau" not in values and "eta" in values:
            values["tau"] = default_tau(values["eta"])
        return {k: float(v) for k, v in values.items() if k in spec.hyperparameters}

    def validate(self) -> None:
        from inpo.losses import get_loss  # deferred: loads torch

        try:
            spec = get_loss(self.name)
        except ValueError as err:
            raise ConfigError(f"loss.name: {err}") from err
        for key in _HPARAMS:
            if getattr(self, key) is not None and key not in spec.hyperparameters:
                raise ConfigError(
                    f"loss.{key} is set but loss '{self.name}' does not take it "
                    f"(it takes: {', '.join(spec.hyperparameters)})"
                )
        check_loss_hyperparameters(spec, self.hparams(), prefix="loss.")


def check_loss_hyperparameters(spec: Any, hparams: dict[str, float], *, prefix: str) -> None:
    """The loss's own range checks (e.g. ``0 <= tau <= eta``), run on a one-pair dummy batch in
    the dtype training uses, so a value the loss cannot compute with (a scale ``1/(2η)`` beyond
    float32) is a :class:`ConfigError` naming the key, before any model loads."""
    import torch

    for key, value in hparams.items():
        if not math.isfinite(value):
            raise ConfigError(f"{prefix}{key} must be finite, got {value}")
    dummy = {name: torch.zeros(1) for name in spec.inputs}
    dummy.update({name: torch.zeros(1) for name in spec.optional_inputs})
    for name in ("chosen_lengths", "rejected_lengths"):
        if name in dummy:
            dummy[name] = torch.ones(1)
    try:
        out = spec(dummy, **hparams)
    except ValueError as err:
        msg = str(err)
        named = next((k for k in hparams if msg.startswith(k)), None)
        key = f"{prefix}{named}" if named else prefix.rstrip(".") or "loss"
        raise ConfigError(f"{key}: {msg}") from err
    except (RuntimeError, OverflowError, ZeroDivisionError):
        out = None
    if out is None or not bool(torch.isfinite(out.losses).all()):
        values = ", ".join(f"{prefix}{k}={v:g}" for k, v in hparams.items())
        raise ConfigError(
            f"{values}: the loss is not finite in float32 with these values (a scale such as "
            "1/(2·eta) or 1/beta overflows); choose values within float32's range"
        )


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (the INPO paper's recipe).

    ``global_batch_size`` pairs make one optimizer step; each process feeds micro-batches of
    ``per_device_batch_size`` pairs, so gradient accumulation is
    ``ceil(global / (per_device × processes))``. ``max_steps`` (if set) overrides ``epochs``.
    """

    #: Peak learning rate (the paper's 5e-7 for 8B models).
    learning_rate: float = 5e-7
    #: Decay after warm-up.
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    #: Fraction of the steps spent warming the learning rate up from 0.
    warmup_ratio: float = 0.03
    #: Pairs an optimizer step, over all processes (gradient accumulation fills the rest).
    global_batch_size: int = 128
    #: Pairs a forward pass on each process.
    per_device_batch_size: int = 8
    #: Clip the gradient's global norm to this (null: no clipping).
    max_grad_norm: float | None = 1.0
    #: AdamW's decoupled weight decay.
    weight_decay: float = 0.0
    #: AdamW (the paper's) or plain SGD.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    #: AdamW's β₁.
    adam_beta1: float = 0.9
    #: AdamW's β₂.
    adam_beta2: float = 0.999
    #: AdamW's ε.
    adam_epsilon: float = 1e-8
    #: Passes over the data.
    epochs: int = 1
    #: Stop after this many optimizer steps (null: ``epochs`` decide).
    max_steps: int | None = None

    def validate(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.global_batch_size < 1 or self.per_device_batch_size < 1:
            raise ConfigError(
                "optim.global_batch_size and optim.per_device_batch_size must be >= 1"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"optim.max_steps must be >= 1 or null, got {self.max_steps}")


#: The experiment trackers accelerate ships (``accelerate.utils.LoggerType``), each needing
#: its own package (the package to install, for the error message).
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "trackio": "trackio",
    "swanlab": "swanlab",
}


def require_tracker_packages(names: list[str], key: str) -> None:
    """Each tracker's package is installed: a :class:`ConfigError` naming ``key`` if not."""
    import importlib.util

    for name in names:
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{key}={name} needs the {package} package: pip install {package} "
                f"(or set {key}=none; trackio is a local-first choice: pip install trackio)"
            )


@dataclass
class LoggingConfig:
    """Metrics go to ``metrics.jsonl`` and ``metrics.csv`` always, plus ``report_to``: trackers
    through accelerate (``tensorboard``, ``wandb``, ``mlflow``, ``trackio``, …; several with
    commas), under TRL's metric names (``rewards/chosen``, ``rewards/margins``, …).
    ``project``: the tracker's project (default: ``$WANDB_PROJECT`` if set, else ``inpo``)."""

    #: Experiment trackers through accelerate: tensorboard, wandb, mlflow, trackio, … (commas).
    report_to: str = "none"
    #: The trackers' project (null: ``$WANDB_PROJECT`` if set, else ``inpo``).
    project: str | None = None
    #: Show the training progress bar (on the main process).
    progress_bar: bool = True

    @property
    def project_name(self) -> str:
        """``project``, else ``$WANDB_PROJECT`` (a project set in the environment is not
        overridden), else ``inpo``."""
        import os

        return self.project or os.environ.get("WANDB_PROJECT") or "inpo"

    @property
    def trackers(self) -> list[str]:
        names = [t.strip() for t in self.report_to.split(",") if t.strip()]
        return [] if names in ([], ["none"]) else names

    def validate(self) -> None:
        for name in self.trackers:
            if name not in TRACKERS:
                hint = difflib.get_close_matches(name, TRACKERS, n=1)
                raise ConfigError(
                    f"logging.report_to: unknown tracker '{name}' (accelerate's: "
                    f"{', '.join(TRACKERS)}, or none)"
                    + (f"; did you mean '{hint[0]}'?" if hint else "")
                )


@dataclass
class TrainConfig:
    """Top level of ``inpo train``'s config (see ``examples/train_inpo.yaml``)."""

    #: Where the model, its card, metrics and checkpoints go.
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Seeds data order, dropout and LoRA initialisation.
    seed: int = 42
    #: bf16 autocast over the fp32 (``model.dtype``) master weights: ``auto`` uses it only
    #: where CUDA supports bf16.
    bf16: Literal["auto", True, False] = "auto"
    #: Shard parameters, gradients and optimizer state across processes with FSDP2 (through
    #: accelerate's FSDP plugin): ``full_shard`` (ZeRO-3-like: parameters re-sharded after
    #: each forward), ``shard_grad_op`` (ZeRO-2-like: kept gathered between forward and
    #: backward), ``none`` (DDP: a full replica per process). An accelerate config file passed
    #: to ``accelerate launch`` that selects FSDP is honoured on GPUs when this is ``none``; one
    #: that selects DeepSpeed is refused (not supported yet).
    fsdp: Literal["none", "full_shard", "shard_grad_op"] = "none"
    #: FSDP: keep the sharded parameters and optimizer state in CPU memory.
    fsdp_cpu_offload: bool = False
    #: FSDP: recompute each decoder layer's activations in the backward pass.
    fsdp_activation_checkpointing: bool = False
    #: Write a checkpoint every ``save_steps`` optimizer steps (and always at the end).
    save_steps: int | None = 500
    #: Checkpoint after the last step too, so re-running a finished output_dir is a no-op
    #: (``inpo run`` turns it off: its stage manifest says the stage is finished).
    final_checkpoint: bool = True
    #: Keep only the newest ``keep_checkpoints`` checkpoints (null keeps all).
    keep_checkpoints: int | None = 2
    #: ``auto`` continues from the newest complete checkpoint in ``output_dir/checkpoints``;
    #: ``never`` starts over; anything else is a checkpoint folder to resume from.
    resume: str = "auto"
    #: Upload the trained model (weights, tokenizer, card) to ``hub_model_id`` when done.
    #: The token comes from ``$HF_TOKEN`` or ``hf auth login``, never from a config.
    push_to_hub: bool = False
    #: The hub repository to push to (``owner/name``).
    hub_model_id: str | None = None
    #: Create the hub repository as private.
    hub_private_repo: bool = True

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if self.push_to_hub:
            check_push_to_hub(self.hub_model_id, "hub_model_id")
        if self.save_steps is not None and self.save_steps < 1:
            raise ConfigError(f"save_steps must be >= 1 or null, got {self.save_steps}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1 or null, got {self.keep_checkpoints}")
        if self.fsdp == "none" and (self.fsdp_cpu_offload or self.fsdp_activation_checkpointing):
            raise ConfigError(
                "fsdp_cpu_offload / fsdp_activation_checkpointing need fsdp=full_shard or "
                "fsdp=shard_grad_op"
            )
        if self.fsdp != "none" and self.data.packing:
            raise ConfigError(
                "fsdp runs the LM head inside the model's forward (padded rows); "
                "data.packing=true is not supported with it"
            )
        if self.fsdp != "none" and self.data.share_prompt:
            raise ConfigError(
                "fsdp runs the LM head inside the model's forward; "
                "data.share_prompt=true is not supported with it"
            )
        if self.fsdp != "none" and self.model.gradient_checkpointing:
            raise ConfigError(
                "with fsdp, use fsdp_activation_checkpointing=true instead of "
                "model.gradient_checkpointing"
            )
        if self.model.lora is not None and self.model.dtype == "float16":
            raise ConfigError("model.dtype=float16 with LoRA is not supported; use bfloat16")
        impl = self.model.attn_implementation
        if self.data.share_prompt and impl not in (None, "sdpa", "eager", "flex_attention"):
            raise ConfigError(
                f"data.share_prompt=true needs a custom attention mask, which "
                f"model.attn_implementation={impl} does not take; use sdpa, eager or "
                "flex_attention (or set data.share_prompt=false)"
            )
