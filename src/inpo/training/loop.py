"""One training loop for every preference loss in :data:`inpo.losses.LOSSES`.

The loss is data: :func:`inpo.losses.get_loss` gives a :class:`~inpo.losses.LossSpec` whose
``inputs`` say which batch columns it reads. The loop computes only the policy's summed
completion log-probs (``sequence_logps`` on ``[2B, L]``: chosen rows then rejected rows; with
``data.share_prompt``, ``shared_prompt_logps`` on ``B`` rows ``prompt + chosen + rejected``); every
other input (reference / previous-iterate log-probs, win-rates, ties) is a precomputed dataset
column, so only the policy is in memory (INPO §4: ``log π_ref`` and ``log π_t`` are computed once
per iteration, before training).

One optimizer step consumes ``global_batch_size`` pairs of a per-epoch permutation (seeded by
``seed`` and the epoch, so the data position is two integers). Each micro-batch's summed loss
is divided by the number of pairs in the *whole* step, so the accumulated gradient is exactly
the gradient of the mean per-pair loss over the step, however it is split into micro-batches
and processes (and for a short last step).

Distribution is the engine's: the model and optimizer go through ``accelerator.prepare`` — DDP
(bucketed all-reduce overlapped with the backward), or FSDP2 with ``fsdp=full_shard`` — and
every micro-batch but a step's last runs under ``accelerator.no_sync``. Every rank runs the
same number of micro-batches a step (a rank with no pairs left runs one weighted by zero), as
the collectives require. Checkpoints hold the full (gathered) state, so they resume on any
number of processes; the final model is gathered and written as safetensors.

The story of :func:`train`, top to bottom: set up (data and settings checked before the model
loads, the engine, model/optimizer/schedule, resume), the loop (:func:`_step`: the algorithm's
lines), checkpoints (:func:`_save`, :func:`_restore`), the end (the model written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inpo.config import config_to_dict, save_config, with_absolute_paths
from inpo.errors import ConfigError, DataError, TrainingDivergedError
from inpo.logprobs import MIN_PACK_LENGTH, packing_pays
from inpo.losses import LossSpec, get_loss
from inpo.training import zero
from inpo.training.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from inpo.training.config import TrainConfig
from inpo.training.metrics import MetricsLogger

__all__ = [
    "BATCH_COLUMNS",
    "TrainResult",
    "WarmupSchedule",
    "bucketed_logps",
    "bucketed_shared_logps",
    "check_loss_columns",
    "train",
]

log = logging.getLogger(__name__)

#: Loss-input name → column name in the dataset/collated batch, where they differ. Every other
#: input (``ref_chosen_logps``, ``chosen_lengths``, ...) has the same name in both.
BATCH_COLUMNS = {
    "ties": "tie",
    "chosen_winrates": "chosen_winrate",
    "rejected_winrates": "rejected_winrate",
}
_COLLATOR_MADE = ("chosen_lengths", "rejected_lengths")  # computed by the collator, not stored
_WARNED_IGNORED: set[tuple[str, tuple[str, ...]]] = set()  # (loss, columns) warned about

LogpsFn = Callable[..., torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`train` did: the final model folder, steps done, where it resumed from."""

    output_dir: Path
    steps: int
    total_steps: int
    resumed_from: Path | None
    last_metrics: dict[str, Any] | None
    finished: bool


class WarmupSchedule:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine/linear decay or constant.

    Step ``s`` (0-based, the step about to be taken) gets ``(s + 1) / warmup`` during warm-up
    (so the first step does move), then for cosine ``0.5 (1 + cos(π p))`` with
    ``p = (s − warmup) / (total − warmup)``. A callable object, so ``LambdaLR.state_dict``
    stores it as numbers.
    """

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        progress = min(1.0, progress)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_loss_columns(spec: LossSpec, columns: list[str], source: str) -> None:
    """Fail before training when the dataset lacks a column the loss reads (naming it)."""
    needed = [
        BATCH_COLUMNS.get(name, name)
        for name in spec.precomputed_inputs
        if name not in _COLLATOR_MADE
    ]
    missing = [c for c in needed if c not in columns]
    if not missing:
        return
    hints = []
    if any(c.startswith(("ref_", "prev_")) for c in missing):
        hints.append("run `inpo precompute` first (it writes ref_*/prev_* log-prob columns)")
    if any(c.endswith("_winrate") for c in missing):
        hints.append(
            "SPPO needs win-rate estimates per response (chosen_winrate, rejected_winrate)"
        )
    if "tie" in missing:
        hints.append("a boolean `tie` column marks pairs labelled as ties")
    raise DataError(
        f"loss '{spec.name}' needs column(s) {', '.join(missing)} that {source} lacks: "
        + "; ".join(hints)
    )


def bucketed_logps(
    logps_fn: LogpsFn,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    buckets: int,
) -> torch.Tensor:
    """``logps_fn`` on length-sorted groups of the ``N`` right-padded sequences, each group cut
    to its own longest sequence: the same ``[N]`` log-probs with less padding computed.

    Exact for right padding under a causal mask (a real token never attends to padding on its
    right). ``buckets`` groups of about equal size (``1``: one call on the whole batch).
    """
    n = input_ids.shape[0]
    if buckets <= 1 or n <= 1:
        return logps_fn(model, input_ids, attention_mask, completion_mask)
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.zeros(n, device=input_ids.device)
    for group in torch.tensor_split(order, min(buckets, n)):
        width = int(lengths[group].max())
        lp = logps_fn(
            model,
            input_ids[group, :width],
            attention_mask[group, :width],
            completion_mask[group, :width],
        )
        out = out.index_add(0, group, lp.float())
    return out


def bucketed_shared_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, buckets: int
) -> torch.Tensor:
    """:func:`inpo.logprobs.shared_prompt_logps` on a ``share_prompt`` collator batch of ``B``
    right-padded rows ``prompt + chosen + rejected``, run as length-sorted groups each cut to
    its longest row. Returns ``[2B]``: chosen ``0..B-1``, rejected ``B..2B-1``.

    ``buckets`` counts groups of the ``2B`` *unshared* sequences (``data.length_buckets``); the
    ``B`` shared rows go in ``max(1, buckets // 2)`` groups, so a forward pass holds about as
    many rows either way (single-row passes measured slower on CPU).
    """
    from inpo.logprobs import shared_prompt_logps, shared_prompt_mask

    attention_mask = batch["attention_mask"]
    b = attention_mask.shape[0]
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True)
    groups = torch.tensor_split(order, min(max(1, buckets // 2), b))
    out = torch.zeros(2 * b, device=attention_mask.device)
    for group in groups:
        width = int(lengths[group].max()) if len(groups) > 1 else attention_mask.shape[1]
        cut = {
            k: batch[k][group, :width]
            for k in ("input_ids", "attention_mask", "position_ids", "chosen_mask", "rejected_mask")
        }
        mask = shared_prompt_mask(cut["attention_mask"], cut["chosen_mask"], cut["rejected_mask"])
        lp = shared_prompt_logps(
            model,
            cut["input_ids"],
            mask,
            cut["position_ids"],
            cut["chosen_mask"],
            cut["rejected_mask"],
            cut["attention_mask"],
        )
        out = out.index_add(0, torch.cat([group, group + b]), lp.float())
    return out


def packed_shared_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`inpo.logprobs.packed_shared_prompt_logps` on a ``share_prompt`` collator batch
    (``data.share_prompt`` with ``data.packing``). Returns ``[2B]`` as
    :func:`bucketed_shared_logps` does."""
    from inpo.logprobs import packed_shared_prompt_logps

    keys = ("input_ids", "position_ids", "chosen_mask", "rejected_mask", "attention_mask")
    return packed_shared_prompt_logps(model, *(batch[k] for k in keys)).float()


#: The longest row (tokens) from which a CPU micro-batch is cut into length buckets by
#: default: below it one padded pass is faster (each pass has a fixed cost; 4 buckets measured
#: 0.35-0.70× of one pass at 8-32 tokens, 1.10-1.39× from 128 on a 10M model,
#: benchmarks/results/length_buckets.md).
MIN_BUCKET_LENGTH = 128


def _length_buckets(cfg: TrainConfig, accelerator: Any, longest: int) -> int:
    """``data.length_buckets``, null resolved per device and micro-batch: 4 on CPU for rows of
    at least :data:`MIN_BUCKET_LENGTH` tokens, else 1; 1 on accelerators (a GPU micro-batch is
    launch-bound: 4 passes ran at 0.36× of one, benchmarks/results/packing_gpu.md)."""
    if cfg.data.length_buckets is not None:
        return cfg.data.length_buckets
    return 4 if accelerator.device.type == "cpu" and longest >= MIN_BUCKET_LENGTH else 1


def _auto_packing(cfg: TrainConfig, accelerator: Any, model: Any) -> bool:
    """``data.packing: null``: pack micro-batches from :data:`~inpo.logprobs.MIN_PACK_LENGTH`
    tokens where packing measured fastest and is exact for the model
    (:func:`inpo.logprobs.packing_pays`, probed once here on the unwrapped model): on CPU, and
    on a CUDA GPU for unshared pairs (shared-prompt rows packed are unmeasured there). Never
    under FSDP or DeepSpeed, which need the LM head inside the model's forward."""
    if cfg.data.packing is not None or _fsdp_engine(accelerator) or zero.requested():
        return False
    if accelerator.device.type == "cuda" and cfg.data.share_prompt:
        return False
    return packing_pays(model, accelerator.device.type)  # False on other devices


def _check_precompute_lengths(cfg: TrainConfig) -> None:
    """Warn when ``inpo precompute`` scored the pairs under other truncation limits than ours
    and they cut some pair differently (a pair truncated differently has reference log-probs
    of another completion). Limits that both exceed the data's longest prompt (completion),
    which the manifest records, cut nothing and are equal in effect."""
    if not cfg.data.train_file:
        return
    manifest = Path(cfg.data.train_file) / "manifest.json"
    if not manifest.is_file():
        return
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    for key, longest_key in (
        ("max_prompt_length", "longest_prompt_tokens"),
        ("max_completion_length", "longest_completion_tokens"),
    ):
        if key not in info or info[key] == getattr(cfg.data, key):
            continue
        ours, theirs, longest = getattr(cfg.data, key), info[key], info.get(longest_key)
        if isinstance(longest, int):  # manifests from before 2026-12 lack it: always warn
            cut = [
                min(limit, longest) if limit is not None else longest for limit in (ours, theirs)
            ]
            if cut[0] == cut[1]:
                continue
        longest_note = f" (its longest has {longest} tokens)" if isinstance(longest, int) else ""
        log.warning(
            "data.%s=%s but %s was precomputed with %s=%s%s: pairs longer than either limit "
            "get log-probs of differently truncated text; use the same limits",
            key,
            ours,
            cfg.data.train_file,
            key,
            theirs,
            longest_note,
        )


def _pair_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of the batch's pairs counted as ``(prompt + chosen) + (prompt + rejected)``, also
    when the prompt is shared (so ``tokens`` and ``tokens_per_s`` mean the same either way)."""
    tokens = batch["attention_mask"].sum()
    if "prompt_lengths" in batch:
        tokens = tokens + batch["prompt_lengths"].sum()
    return tokens


def _text_len(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    return sum(len(m.get("content", "")) for m in value)


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _resolve_bf16(setting: Any) -> bool:
    if setting == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(setting)


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    return [key for key, _, _ in config_changes(old, new, prefix)]


def config_changes(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of every setting that differs, nested sections
    flattened, in key order."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


_RESUME_IRRELEVANT = {
    "resume",
    "save_steps",
    "keep_checkpoints",
    "final_checkpoint",
    "logging",
    "output_dir",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
}


def _resume_point(cfg: TrainConfig, ckpt_root: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return find_latest_checkpoint(ckpt_root)
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume: '{path}' is not a checkpoint folder (no trainer_state.json)")
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ConfigError(f"resume: checkpoint '{path}' is not usable: {reason}")
    return path


def _check_trackers(cfg: TrainConfig) -> None:
    """Each tracker's package is installed (a clear error before any model loads)."""
    from inpo.training.config import require_tracker_packages

    require_tracker_packages(cfg.logging.trackers, "logging.report_to")


def _start_trackers(cfg: TrainConfig, accelerator: Any) -> None:
    """accelerate's trackers, named by ``logging.project`` (else ``$WANDB_PROJECT``, else
    ``inpo``: a project the user set in the environment is not overridden)."""
    if not cfg.logging.trackers:
        return
    accelerator.init_trackers(cfg.logging.project_name, config=_flat(config_to_dict(cfg)))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


@dataclass
class _Data:
    """The preference rows and the step arithmetic, known before the model loads."""

    spec: LossSpec
    hparams: dict[str, float]
    rows: list[dict[str, Any]]
    lengths: list[int]
    steps_per_epoch: int
    total_steps: int
    warmup: int
    fingerprint: str  # of the rows' content, whatever the file format


def _load_data(cfg: TrainConfig) -> _Data:
    from inpo.data import load_preference_dataset

    spec = get_loss(cfg.loss.name)
    dataset = load_preference_dataset(
        cfg.data.source,
        split=cfg.data.split,
        skip_bad_rows=cfg.data.skip_bad_rows,
        config=cfg.data.dataset_config,
    )
    key = "data.train_file" if cfg.data.train_file else "data.dataset_name"
    check_loss_columns(spec, dataset.column_names, f"{key} '{cfg.data.source}'")
    rows = dataset.to_list()
    reads = {BATCH_COLUMNS.get(n, n) for n in (*spec.inputs, *spec.optional_inputs)}
    ignored = [c for c in dataset.column_names if c in BATCH_COLUMNS.values() and c not in reads]
    if ignored and (spec.name, tuple(ignored)) not in _WARNED_IGNORED:
        # once a process: `inpo run` trains every iteration on the same kind of pairs (DNO's
        # carry win rates that its DPO loss does not read)
        _WARNED_IGNORED.add((spec.name, tuple(ignored)))
        log.warning("loss '%s' ignores the dataset's column(s) %s", spec.name, ", ".join(ignored))
    g = cfg.optim.global_batch_size
    steps_per_epoch = math.ceil(len(rows) / g)
    total_steps = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    if cfg.data.share_prompt:  # one row per pair: its length is the whole pair's
        lengths = [
            _text_len(r["prompt"]) + _text_len(r["chosen"]) + _text_len(r["rejected"]) for r in rows
        ]
    else:
        lengths = [
            _text_len(r["prompt"]) + max(_text_len(r["chosen"]), _text_len(r["rejected"]))
            for r in rows
        ]
    return _Data(
        spec=spec,
        hparams=cfg.loss.hparams(),
        rows=rows,
        lengths=lengths,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=math.ceil(cfg.optim.warmup_ratio * total_steps),
        fingerprint=hashlib.sha256(
            json.dumps(rows, sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
    )


def _inputs_identity(cfg: TrainConfig, data: _Data) -> dict[str, str]:
    """What a checkpoint was trained from: the data's and the starting weights' fingerprints."""
    from inpo.hashing import model_fingerprint
    from inpo.training.modeling import check_model_dir

    return {"data": data.fingerprint, "model": model_fingerprint(check_model_dir(cfg.model.path))}


def _check_resume(cfg: TrainConfig, path: Path, inputs: dict[str, str], total_steps: int) -> None:
    """Refuse to resume a checkpoint trained from other data or starting weights, and to return
    a finished training for other settings (nor rewrite its saved config to claim them)."""
    try:
        trainer = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint {path}: unreadable trainer_state.json ({err})") from err
    recorded = trainer.get("inputs")  # absent: written before checkpoints recorded them
    if isinstance(recorded, dict):
        changed = [k for k in ("data", "model") if recorded.get(k) != inputs[k]]
        if changed:
            what = {"data": "data.train_file's rows", "model": "model.path's weights"}
            raise ConfigError(
                f"checkpoint {path} was trained from other inputs "
                f"({', '.join(what[k] + ' differ' for k in changed)}); resuming it would mix two "
                "trainings. Use another output_dir, or resume=never to start over."
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.get("optimizer_format") == "deepspeed" and trainer.get("num_processes") != world:
        raise ConfigError(
            f"checkpoint {path} holds DeepSpeed's optimizer partitions of "
            f"{trainer.get('num_processes')} processes; resume it on as many (this launch has "
            f"{world}), or resume=never to start over"
        )
    if int(trainer.get("step", -1)) < total_steps or "config" not in trainer:
        return  # an unfinished run resumes (with a warning if settings changed)
    changed = [
        k
        for k in _config_diff(trainer["config"], config_to_dict(cfg))
        if k.split(".")[0] not in _RESUME_IRRELEVANT
    ]
    if changed:
        raise ConfigError(
            f"{cfg.output_dir} holds a finished training with other settings (changed: "
            f"{', '.join(changed[:6])}); its model and train_config.yaml are left as they are. "
            "Choose another output_dir, or resume=never to train again from model.path"
        )


def _accelerator(cfg: TrainConfig, bf16: bool) -> Any:
    """accelerate's engine: DDP, or FSDP2 through its FSDP plugin when ``cfg.fsdp`` asks.

    accelerate selects FSDP only on accelerators (on CPU it falls back to DDP); torch's FSDP2
    itself runs on CPU with gloo, so there the plugin is installed on the state by hand and
    ``prepare`` takes accelerate's own FSDP2 path — the same code as on GPUs, testable on CPU.
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        FullyShardedDataParallelPlugin,
    )

    kwargs: dict[str, Any] = {
        "mixed_precision": "bf16" if bf16 else "no",
        "cpu": not torch.cuda.is_available(),
    }
    if zero.requested():  # the launch's accelerate config selects DeepSpeed ZeRO
        kwargs.update(zero.accelerator_kwargs(cfg))
    if cfg.logging.trackers:
        kwargs["log_with"] = cfg.logging.trackers
        kwargs["project_dir"] = str(Path(cfg.output_dir) / "trackers")
    # DDP broadcasts the model's buffers from rank 0 in every forward, a collective: ranks would
    # then have to run as many forwards, but a micro-batch runs as length buckets (or packed)
    # by its own rows' lengths. A causal LM's buffers are constants (rotary frequencies), so
    # there is nothing to broadcast: off, as transformers' Trainer offers.
    kwargs["kwargs_handlers"] = [
        *kwargs.get("kwargs_handlers", []),
        DistributedDataParallelKwargs(broadcast_buffers=False),
    ]
    plugin = None
    if cfg.fsdp != "none":
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=cfg.fsdp == "full_shard",
            cpu_offload=cfg.fsdp_cpu_offload,
            activation_checkpointing=cfg.fsdp_activation_checkpointing,
            auto_wrap_policy="transformer_based_wrap",
            state_dict_type="FULL_STATE_DICT",
        )
        kwargs["fsdp_plugin"] = plugin
    accelerator = Accelerator(**kwargs)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero.configure(accelerator, cfg)
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        # AcceleratorState copies PartialState's fields each time it is built (prepare builds
        # one), so the engine type goes on both, or prepare's later steps would see MULTI_CPU.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if plugin is not None and accelerator.num_processes == 1:
        log.warning(
            "fsdp=%s in a single process does nothing; launch with torchrun or accelerate "
            "launch (--nproc_per_node 1 shards over one device)",
            cfg.fsdp,
        )
    return accelerator


def _fsdp_engine(accelerator: Any) -> bool:
    """Whether ``prepare`` will shard the model."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _is_fsdp(model: Any) -> bool:
    """Whether ``model`` (as ``prepare`` returned it) is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _sharded(model: Any) -> bool:
    """Whether ``model``'s weights are sharded (FSDP2 or a DeepSpeed ZeRO engine): gathered to
    save, and only whole inside its own forward."""
    return _is_fsdp(model) or zero.is_engine(model)


def _optimizer_format(model: Any) -> str:
    """How a checkpoint holds the optimizer: full and keyed by name (FSDP), full and keyed by
    index (replicated), or DeepSpeed's partitions (``zero/``, one file set a rank)."""
    return "fsdp" if _is_fsdp(model) else "deepspeed" if zero.is_engine(model) else "replicated"


def _optimizer(
    cfg: TrainConfig, model: torch.nn.Module, *, sharded: bool = False
) -> torch.optim.Optimizer:
    """AdamW (no weight decay on vectors) or SGD over the trainable parameters. AdamW runs
    torch's fused kernel on CPU and CUDA (one pass over each tensor; 10M parameters: 5 ms a
    step against 17 ms on 2 cores), except when ``sharded`` (FSDP or DeepSpeed wrap or replace
    the parameters it sees)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim.optimizer == "adamw":
        device = params[0].device.type if params else "cpu"
        fused = device in ("cpu", "cuda") and not sharded and not zero.requested()
        return torch.optim.AdamW(
            [
                {
                    "params": [p for p in params if p.ndim >= 2],
                    "weight_decay": cfg.optim.weight_decay,
                },
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=cfg.optim.learning_rate,
            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
            eps=cfg.optim.adam_epsilon,
            fused=fused or None,
        )
    return torch.optim.SGD(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)


def check_low_precision_updates(model: torch.nn.Module, cfg: TrainConfig) -> float | None:
    """The fraction of trainable weights that one update of size ``learning_rate`` changes,
    when the weights themselves are bf16/fp16 (``None`` for fp32 weights).

    Adam moves a weight by about the learning rate a step; a bf16 weight ``w`` only changes by
    steps of about ``|w|·2⁻⁸``. At the INPO paper's 5e-7 on weights of ~1e-2 almost every update
    rounds away (measured: 0.8% of parameters change), so this is warned about, with numbers.
    """
    low = [
        p
        for p in model.parameters()
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
    ]
    if not low:
        return None
    lr = cfg.optim.learning_rate
    changed = total = 0
    with torch.no_grad():
        for p in low:
            w = p.detach()
            moved = (w.float() + lr).to(w.dtype) != w
            changed += int(moved.sum())
            total += w.numel()
    frac = changed / max(1, total)
    if frac < 0.5:
        log.warning(
            "model.dtype=%s weights with learning_rate=%g: an update of that size changes only "
            "%.1f%% of the %d trainable weights (the rest round away); train fp32 weights with "
            "bf16=true (autocast), use LoRA, or raise the learning rate",
            cfg.model.dtype,
            lr,
            100 * frac,
            total,
        )
    return frac


def _full_model_state(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of the (sharded) model on rank 0 (``None`` elsewhere); a collective."""
    if zero.is_engine(model):
        return zero.full_model_state(accelerator, model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return state if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    return {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def _full_optimizer_state(accelerator: Any, model: Any, optimizer: Any) -> dict[str, Any] | None:
    if zero.is_engine(model):  # partitioned: every rank saves its part (zero.save_state)
        return None
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return state if accelerator.is_main_process else None
    return optimizer.state_dict() if accelerator.is_main_process else None


def _load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: e.g. LoRA r=8 weights into an r=16 model
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), "")
        raise ConfigError(
            f"checkpoint {path} does not fit the model ({first or 'shapes differ'}); was it "
            "written with another model.path or LoRA setting? Use the same settings, another "
            "output_dir, or resume=never"
        ) from None
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # written once when tied
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was it written for another model.path or "
            "LoRA setting?"
        )


def _restore_optimizer(accelerator: Any, model: Any, optimizer: Any, state: dict) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state)


def _as_float(value: Any) -> float:
    """A scalar tensor (or DTensor, as FSDP2's grad norm is) as a Python float."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def train(
    cfg: TrainConfig,
    *,
    logps_fn: LogpsFn | None = None,
    stop_after: int | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train the policy of ``cfg.model`` on ``cfg.data`` with loss ``cfg.loss``.

    Run it in every process of a launch (``torchrun``/``accelerate launch``): each takes its
    share of every step's pairs.

    Args:
        cfg: a validated :class:`TrainConfig` (see :func:`inpo.config.load_config`).
        logps_fn: ``(model, input_ids, attention_mask, completion_mask) -> [2B]`` summed
            completion log-probs (default :func:`inpo.logprobs.sequence_logps`).
        stop_after: stop, as if killed, once this many optimizer steps are done (for tests of
            resumption); the final model is not written.
        on_metrics: called on the main process with each optimizer step's metrics row (as
            written to ``metrics.jsonl``); ``inpo run`` sends them to its run's trackers.

    Returns:
        A :class:`TrainResult`. The output folder holds the model (safetensors), tokenizer,
        ``train_config.yaml``, ``metrics.jsonl``/``metrics.csv`` and ``checkpoints/``.

    Raises:
        ConfigError / DataError: before any model loads, for bad settings or missing columns.
        TrainingDivergedError: a non-finite loss or gradient norm (after saving the last good
            state as a checkpoint).
    """
    from accelerate.utils import set_seed

    from inpo.data import PreferenceCollator
    from inpo.distributed import get_dist
    from inpo.training.modeling import (
        check_model_dir,
        check_shared_prompt_support,
        load_policy,
        load_tokenizer,
    )

    if logps_fn is not None and cfg.data.share_prompt:
        raise ValueError("logps_fn is not used with data.share_prompt=true; pass one or the other")
    if logps_fn is not None and cfg.data.packing is True:
        raise ValueError("logps_fn is not used with data.packing=true; pass one or the other")
    default_logps = logps_fn is None
    if logps_fn is None and cfg.data.packing is True:  # padding-free rows a micro-batch
        from inpo.logprobs import packed_sequence_logps as logps_fn
    elif logps_fn is None:
        from inpo.logprobs import sequence_logps as logps_fn

    # ---- set-up: everything that can fail cheaply, before the model loads --------------------
    data = _load_data(cfg)
    spec, total_steps = data.spec, data.total_steps
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    _check_precompute_lengths(cfg)
    check_model_dir(cfg.model.path)
    _check_trackers(cfg)
    resume_from = _resume_point(cfg, ckpt_root)
    inputs = _inputs_identity(cfg, data)
    if resume_from is not None:
        _check_resume(cfg, resume_from, inputs, total_steps)
    accelerator = _accelerator(cfg, _resolve_bf16(cfg.bf16))
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    if cfg.resume == "never" and ckpt_root.exists() and is_main:
        log.warning("resume=never: removing old checkpoints in %s", ckpt_root)
        shutil.rmtree(ckpt_root)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # local paths absolute: the model card's command reproduces from any folder
        paths = ("model.path", "data.train_file", "data.dataset_name")
        save_config(with_absolute_paths(cfg, paths), out_dir / "train_config.yaml")
    accelerator.wait_for_everyone()

    # ---- set-up: model (resumed weights first), engine, optimizer, schedule -----------------
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_policy(cfg.model)
    if cfg.data.share_prompt:
        check_shared_prompt_support(model)
    if cfg.data.packing is True and not cfg.data.share_prompt:  # shared rows: explicit mask
        from inpo.logprobs import check_packing_support

        try:
            check_packing_support(model)
        except ValueError as err:
            raise ConfigError(f"data.packing: {err}") from None
    if is_main:
        check_low_precision_updates(model, cfg)
    state = load_checkpoint(resume_from) if resume_from is not None else None
    if state is not None and not zero.requested():  # DeepSpeed restores its own partitions
        _load_model_state(model, state["model"], resume_from)
    if not _fsdp_engine(accelerator):
        model = model.to(accelerator.device)
    auto_pack = default_logps and _auto_packing(cfg, accelerator, model)
    optimizer = _optimizer(cfg, model, sharded=_fsdp_engine(accelerator))
    if zero.requested():
        zero.size_buckets(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if _sharded(model) and default_logps:
        # FSDP2 and ZeRO-3 free a layer's gathered weights outside that module's forward, so the
        # LM head must run inside the model's own forward: full logits a micro-batch.
        from inpo.logprobs import naive_sequence_logps as logps_fn
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(cfg.optim.lr_scheduler, data.warmup, total_steps)
    )
    start_step = 0
    if state is not None:
        start_step = _restore(cfg, accelerator, model, optimizer, scheduler, state, resume_from)
    collator = PreferenceCollator(
        tokenizer,
        max_prompt_length=cfg.data.max_prompt_length,
        max_completion_length=cfg.data.max_completion_length,
        share_prompt=cfg.data.share_prompt,
    )
    _start_trackers(cfg, accelerator)
    metrics = MetricsLogger(
        out_dir,
        accelerator=accelerator,
        resume_step=start_step if resume_from is not None else None,
        enabled=is_main,
        on_row=on_metrics,
    )

    def checkpoint(step: int, rng_state: dict[str, Any] | None = None) -> Path | None:
        return _save(
            cfg, accelerator, model, optimizer, scheduler, data, ckpt_root, step, rng_state, inputs
        )

    # ---- the loop ------------------------------------------------------------------------------
    from inpo.console import progress

    bar = progress(
        total_steps,
        f"train {spec.name}",
        enabled=is_main and cfg.logging.progress_bar,  # and not with -q or TQDM_DISABLE=1
        initial=start_step,
        unit=" steps",
    )
    row = None
    order: list[int] = []
    order_epoch = -1
    g = cfg.optim.global_batch_size
    if accelerator.device.type == "cuda":  # max_memory_gib: training's peak, not generation's
        torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            rng_before = capture_rng_state()  # the state a replay of this step needs
            epoch, in_epoch = divmod(step, data.steps_per_epoch)
            if epoch != order_epoch:
                order = _epoch_order(len(data.rows), cfg.seed, epoch, cfg.data.shuffle)
                order_epoch = epoch
            step_rows = order[in_epoch * g : (in_epoch + 1) * g]
            sums, abs_max, bad_rows = _step(
                cfg, accelerator, model, collator, data, step_rows, rank, world, logps_fn,
                auto_pack=auto_pack,
            )  # fmt: skip
            n_pairs = len(step_rows)  # pairs in the whole step, over all processes
            if not math.isfinite(float(sums[0])):
                path = checkpoint(step, rng_before)
                ids = sorted(i for part in get_dist().gather(bad_rows) for i in part)
                raise TrainingDivergedError(
                    f"non-finite loss at optimizer step {step + 1} (rows {ids}); the last "
                    f"good state (after step {step}) is saved in {path}"
                )
            if zero.is_engine(model):  # clips and steps at once; skips a non-finite update
                grad_norm = zero.step(model)
            else:
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm else math.inf
                grad_norm = _as_float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            if not math.isfinite(grad_norm):
                path = checkpoint(step, rng_before)
                ids = [int(data.rows[i]["row_id"]) for i in step_rows]
                raise TrainingDivergedError(
                    f"non-finite gradient norm at optimizer step {step + 1} (rows {ids}); the "
                    f"last good state (after step {step}) is saved in {path}"
                )
            lr = scheduler.get_last_lr()[0]
            # under ZeRO the engine stepped above and accelerate's optimizer wrapper's step is a
            # no-op; calling it tells the scheduler the step came first (torch warns otherwise)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            row = _metrics_row(
                sums, abs_max, step, data.steps_per_epoch, n_pairs, elapsed, grad_norm, lr
            )
            if accelerator.device.type == "cuda":  # this process's peak in training
                row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", tok_s=f"{row['tokens_per_s']:.0f}")
            done = step + 1
            if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
                checkpoint(done)
            if stop_after is not None and done >= stop_after and done < total_steps:
                return TrainResult(out_dir, done, total_steps, resume_from, row, finished=False)
        # ---- the end: a last checkpoint (so a re-run is a no-op) and the model ----------------
        if cfg.final_checkpoint and (
            start_step < total_steps or find_latest_checkpoint(ckpt_root) is None
        ):
            checkpoint(total_steps)
        _finish(cfg, accelerator, model, tokenizer, data, row)
    finally:
        bar.close()
        metrics.close()
        if zero.is_engine(model):
            zero.release()
    return TrainResult(out_dir, total_steps, total_steps, resume_from, row, finished=True)


def _metrics_row(
    sums: torch.Tensor,
    abs_max: torch.Tensor,
    step: int,
    steps_per_epoch: int,
    n_pairs: int,
    elapsed: float,
    grad_norm: float,
    lr: float,
) -> dict[str, Any]:
    """One optimizer step's row of ``metrics.jsonl`` (and of its CSV, in this column order)
    from :func:`_step`'s sums over all processes."""
    s = sums.tolist()
    return {
        "step": step + 1,
        "epoch": step // steps_per_epoch + (step % steps_per_epoch + 1) / steps_per_epoch,
        "loss": s[0] / n_pairs,
        "margins_mean": s[1] / n_pairs,
        "margins_abs_max": float(abs_max.item()),
        "chosen_rewards": s[2] / n_pairs,
        "rejected_rewards": s[3] / n_pairs,
        "accuracy": s[4] / n_pairs,
        "grad_norm": grad_norm,
        "lr": lr,
        "pairs": n_pairs,
        "tokens": int(s[5]),
        "tokens_per_s": s[5] / elapsed,
        "truncated_prompts": int(s[6]),
        "truncated_completions": int(s[7]),
        "logps_chosen": s[8] / n_pairs,
        "logps_rejected": s[9] / n_pairs,
    }


def _finish(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    data: Any,
    last: dict[str, Any] | None,
) -> None:
    """The trained model as plain safetensors, the prompt format it learnt, its model card
    (rewritten when this launch trained), and the upload ``push_to_hub`` asks for."""
    from inpo.training.modeling import load_policy, save_policy

    out_dir = Path(cfg.output_dir)
    _write_model(cfg, accelerator, model, tokenizer, out_dir, load_policy, save_policy)
    if not accelerator.is_main_process:
        return
    # how prompts were given to it, for whoever prompts it next (inpo export)
    conversational = bool(data.rows) and isinstance(data.rows[0]["prompt"], list)
    write_prompt_format(out_dir, "chat" if conversational else "text")
    if last is not None or not (out_dir / "README.md").exists():
        from inpo.training.modelcard import write_model_card

        write_model_card(
            out_dir,
            cfg,
            hparams=data.hparams,
            pairs=len(data.rows),
            steps=data.total_steps,
            last=last,
        )
    if cfg.push_to_hub:
        from inpo.hub import push_model

        push_model(
            out_dir,
            str(cfg.hub_model_id),
            private=cfg.hub_private_repo,
            message=f"inpo train ({data.spec.name})",
        )


def _step(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    collator: Any,
    data: _Data,
    step_rows: list[int],
    rank: int,
    world: int,
    logps_fn: LogpsFn,
    *,
    auto_pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One optimizer step's forward/backward over this rank's share of ``step_rows``
    (``auto_pack``: ``data.packing`` null resolved to packing rows of
    :data:`MIN_PACK_LENGTH` tokens or more, :func:`_auto_packing`).

    Returns the step's diagnostic sums over *all* ranks (loss, margin, chosen/rejected rewards,
    correct, tokens, truncated prompts and completions, policy chosen/rejected log-probs), the largest |margin|, and the row ids
    whose loss was not finite on this rank.
    """
    from contextlib import nullcontext

    from inpo.logprobs import packed_sequence_logps

    ds = zero.is_engine(model)
    spec, hparams, rows = data.spec, data.hparams, data.rows
    n_pairs = len(step_rows)
    local = step_rows[rank::world]
    if cfg.data.group_by_length:
        local = sorted(local, key=lambda i: -data.lengths[i])
    micro = cfg.optim.per_device_batch_size
    # FSDP gathers each layer's weights in every forward (a collective): every rank must run
    # as many forwards, so one call per micro-batch, not one per length bucket
    one_pass = _sharded(model) or cfg.data.packing is True
    # every rank runs as many micro-batches as the rank with the most pairs (collectives)
    n_micro = math.ceil(math.ceil(n_pairs / world) / micro)
    sums = torch.zeros(10, dtype=torch.float64)
    abs_max = torch.zeros(1, dtype=torch.float64)
    bad: list[int] = []
    for m in range(n_micro):
        ids = local[m * micro : (m + 1) * micro]
        weight = 1.0 if ids else 0.0  # a rank out of pairs runs one pair weighted by zero
        batch_rows = [rows[i] for i in ids] if ids else [rows[step_rows[0]]]
        batch = {k: v.to(accelerator.device) for k, v in collator(batch_rows).items()}
        b = len(batch_rows)
        width = batch["input_ids"].shape[1]
        packed = cfg.data.packing is True or (auto_pack and width >= MIN_PACK_LENGTH)
        buckets = 1 if one_pass or packed else _length_buckets(cfg, accelerator, width)
        last = m == n_micro - 1
        sync = nullcontext() if last or ds else accelerator.no_sync(model)
        with sync:
            # ---- the algorithm: policy log-probs, the declared loss, mean over the step ------
            with accelerator.autocast():
                if cfg.data.share_prompt and packed:  # ... packed, no padding
                    logps = packed_shared_logps(model, batch)
                elif cfg.data.share_prompt:  # one row prompt + chosen + rejected per pair
                    logps = bucketed_shared_logps(model, batch, buckets=buckets)
                elif packed:  # padding-free rows (data.packing true, or null and long rows)
                    logps = packed_sequence_logps(
                        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                    )
                else:
                    logps = bucketed_logps(
                        logps_fn,
                        model,
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["completion_mask"],
                        buckets=buckets,
                    )
            inputs = {"policy_chosen_logps": logps[:b], "policy_rejected_logps": logps[b:]}
            for name in (*spec.precomputed_inputs, *spec.optional_inputs):
                column = BATCH_COLUMNS.get(name, name)
                if column in batch:
                    inputs[name] = batch[column]
            out = spec(inputs, **hparams)
            loss_sum = out.losses.sum() * weight
            if not torch.isfinite(loss_sum):  # the step is refused after the collectives
                nonfinite = out.losses.detach().isfinite().logical_not()
                bad += batch["row_id"][nonfinite].tolist() if "row_id" in batch else []
            # DDP/FSDP/ZeRO average gradients over ranks: scale by world for the step's mean
            if ds:
                zero.backward(model, loss_sum * (world / n_pairs), last)
            else:
                accelerator.backward(loss_sum * (world / n_pairs))
        # ---- plumbing: diagnostics -----------------------------------------------------------
        if weight:
            mg = out.margins.double()
            sums += torch.stack(
                [
                    loss_sum.detach().double().cpu(),
                    mg.sum().cpu(),
                    out.chosen_rewards.double().sum().cpu(),
                    out.rejected_rewards.double().sum().cpu(),
                    (mg > 0).double().sum().cpu(),
                    _pair_tokens(batch).double().cpu(),
                    batch["num_truncated_prompts"].double().cpu(),
                    batch["num_truncated_completions"].double().cpu(),
                    logps[:b].detach().double().sum().cpu(),
                    logps[b:].detach().double().sum().cpu(),
                ]
            )
            abs_max = torch.maximum(abs_max, mg.abs().max().cpu().reshape(1))
    if world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
        abs_max = accelerator.gather(abs_max.to(accelerator.device)).max().cpu().reshape(1)
    return sums, abs_max, bad


# ---- checkpoints ------------------------------------------------------------------------------


def _save(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    data: _Data,
    ckpt_root: Path,
    step: int,
    rng_state: dict[str, Any] | None,
    inputs: dict[str, str],
) -> Path | None:
    """A checkpoint of the full state (every rank takes part in gathering; rank 0 writes)."""
    model_state = _full_model_state(accelerator, model)
    optimizer_state = _full_optimizer_state(accelerator, model, optimizer)
    extra = {}
    if zero.is_engine(model):  # every rank writes its optimizer partition, then rank 0 files it
        parts = ckpt_root / f"step_{step:06d}.zero-parts"
        if accelerator.is_main_process:
            if parts.exists():
                shutil.rmtree(parts)
            parts.mkdir(parents=True)
        accelerator.wait_for_everyone()
        zero.save_state(model, parts)
        accelerator.wait_for_everyone()
        extra["zero"] = parts
    path = None
    if accelerator.is_main_process:
        epoch, in_epoch = divmod(step, data.steps_per_epoch)
        inner = accelerator.unwrap_model(model)
        plain = hasattr(inner, "config") and not hasattr(inner, "peft_config")
        path = save_checkpoint(
            ckpt_root,
            step=step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            scheduler=scheduler,
            model_config=inner.config if plain else None,
            trainer_state={
                "epoch": epoch,
                "step_in_epoch": in_epoch,
                "total_steps": data.total_steps,
                "shuffle_seed": cfg.seed,
                "num_processes": accelerator.num_processes,
                "optimizer_format": _optimizer_format(model),
                "inputs": inputs,
                "config": config_to_dict(cfg),
            },
            rng_state=rng_state,
            keep=cfg.keep_checkpoints,
            extra_dirs=extra,
        )
    accelerator.wait_for_everyone()
    return path


def _restore(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    path: Path,
) -> int:
    """Apply a checkpoint's optimizer, schedule and RNG state; return its step."""
    trainer = state["trainer_state"]
    kind = _optimizer_format(model)
    written = trainer.get("optimizer_format", "replicated")
    if written != kind:
        engines = {"fsdp": "train.fsdp", "replicated": "DDP", "deepspeed": "DeepSpeed"}
        raise ConfigError(
            f"checkpoint {path} was written under {engines.get(written, written)} and this run "
            f"uses {engines[kind]}; resume it with the same engine (or resume=never to start "
            "over)"
        )
    if kind == "deepspeed":
        zero.load_state(model, path / "zero")
    else:
        _restore_optimizer(accelerator, model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    changed = [
        k
        for k in _config_diff(trainer.get("config", {}), config_to_dict(cfg))
        if k.split(".")[0] not in _RESUME_IRRELEVANT
    ]
    if changed:
        log.warning(
            "resuming from %s with a changed config (%s): the run will differ from an "
            "uninterrupted one",
            path,
            ", ".join(changed),
        )
    step = int(trainer["step"])
    if accelerator.is_main_process:
        print(f"inpo train: resuming from {path} (step {step}/{trainer.get('total_steps')})")
    return step


#: The file beside a trained model saying how it was prompted: ``{"prompt_format": "chat"}``
#: (the chat template) or ``"text"`` (plain text, the template unused).
PROMPT_FORMAT_FILE = "inpo.json"


def write_prompt_format(model_dir: Path, prompt_format: str) -> None:
    (Path(model_dir) / PROMPT_FORMAT_FILE).write_text(
        json.dumps({"prompt_format": prompt_format}) + "\n"
    )


def read_prompt_format(model_dir: Path) -> str | None:
    """``chat`` or ``text`` if inpo trained the model in ``model_dir`` (else ``None``)."""
    path = Path(model_dir) / PROMPT_FORMAT_FILE
    try:
        value = json.loads(path.read_text()).get("prompt_format")
    except (OSError, ValueError, AttributeError):
        return None
    return value if value in ("chat", "text") else None


def _write_model(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    load_policy: Callable[..., Any],
    save_policy: Callable[..., Any],
) -> None:
    """The final model as safetensors that plain ``from_pretrained`` loads (rank 0 writes).

    A sharded model is gathered into a fresh unsharded copy first (LoRA adapters included, then
    merged by :func:`inpo.training.modeling.save_policy`).
    """
    if _sharded(model):
        state = _full_model_state(accelerator, model)
        if accelerator.is_main_process:
            with zero.unpartitioned(accelerator):
                fresh = load_policy(cfg.model)
                _load_model_state(fresh, state, Path("(gathered sharded state)"))
                save_policy(fresh, tokenizer, out_dir)
    elif accelerator.is_main_process:
        save_policy(accelerator.unwrap_model(model), tokenizer, out_dir)
    accelerator.wait_for_everyone()
