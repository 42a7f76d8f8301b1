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

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpo.config import save_config, with_absolute_paths
from inpo.data import completion_text, load_preference_dataset, row_place
from inpo.distributed import check_shared_folder
from inpo.errors import ConfigError, DataError
from inpo.hashing import model_fingerprint
from inpo.oracles.gpm import GPMOracle, build_gpm, gpm_score, is_gpm_folder, load_gpm
from inpo.oracles.pairwise import PairwisePreferenceOracle, render_comparison, verdict_tokens
from inpo.oracles.reward_model import RewardModelOracle, render_response
from inpo.training.batches import StepPlan, micro_batches
from inpo.training.checkpoint import Checkpointer, load_checkpoint, restore_state
from inpo.training.engine import Engine, load_model_state, resolve_bf16
from inpo.training.metrics import MetricsLogger
from inpo.training.modelcard import write_oracle_card
from inpo.training.modeling import (
    _DTYPES,
    check_model_dir,
    enable_activation_checkpointing,
    with_adapter,
)
from inpo.training.optim import make_optimizer, make_scheduler
from inpo.training.oracle_config import OracleTrainConfig
from inpo.training.resume import check_resume, resume_point
from inpo.training.skeleton import StepOut, run_steps

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
    return with_adapter(model, lora, get_peft_model)


def _load_model(cfg: OracleTrainConfig, folder: Path, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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


def load_oracle(kind: str, path: str | Path, **kwargs: Any) -> Any:
    """The oracle that serves a model of ``kind`` (what ``annotate.oracle`` loads)."""
    if kind == "bt":
        return RewardModelOracle(path, **kwargs)
    if kind == "pairwise":
        return PairwisePreferenceOracle(path, **kwargs)

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
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    # ---- set-up: data and settings checked before the model loads ----------------------------
    key = "data.train_file" if cfg.data.train_file else "data.dataset_name"
    rows = _load_pairs(cfg.data.source, cfg, key, cfg.data.split)
    eval_rows = (
        _load_pairs(cfg.data.eval_file, cfg, "data.eval_file", None) if cfg.data.eval_file else None
    )
    folder = check_model_dir(cfg.model.path)
    if cfg.kind == "pairwise":  # before anything is written or loaded: two verdict tokens
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        verdict_tokens(tok, where=f" of model.path '{cfg.model.path}'")
    plan = StepPlan(
        len(rows),
        cfg.optim.global_batch_size,
        cfg.seed,
        cfg.data.shuffle,
        cfg.optim.epochs,
        cfg.optim.max_steps,
    )
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_from = resume_point(cfg, ckpt_root)
    inputs = _inputs(rows, folder)
    if resume_from is not None:
        check_resume(
            cfg, resume_from, inputs, plan.total_steps,
            refuse_unfinished_changes=True, config_file="train_oracle_config.yaml",
        )  # fmt: skip
    engine = Engine.create(bf16=resolve_bf16(cfg.bf16))
    check_shared_folder(out_dir, "output_dir")  # several machines: one folder, or refused
    if engine.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # local paths absolute: the model card's command reproduces from any folder
        paths = ("model.path", "data.train_file", "data.eval_file")
        save_config(with_absolute_paths(cfg, paths), out_dir / "train_oracle_config.yaml")
    engine.wait()

    # ---- set-up: model, engine, optimizer, schedule, resume ----------------------------------
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_model(cfg, folder, tokenizer)
    state = load_checkpoint(resume_from) if resume_from is not None else None
    if state is not None:
        load_model_state(model, state["model"], resume_from)
    model = engine.place(model)
    optimizer = make_optimizer(cfg, model)
    model, optimizer = engine.prepare(model, optimizer)
    warmup = math.ceil(cfg.optim.warmup_ratio * plan.total_steps)
    scheduler = make_scheduler(optimizer, cfg.optim.lr_scheduler, warmup, plan.total_steps)
    start = 0
    if state is not None:
        start = restore_state(engine, model, optimizer, scheduler, state, resume_from)
        if engine.is_main:
            print(
                f"inpo train-oracle: resuming from {resume_from} (step {start}/{plan.total_steps})"
            )
    metrics = MetricsLogger(
        out_dir,
        accelerator=engine.accelerator,
        resume_step=start if resume_from else None,
        enabled=engine.is_main,
    )

    checkpoints = Checkpointer(
        engine, cfg, model, optimizer, scheduler, ckpt_root,
        steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps, inputs=inputs,
    )  # fmt: skip

    def step_fn(step: int, step_rows: list[int]) -> StepOut:
        return _step(cfg, engine, model, tokenizer, rows, plan, step, step_rows)

    # ---- the loop, then the end: a last checkpoint (a re-run is a no-op), the model ----------
    end = run_steps(
        engine, model, optimizer, scheduler, plan, step_fn,
        start=start, checkpoint=checkpoints.save, metrics=metrics,
        label=f"train-oracle {cfg.kind}", show_progress=cfg.logging.progress_bar,
        postfix=lambda r: {"loss": f"{r['loss']:.4g}", "acc": f"{r['accuracy']:.2f}"},
        max_grad_norm=cfg.optim.max_grad_norm, save_steps=cfg.save_steps, stop_after=stop_after,
    )  # fmt: skip
    row = end.last
    if not end.finished:
        return OracleTrainResult(out_dir, end.steps, row, None, resume_from)
    if (
        cfg.kind == "gpm"
        and row is not None
        and engine.is_main
        and abs(row["loss"] - math.log(2)) < 1e-3
    ):
        log.warning(
            "kind=gpm: the training loss sits at ln 2 (%.5f): the embeddings collapsed to "
            "P = ½ everywhere; lower optim.learning_rate (a GPM trained from random weights "
            "collapses at 1e-3 where 3e-4 learns, benchmarks/results/preference_models.md)",
            row["loss"],
        )
    checkpoints.finish(start)
    model_dir = out_dir  # as `inpo train` writes it: the folder annotate.model names
    if engine.is_main and (start < plan.total_steps or not (model_dir / "config.json").is_file()):
        _save_model(cfg, engine.unwrap(model), tokenizer, model_dir)
        write_oracle_card(model_dir, cfg, pairs=len(rows), steps=plan.total_steps, last=row)
    engine.wait()
    result = None
    if engine.is_main and eval_rows is not None:
        result = _held_out_metrics(cfg, model_dir, eval_rows, str(engine.device))
    return OracleTrainResult(out_dir, plan.total_steps, row, result, resume_from)


def _step(
    cfg: OracleTrainConfig,
    engine: Engine,
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    plan: StepPlan,
    step: int,
    step_rows: list[int],
) -> StepOut:
    """One optimizer step's gradients, accumulated over this process's micro-batches of
    ``step_rows``; its metrics from ``[loss sum, correct, strict pairs]`` over all processes."""
    world, n_pairs = engine.world, len(step_rows)
    micro = micro_batches(step_rows, engine.rank, world, cfg.optim.per_device_batch_size)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, strict pairs
    for m, ids in enumerate(micro):
        weight = 1.0 if ids else 0.0  # a rank out of pairs runs one weighted by zero
        batch = [rows[i] for i in ids] if ids else [rows[step_rows[0]]]
        with engine.no_sync(model, last=m == len(micro) - 1):
            # ---- the algorithm: the pair's logit, binary cross-entropy, step mean ----
            with engine.autocast():
                d, y = pair_logits(
                    cfg.kind, model, tokenizer, batch, cfg.data.max_length, engine.device
                )
            per = bce(d, y)
            if cfg.kind == "pairwise":  # each order is half the pair's loss
                per = 0.5 * per
            loss_sum = per.sum() * weight
            engine.backward(model, loss_sum * (world / n_pairs), last=m == len(micro) - 1)
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
    s = engine.reduce_sum(sums).tolist()

    def row(grad_norm: float, lr: float, seconds: float) -> dict[str, Any]:
        return {
            "step": step + 1,
            "epoch": plan.epoch(step),
            "loss": s[0] / n_pairs,
            "accuracy": s[1] / s[2] if s[2] else float("nan"),
            "grad_norm": grad_norm,
            "lr": lr,
            "pairs": n_pairs,
            "seconds": seconds,
        }

    return StepOut(s[0], row)


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


def _inputs(rows: list[dict], folder: Path) -> dict[str, str]:
    """What a checkpoint was trained from: the rows' and the starting weights' fingerprints
    (the kind and every other setting are in its recorded config)."""
    data = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    return {"data": data[:16], "model": model_fingerprint(folder)}
