"""``inpo train-oracle``: train the preference oracle itself — Bradley–Terry, pairwise or GPM.

One loop for the three kinds, on ``inpo train``'s engine: accelerate (``prepare``: DDP across
processes, bf16 autocast), the same optimizer, warm-up schedule, per-epoch seeded permutation,
checkpoints (model, optimizer, schedule, RNG, data position; verified, resumable on any number
of processes) and LoRA. What differs per kind is one function, the pair's logit ``d``
(``P(chosen ≻ rejected) = σ(d)``), and the loss is the same for all three: the binary
cross-entropy of ``σ(d)`` against the label ``y`` (1, or ½ for a tie):

- ``bt``: ``d = r(x, y_c) − r(x, y_r) − m`` (a sequence-classification head, one label; ``m`` the
  optional margin column, HelpSteer2-Preference's), so ``y = 1`` gives ``−log σ(r_c − r_r − m)``;
- ``pairwise``: the RLHFlow A/B model, trained on both orders: ``d = logit_A − logit_B`` after
  ``[CONTEXT] … [RESPONSE A] y_c [RESPONSE B] y_r`` with ``y = 1``, and after the swapped text
  with ``y = 0`` (each order half the pair's loss);
- ``gpm``: ``d = s(y_c ≻ y_r | x) / β`` (:mod:`inpo.oracles.gpm`).

Each kind saves a folder its oracle loads (``annotate.oracle=reward_model|pairwise|gpm``), and
the held-out ``data.eval_file`` is scored *through that oracle*, as it will be used:
accuracy, Brier score and expected calibration error in ``eval_metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from inpo.config import save_config, with_absolute_paths
from inpo.errors import ConfigError, DataError, TrainingDivergedError
from inpo.training.oracle_config import OracleTrainConfig

__all__ = [
    "OracleTrainResult",
    "evaluate_oracle",
    "load_oracle",
    "preference_metrics",
    "train_oracle",
]

log = logging.getLogger(__name__)


@dataclass
class OracleTrainResult:
    output_dir: Path
    steps: int
    last_metrics: dict[str, Any] | None
    eval_metrics: dict[str, Any] | None
    resumed_from: Path | None


# ---- data ------------------------------------------------------------------------------------


def _load_pairs(source: str, cfg: OracleTrainConfig, key: str, split: str | None) -> list[dict]:
    """Rows ``{prompt, chosen, rejected, label, margin}`` (chosen/rejected as text), validated."""
    from inpo.data import completion_text, load_preference_dataset, row_place

    dataset = load_preference_dataset(
        source,
        split=split,
        skip_bad_rows=cfg.data.skip_bad_rows,
        keep_columns=True,
        config=cfg.data.dataset_config,
    )
    margin_col = cfg.data.margin_column
    use_margin = cfg.kind == "bt" and margin_col in dataset.column_names
    rows = []
    for i, r in enumerate(dataset.to_list()):
        margin = 0.0
        if use_margin:
            value = r.get(margin_col)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                where = row_place(dataset, int(r.get("row_id", i)))
                raise DataError(
                    f"{key} '{source}': {where}: field '{margin_col}': expected a finite number, "
                    f"got {value!r}"
                )
            margin = float(value)
        rows.append(
            {
                "prompt": r["prompt"],
                "chosen": completion_text(r["chosen"]),
                "rejected": completion_text(r["rejected"]),
                "label": 0.5 if r.get("tie") else 1.0,
                "margin": margin,
            }
        )
    if not rows:
        raise DataError(f"{key} '{source}' has no pairs")
    if use_margin:
        log.info("kind=bt: using the '%s' column as the Bradley–Terry margin", margin_col)
    return rows


# ---- models ----------------------------------------------------------------------------------


def _lora(model: Any, cfg: OracleTrainConfig, task_type: str | None, keep: list[str]) -> Any:
    if cfg.model.lora is None:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is in the dev extra
        raise ConfigError("model.lora needs the peft package: pip install 'inpo[peft]'") from err
    lora = LoraConfig(
        r=cfg.model.lora.r,
        lora_alpha=cfg.model.lora.alpha,
        lora_dropout=cfg.model.lora.dropout,
        target_modules=list(cfg.model.lora.target_modules),
        task_type=task_type,
        modules_to_save=keep or None,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"model.lora.target_modules: {err}") from err


def _load_model(cfg: OracleTrainConfig, folder: Path, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from inpo.training.modeling import _DTYPES

    kwargs: dict[str, Any] = {"dtype": _DTYPES[cfg.model.dtype], "trust_remote_code": False}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.kind == "bt":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
        model = _lora(model, cfg, "SEQ_CLS", [])
    elif cfg.kind == "pairwise":
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        model = _lora(model, cfg, "CAUSAL_LM", [])
    else:
        from inpo.oracles.gpm import build_gpm, is_gpm_folder, load_gpm

        if is_gpm_folder(folder):  # continue training a GPM
            model = load_gpm(folder, dtype=kwargs["dtype"])
        else:
            g = cfg.gpm
            model = build_gpm(
                folder,
                dim=g.dim,
                prompt_scales=g.prompt_scales,
                beta=g.beta,
                dtype=kwargs["dtype"],
                attn_implementation=cfg.model.attn_implementation,
            )
        model.value_head.float()
        if model.scale_head is not None:
            model.scale_head.float()
        if cfg.model.lora is not None:
            model.backbone = _lora(model.backbone, cfg, None, [])
    if cfg.model.gradient_checkpointing:
        from inpo.training.modeling import enable_activation_checkpointing

        enable_activation_checkpointing(model.backbone if cfg.kind == "gpm" else model)
    model.train()
    return model


def _save_model(cfg: OracleTrainConfig, model: Any, tokenizer: Any, out: Path) -> None:
    """Safetensors that the kind's oracle loads (LoRA merged; its adapter kept in ``adapter/``)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "gpm":
        if hasattr(model.backbone, "peft_config"):
            model.backbone.save_pretrained(out / "adapter")
            model.backbone = model.backbone.merge_and_unload()
        model.save(out, tokenizer)
        return
    if hasattr(model, "peft_config"):
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ---- the pair's logit d, per kind ------------------------------------------------------------


def _pad(
    seqs: list[list[int]], pad: int, left: bool, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def pair_logits(
    kind: str, model: Any, tokenizer: Any, rows: list[dict], max_length: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, y)``: the logits of ``P(chosen ≻ rejected)`` and their labels, ``[n]`` each
    (``pairwise``: ``[2n]``, the two orders)."""
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.float32, device=device)
    pad = tokenizer.pad_token_id
    if kind == "pairwise":
        from inpo.oracles.pairwise import render_comparison, verdict_tokens

        texts = [
            render_comparison(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in rows
        ]
        texts += [
            render_comparison(tokenizer, r["prompt"], r["rejected"], r["chosen"]) for r in rows
        ]
        too_long = [len(t) for t in texts if len(t) > max_length]
        if too_long:
            raise DataError(
                f"a comparison of {too_long[0]} tokens exceeds data.max_length {max_length} "
                "(cutting it would hide a response); raise data.max_length"
            )
        id_a, id_b = verdict_tokens(tokenizer)
        ids, mask = _pad(texts, pad, left=True, device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = (
            model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
            .logits[:, -1, :]
            .float()
        )
        d = logits[:, id_a] - logits[:, id_b]
        return d, torch.cat([labels, 1.0 - labels])
    from inpo.oracles.reward_model import render_response

    gpm = kind == "gpm"  # only a GPM reads the prompt's last token
    enc = [
        render_response(tokenizer, r["prompt"], r["chosen"], max_length, prompt_index=gpm)
        for r in rows
    ]
    enc += [
        render_response(tokenizer, r["prompt"], r["rejected"], max_length, prompt_index=gpm)
        for r in rows
    ]
    ids, mask = _pad([e.ids for e in enc], pad, left=False, device=device)
    n = len(rows)
    if kind == "bt":
        r = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        margins = torch.tensor([row["margin"] for row in rows], dtype=torch.float32, device=device)
        return r[:n] - r[n:] - margins, labels
    from inpo.oracles.gpm import gpm_score

    prompt_index = torch.tensor([e.prompt_index for e in enc], device=device)
    v, scales = model(ids, mask, prompt_index)
    beta = _unwrap(model).beta
    d = gpm_score(v[:n], v[n:], 0.5 * (scales[:n] + scales[n:])) / beta
    return d, labels


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def bce(d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``−[y log σ(d) + (1 − y) log σ(−d)]`` per element (stable)."""
    return -(y * torch.nn.functional.logsigmoid(d) + (1 - y) * torch.nn.functional.logsigmoid(-d))


# ---- held-out metrics ------------------------------------------------------------------------


def preference_metrics(p: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Accuracy (strict pairs; ``P = ½`` counts half), Brier score ``mean (P − y)²`` (all pairs,
    a tie's ``y = ½``) and the expected calibration error over ``bins`` equal-width bins of the
    confidence ``max(P, 1 − P)`` (strict pairs)."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    strict = y != 0.5
    ps, ys = p[strict], y[strict]
    correct = np.where(ps == 0.5, 0.5, ((ps > 0.5) == (ys > 0.5)).astype(np.float64))
    conf = np.maximum(ps, 1 - ps)
    ece = 0.0
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    return {
        "pairs": len(p),
        "strict_pairs": int(strict.sum()),
        "accuracy": float(correct.mean()) if len(ps) else float("nan"),
        "brier": float(np.mean((p - y) ** 2)),
        "ece": float(ece),
    }


#: Settings that do not change what a resumed training computes (its weights and metrics).
_RESUME_IRRELEVANT = ("resume", "save_steps", "keep_checkpoints", "logging", "output_dir")
_RESUME_IRRELEVANT_KEYS = ("data.eval_file",)


def _check_resume(cfg: OracleTrainConfig, checkpoint: Path, fingerprint: str) -> None:
    """Resume only the training this command describes: a checkpoint from other data, model or
    kind, or recorded with another setting that changes training (learning rate, epochs,
    max_length, seed, shuffle, ...; finished or not), is refused naming the key and both
    values, so neither the weights nor ``train_oracle_config.yaml`` can claim what did not run."""
    from inpo.config import config_to_dict
    from inpo.training.loop import config_changes

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    recorded = state.get("inputs")
    if recorded not in (None, fingerprint):
        raise ConfigError(
            f"checkpoint {checkpoint} was trained from other data, model or kind; use "
            "another output_dir, or resume=never to start over"
        )
    if "config" not in state:
        return  # written before checkpoints recorded their settings
    changed = [
        (key, old, new)
        for key, old, new in config_changes(state["config"], config_to_dict(cfg))
        if key.split(".")[0] not in _RESUME_IRRELEVANT and key not in _RESUME_IRRELEVANT_KEYS
    ]
    if changed:
        shown = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, old, new in changed[:4])
        raise ConfigError(
            f"{cfg.output_dir} holds a training (checkpoint {checkpoint.name}) with other "
            f"settings ({shown}); resuming would train or record something else. Use the same "
            "settings, another output_dir, or resume=never to start over"
        )


def load_oracle(kind: str, path: str | Path, **kwargs: Any) -> Any:
    """The oracle that serves a model of ``kind`` (what ``annotate.oracle`` loads)."""
    if kind == "bt":
        from inpo.oracles.reward_model import RewardModelOracle

        return RewardModelOracle(path, **kwargs)
    if kind == "pairwise":
        from inpo.oracles.pairwise import PairwisePreferenceOracle

        return PairwisePreferenceOracle(path, **kwargs)
    from inpo.oracles.gpm import GPMOracle

    return GPMOracle(path, **kwargs)


def evaluate_oracle(oracle: Any, rows: list[dict]) -> dict[str, float]:
    """:func:`preference_metrics` of ``oracle``'s ``P(chosen ≻ rejected)`` on ``rows``."""
    p = oracle.prob_prefers(
        [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    )
    return preference_metrics(p, np.array([r["label"] for r in rows]))


# ---- the loop --------------------------------------------------------------------------------


def train_oracle(cfg: OracleTrainConfig, *, stop_after: int | None = None) -> OracleTrainResult:
    """Train ``cfg.kind``'s preference model; run it in every process of a launch.

    ``stop_after``: stop, as if killed, after that many optimizer steps (resumption tests).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from inpo.console import progress
    from inpo.training.checkpoint import (
        capture_rng_state,
        find_latest_checkpoint,
        load_checkpoint,
        restore_rng_state,
    )
    from inpo.training.loop import (
        WarmupSchedule,
        _as_float,
        _epoch_order,
        _fsdp_engine,
        _load_model_state,
        _optimizer,
        _resolve_bf16,
        _resume_point,
        _save,
    )
    from inpo.training.metrics import MetricsLogger
    from inpo.training.modeling import check_model_dir

    # ---- set-up: data and settings checked before the model loads ----------------------------
    key = "data.train_file" if cfg.data.train_file else "data.dataset_name"
    rows = _load_pairs(cfg.data.source, cfg, key, cfg.data.split)
    eval_rows = (
        _load_pairs(cfg.data.eval_file, cfg, "data.eval_file", None) if cfg.data.eval_file else None
    )
    folder = check_model_dir(cfg.model.path)
    if cfg.kind == "pairwise":  # before anything is written or loaded: two verdict tokens
        from inpo.oracles.pairwise import verdict_tokens

        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        verdict_tokens(tok, where=f" of model.path '{cfg.model.path}'")
    g = cfg.optim.global_batch_size
    steps_per_epoch = math.ceil(len(rows) / g)
    total_steps = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_from = _resume_point(cfg, ckpt_root)
    fingerprint = _fingerprint(rows, cfg)
    if resume_from is not None:
        _check_resume(cfg, resume_from, fingerprint)
    bf16 = _resolve_bf16(cfg.bf16)
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available()
    )
    is_main = accelerator.is_main_process
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # local paths absolute: the model card's command reproduces from any folder
        paths = ("model.path", "data.train_file", "data.eval_file")
        save_config(with_absolute_paths(cfg, paths), out_dir / "train_oracle_config.yaml")
    accelerator.wait_for_everyone()

    # ---- set-up: model, engine, optimizer, schedule, resume ----------------------------------
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_model(cfg, folder, tokenizer)
    state = load_checkpoint(resume_from) if resume_from is not None else None
    if state is not None:
        _load_model_state(model, state["model"], resume_from)
    model = model.to(accelerator.device)
    optimizer = _optimizer(cfg, model, sharded=_fsdp_engine(accelerator))
    model, optimizer = accelerator.prepare(model, optimizer)
    warmup = math.ceil(cfg.optim.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(cfg.optim.lr_scheduler, warmup, total_steps)
    )
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start = int(state["trainer_state"]["step"])
        if is_main:
            print(f"inpo train-oracle: resuming from {resume_from} (step {start}/{total_steps})")
    metrics = MetricsLogger(
        out_dir,
        accelerator=accelerator,
        resume_step=start if resume_from else None,
        enabled=is_main,
    )

    # inpo train's checkpoint writer (full state, verified, pruned); the data position is two
    # integers, so the step arithmetic is all it needs of the data
    position = SimpleNamespace(steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    def checkpoint(step: int, rng: dict | None = None) -> Path | None:
        return _save(
            cfg,
            accelerator,
            model,
            optimizer,
            scheduler,
            position,
            ckpt_root,
            step,
            rng,
            fingerprint,
        )

    # ---- the loop ------------------------------------------------------------------------------
    bar = progress(
        total_steps,
        f"train-oracle {cfg.kind}",
        enabled=is_main and cfg.logging.progress_bar,
        initial=start,
        unit=" steps",
    )
    row = None
    order, order_epoch = [], -1
    try:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            rng_before = capture_rng_state()
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = (
                    _epoch_order(len(rows), cfg.seed, epoch, cfg.data.shuffle),
                    epoch,
                )
            step_rows = order[in_epoch * g : (in_epoch + 1) * g]
            n_pairs = len(step_rows)
            sums = _step(cfg, accelerator, model, tokenizer, rows, step_rows)
            if not math.isfinite(float(sums[0])):
                path = checkpoint(step, rng_before)
                raise TrainingDivergedError(
                    f"non-finite loss at optimizer step {step + 1}; the last good state (after "
                    f"step {step}) is saved in {path}"
                )
            max_norm = cfg.optim.max_grad_norm or math.inf
            grad_norm = _as_float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            s = sums.tolist()
            row = {
                "step": step + 1,
                "epoch": epoch + (in_epoch + 1) / steps_per_epoch,
                "loss": s[0] / n_pairs,
                "accuracy": s[1] / s[2] if s[2] else float("nan"),
                "grad_norm": grad_norm,
                "lr": lr,
                "pairs": n_pairs,
                "seconds": time.perf_counter() - t0,
            }
            metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", acc=f"{row['accuracy']:.2f}")
            done = step + 1
            if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
                checkpoint(done)
            if stop_after is not None and done >= stop_after and done < total_steps:
                return OracleTrainResult(out_dir, done, row, None, resume_from)
        if (
            cfg.kind == "gpm"
            and row is not None
            and is_main
            and abs(row["loss"] - math.log(2)) < 1e-3
        ):
            log.warning(
                "kind=gpm: the training loss sits at ln 2 (%.5f): the embeddings collapsed to "
                "P = ½ everywhere; lower optim.learning_rate (a GPM trained from random weights "
                "collapses at 1e-3 where 3e-4 learns, benchmarks/results/preference_models.md)",
                row["loss"],
            )
        # ---- the end: a last checkpoint (a re-run is a no-op), the model, held-out metrics -----
        if start < total_steps or find_latest_checkpoint(ckpt_root) is None:
            checkpoint(total_steps)
        model_dir = out_dir  # as `inpo train` writes it: the folder annotate.model names
        if is_main and (start < total_steps or not (model_dir / "config.json").is_file()):
            _save_model(cfg, accelerator.unwrap_model(model), tokenizer, model_dir)
            from inpo.training.modelcard import write_oracle_card

            write_oracle_card(model_dir, cfg, pairs=len(rows), steps=total_steps, last=row)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        metrics.close()
    result = None
    if is_main and eval_rows is not None:
        result = _held_out_metrics(cfg, model_dir, eval_rows, str(accelerator.device))
    return OracleTrainResult(out_dir, total_steps, row, result, resume_from)


def _step(
    cfg: OracleTrainConfig,
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    step_rows: list[int],
) -> torch.Tensor:
    """One optimizer step's gradients, accumulated over this process's micro-batches of
    ``step_rows``; returns ``[loss sum, correct, strict pairs]`` summed over all processes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.optim.per_device_batch_size
    n_pairs = len(step_rows)
    local = step_rows[rank::world]
    n_micro = math.ceil(math.ceil(n_pairs / world) / micro)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, strict pairs
    for m in range(n_micro):
        ids = local[m * micro : (m + 1) * micro]
        weight = 1.0 if ids else 0.0  # a rank out of pairs runs one weighted by zero
        batch = [rows[i] for i in ids] if ids else [rows[step_rows[0]]]
        sync = accelerator.no_sync(model) if m < n_micro - 1 else nullcontext()
        with sync:
            # ---- the algorithm: the pair's logit, binary cross-entropy, step mean ----
            with accelerator.autocast():
                d, y = pair_logits(
                    cfg.kind, model, tokenizer, batch, cfg.data.max_length, accelerator.device
                )
            per = bce(d, y)
            if cfg.kind == "pairwise":  # each order is half the pair's loss
                per = 0.5 * per
            loss_sum = per.sum() * weight
            accelerator.backward(loss_sum * (world / n_pairs))
        if weight:
            dd, yy = d.detach().double().cpu(), y.detach().double().cpu()
            strict = yy != 0.5
            sums += torch.tensor(
                [
                    float(loss_sum.detach()),
                    float(((dd > 0) == (yy > 0.5))[strict].sum()),
                    float(strict.sum()),
                ],
                dtype=torch.float64,
            )
    if world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    return sums


def _held_out_metrics(
    cfg: OracleTrainConfig, model_dir: Path, eval_rows: list[dict], device: str
) -> dict[str, Any]:
    """The saved model, loaded as the pipeline's oracle, on ``data.eval_file``'s pairs
    (``eval_metrics.json``)."""
    oracle = load_oracle(cfg.kind, model_dir, max_length=cfg.data.max_length, device=device)
    t0 = time.perf_counter()
    result = {
        **evaluate_oracle(oracle, eval_rows),
        "kind": cfg.kind,
        "eval_file": cfg.data.eval_file,
    }
    result["forward_passes"] = int(oracle.stats.extra.get("sequences_scored", 0))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    (Path(cfg.output_dir) / "eval_metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _fingerprint(rows: list[dict], cfg: OracleTrainConfig) -> str:
    """What a checkpoint was trained from: the rows, the starting weights and the kind."""
    import hashlib

    from inpo.hashing import model_fingerprint
    from inpo.training.modeling import check_model_dir

    text = json.dumps(
        [rows, cfg.kind, model_fingerprint(check_model_dir(cfg.model.path))],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]
