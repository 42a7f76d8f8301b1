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
and processes (and for a short last step). Across processes gradients are summed with one
all-reduce before clipping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inpo.config import config_to_dict, save_config
from inpo.errors import ConfigError, DataError, TrainingDivergedError
from inpo.losses import LossSpec, get_loss
from inpo.training.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
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


def _check_precompute_lengths(cfg: TrainConfig) -> None:
    """Warn when ``inpo precompute`` scored the pairs under other truncation limits than ours:
    a pair truncated differently has reference log-probs of another completion."""
    manifest = Path(cfg.data.train_file) / "manifest.json"
    if not manifest.is_file():
        return
    import json

    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    for key in ("max_prompt_length", "max_completion_length"):
        if key in info and info[key] != getattr(cfg.data, key):
            log.warning(
                "data.%s=%s but %s was precomputed with %s=%s: pairs longer than either limit "
                "get log-probs of differently truncated text; use the same limits",
                key,
                getattr(cfg.data, key),
                cfg.data.train_file,
                key,
                info[key],
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
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


_RESUME_IRRELEVANT = {"resume", "save_steps", "keep_checkpoints", "logging", "output_dir"}


def _resume_point(cfg: TrainConfig, ckpt_root: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return find_latest_checkpoint(ckpt_root)
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume: '{path}' is not a checkpoint folder (no trainer_state.json)")
    return path


def _check_tracker(report_to: str) -> None:
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"logging.report_to={report_to} needs the {package} package: pip install {package} "
            "(or set logging.report_to=none)"
        )


def train(
    cfg: TrainConfig,
    *,
    logps_fn: LogpsFn | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the policy of ``cfg.model`` on ``cfg.data`` with loss ``cfg.loss``.

    Args:
        cfg: a validated :class:`TrainConfig` (see :func:`inpo.config.load_config`).
        logps_fn: ``(model, input_ids, attention_mask, completion_mask) -> [2B]`` summed
            completion log-probs (default :func:`inpo.logprobs.sequence_logps`).
        stop_after: stop, as if killed, once this many optimizer steps are done (for tests of
            resumption); the final model is not written.

    Returns:
        A :class:`TrainResult`. The output folder holds the model (safetensors), tokenizer,
        ``train_config.yaml``, ``metrics.jsonl``/``metrics.csv`` and ``checkpoints/``.

    Raises:
        ConfigError / DataError: before any model loads, for bad settings or missing columns.
        TrainingDivergedError: a non-finite loss or gradient norm (after saving the last good
            state as a checkpoint).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from inpo.data import PreferenceCollator, load_preference_dataset
    from inpo.training.modeling import (
        check_model_dir,
        check_shared_prompt_support,
        load_policy,
        load_tokenizer,
        save_policy,
    )

    if logps_fn is not None and cfg.data.share_prompt:
        raise ValueError("logps_fn is not used with data.share_prompt=true; pass one or the other")
    if logps_fn is None:
        from inpo.logprobs import sequence_logps as logps_fn

    # ---- everything that can fail cheaply, before the model loads ----------------------------
    spec = get_loss(cfg.loss.name)
    hparams = cfg.loss.hparams()
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    dataset = load_preference_dataset(
        cfg.data.train_file, split=cfg.data.split, skip_bad_rows=cfg.data.skip_bad_rows
    )
    check_loss_columns(spec, dataset.column_names, f"data.train_file '{cfg.data.train_file}'")
    rows = dataset.to_list()
    reads = {BATCH_COLUMNS.get(n, n) for n in (*spec.inputs, *spec.optional_inputs)}
    ignored = [c for c in dataset.column_names if c in BATCH_COLUMNS.values() and c not in reads]
    if ignored:
        log.warning("loss '%s' ignores the dataset's column(s) %s", spec.name, ", ".join(ignored))
    n_rows = len(rows)
    _check_precompute_lengths(cfg)
    check_model_dir(cfg.model.path)
    _check_tracker(cfg.logging.report_to)
    resume_from = _resume_point(cfg, ckpt_root)
    if cfg.resume == "never" and ckpt_root.exists():
        import shutil

        log.warning("resume=never: removing old checkpoints in %s", ckpt_root)
        shutil.rmtree(ckpt_root)

    bf16 = _resolve_bf16(cfg.bf16)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no")
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "train_config.yaml")

    g = cfg.optim.global_batch_size
    steps_per_epoch = math.ceil(n_rows / g)
    total_steps = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    warmup = math.ceil(cfg.optim.warmup_ratio * total_steps)
    if cfg.data.share_prompt:  # one row per pair: its length is the whole pair's
        lengths = [
            _text_len(r["prompt"]) + _text_len(r["chosen"]) + _text_len(r["rejected"]) for r in rows
        ]
    else:
        lengths = [
            _text_len(r["prompt"]) + max(_text_len(r["chosen"]), _text_len(r["rejected"]))
            for r in rows
        ]

    # ---- model, optimizer, schedule --------------------------------------------------------------
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_policy(cfg.model).to(accelerator.device)
    if cfg.data.share_prompt:
        check_shared_prompt_support(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim.optimizer == "adamw":
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.optim.learning_rate,
            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
            eps=cfg.optim.adam_epsilon,
        )
    else:
        optimizer = torch.optim.SGD(
            params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(cfg.optim.lr_scheduler, warmup, total_steps)
    )
    collator = PreferenceCollator(
        tokenizer,
        max_prompt_length=cfg.data.max_prompt_length,
        max_completion_length=cfg.data.max_completion_length,
        share_prompt=cfg.data.share_prompt,
    )

    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = int(state["step"])
        changed = [
            k
            for k in _config_diff(state.get("config", {}), config_to_dict(cfg))
            if k.split(".")[0] not in _RESUME_IRRELEVANT
        ]
        if changed:
            log.warning(
                "resuming from %s with a changed config (%s): the run will differ from an "
                "uninterrupted one",
                resume_from,
                ", ".join(changed),
            )
        if is_main:
            print(f"inpo train: resuming from {resume_from} (step {start_step}/{total_steps})")
    metrics = MetricsLogger(
        out_dir,
        report_to=cfg.logging.report_to,
        resume_step=start_step if resume_from is not None else None,
        run_config=config_to_dict(cfg),
        wandb_project=cfg.logging.wandb_project,
        enabled=is_main,
    )

    def trainer_state(step: int) -> dict[str, Any]:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        return {
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "total_steps": total_steps,
            "shuffle_seed": cfg.seed,
            "num_processes": world,
            "config": config_to_dict(cfg),
        }

    def checkpoint(step: int, rng_state: dict[str, Any] | None = None) -> Path | None:
        path = None
        if is_main:
            path = save_checkpoint(
                ckpt_root,
                step=step,
                model=accelerator.unwrap_model(model),
                optimizer=optimizer,
                scheduler=scheduler,
                trainer_state=trainer_state(step),
                rng_state=rng_state,
                keep=cfg.keep_checkpoints,
            )
        accelerator.wait_for_everyone()
        return path

    # ---- the loop ------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"train {spec.name}",
        disable=not (is_main and cfg.logging.progress_bar),
        dynamic_ncols=True,
    )
    row = None
    order: list[int] = []
    order_epoch = -1
    step = start_step
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            rng_before = capture_rng_state()  # the state a replay of this step needs
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = _epoch_order(n_rows, cfg.seed, epoch, cfg.data.shuffle), epoch
            step_rows = order[in_epoch * g : (in_epoch + 1) * g]
            n_pairs = len(step_rows)  # pairs in the whole step, over all processes
            local = step_rows[rank::world]
            if cfg.data.group_by_length:
                local = sorted(local, key=lambda i: -lengths[i])
            micro = cfg.optim.per_device_batch_size
            # sums over the step's pairs: loss, margin, chosen/rejected rewards, correct,
            # tokens, truncated prompts, truncated completions
            sums = torch.zeros(8, dtype=torch.float64)
            abs_max = torch.zeros(1, dtype=torch.float64)
            for start in range(0, len(local), micro):
                batch_rows = [rows[i] for i in local[start : start + micro]]
                batch = {k: v.to(accelerator.device) for k, v in collator(batch_rows).items()}
                b = len(batch_rows)
                # ---- the algorithm: policy log-probs, the declared loss, mean over the step --
                with accelerator.autocast():
                    if cfg.data.share_prompt:  # one row prompt + chosen + rejected per pair
                        logps = bucketed_shared_logps(model, batch, buckets=cfg.data.length_buckets)
                    else:
                        logps = bucketed_logps(
                            logps_fn,
                            model,
                            batch["input_ids"],
                            batch["attention_mask"],
                            batch["completion_mask"],
                            buckets=cfg.data.length_buckets,
                        )
                inputs = {"policy_chosen_logps": logps[:b], "policy_rejected_logps": logps[b:]}
                for name in (*spec.precomputed_inputs, *spec.optional_inputs):
                    column = BATCH_COLUMNS.get(name, name)
                    if column in batch:
                        inputs[name] = batch[column]
                out = spec(inputs, **hparams)
                loss_sum = out.losses.sum()
                if not torch.isfinite(loss_sum):
                    bad = out.losses.detach().isfinite().logical_not()
                    ids = batch["row_id"][bad].tolist() if "row_id" in batch else []
                    path = checkpoint(step, rng_before)
                    raise TrainingDivergedError(
                        f"non-finite loss at optimizer step {step + 1} (rows {ids}); the last "
                        f"good state (after step {step}) is saved in {path}"
                    )
                accelerator.backward(loss_sum / n_pairs)
                # ---- plumbing: diagnostics -------------------------------------------------------
                m = out.margins.double()
                sums += torch.stack(
                    [
                        loss_sum.detach().double().cpu(),
                        m.sum().cpu(),
                        out.chosen_rewards.double().sum().cpu(),
                        out.rejected_rewards.double().sum().cpu(),
                        (m > 0).double().sum().cpu(),
                        _pair_tokens(batch).double().cpu(),
                        batch["num_truncated_prompts"].double().cpu(),
                        batch["num_truncated_completions"].double().cpu(),
                    ]
                )
                abs_max = torch.maximum(abs_max, m.abs().max().cpu().reshape(1))
            if world > 1:
                import torch.distributed as dist

                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
                abs_max = accelerator.gather(abs_max.to(accelerator.device)).max().cpu().reshape(1)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not torch.isfinite(grad_norm):
                path = checkpoint(step, rng_before)
                ids = [int(rows[i]["row_id"]) for i in step_rows]
                raise TrainingDivergedError(
                    f"non-finite gradient norm at optimizer step {step + 1} (rows {ids}); the "
                    f"last good state (after step {step}) is saved in {path}"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            s = sums.tolist()
            row = {
                "step": step + 1,
                "epoch": epoch + (in_epoch + 1) / steps_per_epoch,
                "loss": s[0] / n_pairs,
                "margins_mean": s[1] / n_pairs,
                "margins_abs_max": float(abs_max.item()),
                "chosen_rewards": s[2] / n_pairs,
                "rejected_rewards": s[3] / n_pairs,
                "accuracy": s[4] / n_pairs,
                "grad_norm": float(grad_norm),
                "lr": lr,
                "pairs": n_pairs,
                "tokens": int(s[5]),
                "tokens_per_s": s[5] / elapsed,
                "truncated_prompts": int(s[6]),
                "truncated_completions": int(s[7]),
            }
            metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", tok_s=f"{row['tokens_per_s']:.0f}")
            done = step + 1
            if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
                checkpoint(done)
            if stop_after is not None and done >= stop_after and done < total_steps:
                return TrainResult(out_dir, done, total_steps, resume_from, row, finished=False)
        # ---- the end: a last checkpoint (so a re-run is a no-op) and the model ----------------
        if start_step < total_steps or find_latest_checkpoint(ckpt_root) is None:
            checkpoint(total_steps)
        if is_main:
            save_policy(accelerator.unwrap_model(model), tokenizer, out_dir)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        metrics.close()
    return TrainResult(out_dir, total_steps, total_steps, resume_from, row, finished=True)
