"""Algorithm 1 of the INPO paper as resumable stages over one folder per iteration.

For each iteration ``t = 0 … T−1`` (policy ``π_t``; ``π_0`` is the starting policy)::

    RUN/iter_00t/generate/   samples.jsonl      K samples a prompt from π_t
    RUN/iter_00t/annotate/   pairs.jsonl        oracle + selection rule → preference pairs
    RUN/iter_00t/logps/      data/              log π_ref and log π_t of chosen and rejected
    RUN/iter_00t/train/      model/             the loss from π_t's weights → π_{t+1}
    RUN/iter_00t/evaluate/   metrics.json       metrics of π_{t+1}

plus ``RUN/reference/evaluate`` (metrics of ``π_0`` before any training: iteration 0's row),
``RUN/config.yaml`` (the resolved config, no secrets), ``RUN/metrics.jsonl`` (one row per
iteration), ``RUN/report.md`` with plots, and ``RUN/oracle_cache.sqlite`` (every oracle query,
so a restarted run repeats none). Every stage is written to ``<stage>.partial`` and renamed
when complete, with a manifest (:mod:`inpo.pipeline.artifacts`); re-running the same command
skips complete stages, resumes partial ones (generation by chunks of prompts, annotation by the
query cache, training from its checkpoints) and redoes a stage whose config or inputs changed —
and every stage after it, since their inputs change in turn — saying why.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inpo.config import config_hash, save_config
from inpo.errors import InpoError
from inpo.pipeline.artifacts import check_stage, finish_stage, manifest_hash, start_stage
from inpo.pipeline.config import RunConfig

__all__ = ["StageRunner", "run_pipeline", "stop_signals"]

Log = Callable[[str], None]


class Interrupted(InpoError):
    """SIGINT/SIGTERM: the run stopped at a safe point; re-run the command to continue."""


@contextmanager
def stop_signals():
    """Turn SIGTERM into KeyboardInterrupt (SIGINT already is one) for the duration."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def model_fingerprint(path: Path) -> str:
    """A cheap identity of a model folder: names, sizes and the manifest/SHA of small files."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and "checkpoints" not in f.parts:
            h.update(f.relative_to(path).as_posix().encode())
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]


class StageRunner:
    """Runs or skips one stage folder, printing what it does and why."""

    def __init__(self, run_dir: Path, log: Log):
        self.run_dir = run_dir
        self.log = log
        self.redone: list[str] = []

    def __call__(
        self,
        folder: Path,
        name: str,
        iteration: int,
        settings: Any,
        inputs: dict[str, str],
        body: Callable[[Path], dict[str, Any]],
    ) -> tuple[Path, dict[str, Any]]:
        chash = config_hash(settings)
        status = check_stage(folder, chash, inputs)
        rel = folder.relative_to(self.run_dir)
        if status.reusable:
            self.log(f"[{rel}] complete, skipped")
            return folder, status.manifest["summary"]
        if folder.exists() or status.manifest is not None:
            self.log(f"[{rel}] redo: {status.reason}")
            self.redone.append(str(rel))
        started = time.time()
        work = start_stage(folder, chash)
        if any(p.name != ".config_hash" for p in work.iterdir()):
            self.log(f"[{rel}] resuming partial work")
        else:
            self.log(f"[{rel}] running")
        summary = body(work)
        manifest = finish_stage(
            work,
            folder,
            stage=name,
            iteration=iteration,
            config_hash=chash,
            input_hashes=inputs,
            summary=summary,
            started=started,
        )
        self.log(f"[{rel}] done in {manifest['seconds']:.1f}s")
        return folder, summary


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------


def _load(path: Path):
    """A policy and its tokenizer for generation/evaluation, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    if torch.cuda.is_available():
        model.to("cuda")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tok


def _generate(cfg: RunConfig, policy: Path, prompts: list, seed: int, work: Path) -> dict:
    """K samples a prompt, written chunk by chunk so that a killed run resumes where it was."""
    from tqdm import tqdm

    from inpo.generation import GenerationSettings, generate_chunks

    g = cfg.generate
    settings = GenerationSettings(g.temperature, g.top_p, g.max_new_tokens, g.batch_size)
    partial = work / "samples.partial.jsonl"
    done: list[str] = []
    if partial.exists():
        for line in partial.read_text().splitlines():
            try:
                json.loads(line)
            except ValueError:
                break
            done.append(line)
    n_chunks = len(done) // g.batch_size
    done = done[: n_chunks * g.batch_size]
    partial.write_text("".join(line + "\n" for line in done))
    truncated = 0
    if g.backend == "vllm" and len(done) < len(prompts):
        from inpo.generation import vllm_sample

        samples = vllm_sample(str(policy), prompts, g.k, settings, seed=seed)
        with open(partial, "w") as fh:
            for i, responses in enumerate(samples):
                fh.write(
                    json.dumps({"index": i, "prompt": prompts[i], "responses": responses}) + "\n"
                )
        done = prompts
    if len(done) < len(prompts):
        model, tok = _load(policy)
        bar = tqdm(total=len(prompts), initial=len(done), desc="generate", leave=False)
        with open(partial, "a") as fh:
            for start, samples, trunc in generate_chunks(
                model, tok, prompts, g.k, settings, seed=seed, start_chunk=n_chunks
            ):
                for i, responses in enumerate(samples):
                    row = {"index": start + i, "prompt": prompts[start + i], "responses": responses}
                    fh.write(json.dumps(row) + "\n")
                fh.flush()
                truncated += trunc
                bar.update(len(samples))
                _fault("generate", start // g.batch_size + 1)
        bar.close()
        del model
    partial.rename(work / "samples.jsonl")
    return {"prompts": len(prompts), "samples": len(prompts) * g.k, "truncated": truncated}


def _oracle_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _annotate(cfg: RunConfig, oracle: Any, samples: Path, work: Path) -> dict:
    """Pairs from the configured selection rule; every query goes through the SQLite cache."""
    from inpo import selection as sel

    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    stats = getattr(oracle, "stats", None)
    misses_before = stats.as_dict().get("cache_misses", 0) if stats is not None else 0
    rule = cfg.selection()
    bs = cfg.annotate.batch_size
    pairs, queries, ties = [], 0, 0
    from tqdm import tqdm

    bar = tqdm(total=len(rows), desc=f"annotate ({rule})", leave=False)
    for start in range(0, len(rows), bs):
        if start:
            _fault("annotate", start // bs)
            bar.update(bs)
        chunk = rows[start : start + bs]
        oprompts = [_oracle_prompt(r["prompt"]) for r in chunk]
        resp = [r["responses"] for r in chunk]
        if rule == "tournament":
            results = sel.tournament_batch(
                oracle, oprompts, resp, tie_policy=cfg.annotate.tie_policy, rng=None
            )
            for r, res in zip(chunk, results):
                queries += res.queries
                if res.chosen is None or r["responses"][res.chosen] == r["responses"][res.rejected]:
                    continue
                ties += bool(res.is_tie)
                pairs.append(
                    {
                        "prompt": r["prompt"],
                        "chosen": r["responses"][res.chosen],
                        "rejected": r["responses"][res.rejected],
                        "tie": bool(res.is_tie),
                    }
                )
        elif rule == "best_worst":
            results = sel.best_worst_by_reward_batch(oracle, oprompts, resp)
            for r, res in zip(chunk, results):
                queries += len(r["responses"])
                if res.chosen is None or r["responses"][res.chosen] == r["responses"][res.rejected]:
                    continue
                pairs.append(
                    {
                        "prompt": r["prompt"],
                        "chosen": r["responses"][res.chosen],
                        "rejected": r["responses"][res.rejected],
                        "tie": False,
                    }
                )
        else:  # all_pairs (SPPO): the best and worst by estimated win rate, with their rates
            results = sel.win_rates_batch(oracle, oprompts, resp)
            for r, res in zip(chunk, results):
                queries += res.queries
                rates = [float(x) for x in res.win_rates]
                best = max(range(len(rates)), key=rates.__getitem__)
                worst = min(range(len(rates)), key=rates.__getitem__)
                if r["responses"][best] == r["responses"][worst]:
                    continue
                pairs.append(
                    {
                        "prompt": r["prompt"],
                        "chosen": r["responses"][best],
                        "rejected": r["responses"][worst],
                        "chosen_winrate": float(rates[best]),
                        "rejected_winrate": float(rates[worst]),
                    }
                )
    bar.close()
    # The data loader rejects empty completions (a malformed row in a dataset); a sampled
    # response that is only EOS cannot be trained on through it, so such pairs are dropped and
    # counted.
    kept = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]
    dropped_empty = len(pairs) - len(kept)
    pairs = kept
    if not pairs:
        raise InpoError(
            f"annotate: the oracle confirmed no pair among {len(rows)} prompts; "
            "raise generate.k or generate.temperature"
        )
    with open(work / "pairs.jsonl", "w") as fh:
        for p in pairs:
            fh.write(json.dumps(p) + "\n")
    misses = stats.as_dict().get("cache_misses", 0) - misses_before if stats is not None else None
    return {
        "pairs": len(pairs),
        "prompts": len(rows),
        "ties": ties,
        "dropped_empty": dropped_empty,
        # Queries the selection rule asked, and of those the ones the backend answered (the
        # rest came from the persistent cache, e.g. after a restart).
        "oracle_queries": queries,
        "backend_queries": misses,
    }


def _logps(cfg: RunConfig, pairs: Path, ref: Path, policy: Path, work: Path) -> dict:
    """Reference and previous-iterate log-probs, one model in memory at a time."""
    import shutil

    from inpo.losses import get_loss
    from inpo.precompute import precompute_logps

    loss, _ = cfg.loss_hparams()
    spec = get_loss(loss)
    t = cfg.train
    kw = {
        "max_prompt_length": t.max_prompt_length,
        "max_completion_length": t.max_completion_length,
        "batch_size": t.per_device_batch_size * 2,
    }
    current = pairs
    for columns, model in (("ref", ref), ("prev", policy)):
        needed = spec.needs_ref if columns == "ref" else spec.needs_prev
        if needed:
            out = work / f"with_{columns}"
            if (
                columns == "prev"
                and spec.needs_ref
                and Path(policy).resolve() == Path(ref).resolve()
            ):
                # π_t is π_ref (iteration 0): its log-probs are the ones just computed.
                _copy_ref_to_prev(current, out)
            else:
                precompute_logps(current, model, out, columns=columns, overwrite=True, **kw)
            current = out
            _fault("logps", 1 if columns == "ref" else 2)
    final = work / "data"
    if current == pairs:
        final.mkdir()
        shutil.copy(pairs, final / "pairs.jsonl")
    else:
        current.rename(final)
        for leftover in work.glob("with_*"):
            shutil.rmtree(leftover)
    return {"columns": [c for c in spec.precomputed_inputs]}


def _copy_ref_to_prev(src: Path, out: Path) -> None:
    """A copy of the dataset at ``src`` with ``prev_*_logps`` equal to its ``ref_*_logps``."""
    import shutil

    from datasets import load_from_disk

    data = load_from_disk(str(src))
    for side in ("chosen", "rejected"):
        name = f"prev_{side}_logps"
        if name in data.column_names:
            data = data.remove_columns(name)
        data = data.add_column(name, data[f"ref_{side}_logps"])
    if out.exists():
        shutil.rmtree(out)
    data.save_to_disk(str(out))
    if (src / "manifest.json").is_file():
        shutil.copy(src / "manifest.json", out / "manifest.json")


def _train(cfg: RunConfig, data: Path, policy: Path, seed: int, work: Path) -> dict:
    """The configured loss from π_t's weights; resumes from checkpoints in the work folder."""
    import shutil

    from inpo.training import (
        DataConfig,
        LoggingConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        train,
    )

    loss, hparams = cfg.loss_hparams()
    t = cfg.train
    tc = TrainConfig(
        output_dir=str(work / "model"),
        model=ModelConfig(
            path=str(policy), dtype=t.dtype, gradient_checkpointing=t.gradient_checkpointing
        ),
        data=DataConfig(
            train_file=str(data),
            max_prompt_length=t.max_prompt_length,
            max_completion_length=t.max_completion_length,
            share_prompt=t.share_prompt,
        ),
        loss=LossConfig(name=loss, **hparams),
        optim=OptimConfig(
            learning_rate=t.learning_rate,
            lr_scheduler=t.lr_scheduler,
            warmup_ratio=t.warmup_ratio,
            global_batch_size=t.global_batch_size,
            per_device_batch_size=t.per_device_batch_size,
            max_grad_norm=t.max_grad_norm,
            optimizer=t.optimizer,
            epochs=t.epochs,
        ),
        logging=LoggingConfig(progress_bar=True),
        seed=seed,
        save_steps=t.save_steps,
        keep_checkpoints=1,
        resume="auto",
    )
    from inpo.config import validate_config

    validate_config(tc)
    import os

    fault = os.environ.get("INPO_FAULT_KILL", "")
    if fault.startswith("train:"):
        # Stop after that many optimizer steps (their checkpoint written), then die as a
        # SIGKILL would: the test hook of :func:`_fault` for the training loop.
        result = train(tc, stop_after=int(fault.split(":")[1]))
        if not result.finished:
            os.kill(os.getpid(), signal.SIGKILL)
    else:
        result = train(tc)
    shutil.rmtree(work / "model" / "checkpoints", ignore_errors=True)
    last = result.last_metrics or {}
    return {
        "steps": result.steps,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "loss": last.get("loss"),
        "loss_name": loss,
        "hparams": hparams,
    }


# ---------------------------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------------------------


def _training_prompts(cfg: RunConfig, task: Any) -> list[Any]:
    prompts = task.train_prompts()[: cfg.max_prompts]
    return [p for p in prompts for _ in range(cfg.prompt_repeats)]


def _fault(stage: str, unit: int) -> None:
    """Test hook: ``INPO_FAULT_KILL=<stage>:<n>`` SIGKILLs this process after unit ``n`` of
    ``stage`` (a generation chunk, an annotation batch, a log-prob column, a training
    checkpoint, an evaluation); ``INPO_FAULT_SIGNAL=TERM`` sends SIGTERM instead. Used by the
    kill-and-resume tests; unset in normal use."""
    import os

    spec = os.environ.get("INPO_FAULT_KILL")
    if spec and spec == f"{stage}:{unit}":
        sig = signal.SIGTERM if os.environ.get("INPO_FAULT_SIGNAL") == "TERM" else signal.SIGKILL
        os.kill(os.getpid(), sig)


def _seed(cfg: RunConfig, iteration: int, what: str) -> int:
    import hashlib

    return int.from_bytes(
        hashlib.sha256(f"{cfg.seed}:{iteration}:{what}".encode()).digest()[:4], "big"
    )


def run_pipeline(cfg: RunConfig, *, log: Log = print, task: Any = None) -> Path:
    """Run (or continue) the pipeline of ``cfg``; return the run folder."""
    from inpo.pipeline.report import write_metrics, write_report
    from inpo.pipeline.tasks import get_task

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    task = task or get_task(cfg)
    stage = StageRunner(run_dir, log)
    rows: list[dict[str, Any]] = []
    with stop_signals():
        try:
            ref = Path(cfg.reference) if cfg.reference else task.reference_model(run_dir)
            policy = Path(cfg.policy) if cfg.policy else ref
            ref_id = model_fingerprint(ref)
            oracle = task.oracle(cfg.annotate, cache=run_dir / "oracle_cache.sqlite")
            eval_settings = {"task": task.describe(), "evaluate": asdict(cfg.evaluate)}
            _, summary = stage(
                run_dir / "reference" / "evaluate",
                "evaluate",
                0,
                eval_settings,
                {"policy": model_fingerprint(policy), "reference": ref_id},
                lambda work: _evaluate(task, policy, ref, work),
            )
            rows.append(_row(cfg, 0, summary, {}, 0))
            queries_total = 0
            for t in range(cfg.iterations):
                it = run_dir / f"iter_{t:03d}"
                policy_id = model_fingerprint(policy)
                prompts = _training_prompts(cfg, task)
                gen_seed, train_seed = _seed(cfg, t, "gen"), _seed(cfg, t, "train")
                gen_folder, gen = stage(
                    it / "generate",
                    "generate",
                    t,
                    {
                        "generate": asdict(cfg.generate),
                        "seed": cfg.seed,
                        "prompts": task.describe(),
                        "max_prompts": cfg.max_prompts,
                        "prompt_repeats": cfg.prompt_repeats,
                    },
                    {"policy": policy_id},
                    lambda work, p=policy, pr=prompts, s=gen_seed: _generate(cfg, p, pr, s, work),
                )
                ann_folder, ann = stage(
                    it / "annotate",
                    "annotate",
                    t,
                    {
                        "annotate": asdict(cfg.annotate),
                        "selection": cfg.selection(),
                        "oracle": getattr(oracle, "oracle_id", ""),
                    },
                    {"generate": manifest_hash(gen_folder)},
                    lambda work, g=gen_folder: _annotate(cfg, oracle, g / "samples.jsonl", work),
                )
                lp_folder, _ = stage(
                    it / "logps",
                    "logps",
                    t,
                    {"loss": cfg.loss_hparams()[0], "train": asdict(cfg.train)},
                    {
                        "annotate": manifest_hash(ann_folder),
                        "reference": ref_id,
                        "policy": policy_id,
                    },
                    lambda work, a=ann_folder, p=policy: _logps(
                        cfg, a / "pairs.jsonl", ref, p, work
                    ),
                )
                tr_folder, tr = stage(
                    it / "train",
                    "train",
                    t,
                    {"loss": cfg.loss_hparams(), "train": asdict(cfg.train), "seed": cfg.seed},
                    {"logps": manifest_hash(lp_folder), "policy": policy_id},
                    lambda work, lp=lp_folder, p=policy, s=train_seed: _train(
                        cfg, lp / "data", p, s, work
                    ),
                )
                policy = tr_folder / "model"
                _, ev = stage(
                    it / "evaluate",
                    "evaluate",
                    t + 1,
                    eval_settings,
                    {"train": manifest_hash(tr_folder), "reference": ref_id},
                    lambda work, p=policy: _evaluate(task, p, ref, work),
                )
                queries_total += int(ann["oracle_queries"])
                row = _row(cfg, t + 1, ev, ann, queries_total, train=tr, gen=gen)
                row["seconds"] = _timings(it)
                rows.append(row)
                write_metrics(run_dir, rows)
        except KeyboardInterrupt as err:
            write_metrics(run_dir, rows)
            raise Interrupted(
                f"stopped ({err or 'interrupt'}); completed stages are kept — re-run the same "
                "command to continue"
            ) from None
    write_metrics(run_dir, rows)
    write_report(run_dir, rows, cfg)
    return run_dir


def _timings(folder: Path) -> dict[str, float]:
    """Seconds each stage of an iteration took (from the manifests; 0 for a skipped stage's
    original run is not possible: a manifest keeps the time of the run that made it)."""
    out = {}
    for name in ("generate", "annotate", "logps", "train", "evaluate"):
        path = folder / name / "manifest.json"
        if path.is_file():
            out[name] = json.loads(path.read_text()).get("seconds")
    return out


def _evaluate(task: Any, policy: Path, ref: Path, work: Path) -> dict:
    metrics = task.evaluate(policy, ref)
    _fault("evaluate", 1)
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _row(
    cfg: RunConfig,
    iteration: int,
    metrics: dict,
    ann: dict,
    queries_total: int,
    *,
    train: dict | None = None,
    gen: dict | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "iteration": iteration,
        "algorithm": cfg.algorithm,
        "seed": cfg.seed,
        "oracle_queries": int(ann.get("oracle_queries", 0)),
        "oracle_queries_total": queries_total,
        "pairs": ann.get("pairs", 0),
    }
    row.update(metrics)
    if train:
        row["train_loss"] = train.get("loss")
        row["train_steps"] = train.get("steps")
    if gen:
        row["truncated_samples"] = gen.get("truncated", 0)
    return row
