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
so a restarted run repeats none).

Every stage is written to ``<stage>.partial`` and renamed when complete, with a manifest
(:mod:`inpo.pipeline.artifacts`); re-running the same command skips complete stages, resumes
partial ones (generation by prompts, annotation by the query cache, training from its
checkpoints) and redoes a stage whose config or inputs changed — and every stage after it,
since their inputs change in turn — saying why.

The same program runs on one process or many (``torchrun``/``accelerate launch``): each stage
splits its work by rank and rank 0 finishes the folder (:mod:`inpo.pipeline.runner`,
:mod:`inpo.pipeline.stages`), so the files do not depend on the number of processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

from inpo.config import save_config
from inpo.distributed import check_shared_folder, get_dist
from inpo.errors import ConfigError
from inpo.hashing import model_fingerprint
from inpo.hub import (
    push_model,  # huggingface_hub: only when pushing
    resolve_model,
)
from inpo.oracles.cache import merge_rank_caches
from inpo.pipeline.artifacts import manifest_hash
from inpo.pipeline.config import RunConfig
from inpo.pipeline.lock import LOCK, RunFolderBusy, acquire
from inpo.pipeline.report import iteration_summary, run_summary, write_metrics, write_report
from inpo.pipeline.runner import Interrupted, StageRunner, stop_signals
from inpo.pipeline.runtime import Ctx, stage_seed
from inpo.pipeline.stages import annotate, evaluate, generate, logps, train
from inpo.pipeline.tracking import start_run_trackers
from inpo.pipeline.workloads import get_workload
from inpo.vllm_backend import engine_options, start_engine

__all__ = ["run_pipeline"]

STAGES = ("generate", "annotate", "logps", "train", "evaluate")


class Step(NamedTuple):
    """One policy step's results: the train folder and the stages' summaries."""

    folder: Path
    generate: dict
    annotate: dict
    train: dict


def run_pipeline(cfg: RunConfig, *, log=print, task: Any = None) -> Path:
    """Run (or continue) the pipeline of ``cfg`` on this process's share; return the run folder.

    ``task``: a workload object (default: :func:`inpo.pipeline.workloads.get_workload`).
    Raises :class:`inpo.pipeline.lock.RunFolderBusy` (on every rank) if another run holds the
    folder.
    """
    import os

    dist = get_dist()
    run_dir = Path(cfg.run_dir)
    refused = foreign_run_dir(run_dir, [cfg.reference, cfg.policy]) if dist.is_main else None
    refused = dist.broadcast(refused)
    if refused:
        raise ConfigError(refused)
    check_shared_folder(run_dir, "run_dir")  # several machines: one folder, or refused
    fd, busy = None, None
    if dist.is_main:
        try:
            fd = acquire(run_dir)
        except RunFolderBusy as err:
            busy = str(err)
    busy = dist.broadcast(busy)
    if busy:
        raise RunFolderBusy(busy)
    try:
        return _run(cfg, run_dir, dist, log, task)
    finally:
        if fd is not None:
            os.close(fd)  # releases the folder's lock


def _is_run_folder(folder: Path) -> bool:
    """An inpo run folder: the lock a run took, or a stage's manifest (a copy of a run folder,
    which leaves the lock behind, is one too)."""

    return (folder / LOCK).exists() or any(folder.glob("*/*/manifest.json"))


def foreign_run_dir(run_dir: Path, models: list[str]) -> str | None:
    """Why ``run_dir`` must not be written, or ``None``: a file; a non-empty folder that is not
    an inpo run folder (no ``.lock`` of a run that used it), whose files a run would write
    over; a folder that is (or lies inside) the reference or policy model's folder."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"run_dir '{run_dir}' is a file; name a folder for the run (it is created)"
    here = run_dir.resolve()
    for model in models:
        if model and Path(model).is_dir():
            folder = Path(model).resolve()
            if here == folder or folder in here.parents:
                return (
                    f"run_dir '{run_dir}' is inside the model folder '{model}'; a run must not "
                    "write into a model it reads: name another folder"
                )
    if run_dir.is_dir() and not _is_run_folder(run_dir):
        mine = sorted(p.name for p in run_dir.iterdir())
        if mine:
            shown = ", ".join(mine[:3]) + (", …" if len(mine) > 3 else "")
            return (
                f"run_dir '{run_dir}' is not empty and is not an inpo run folder (it holds "
                f"{shown}); a run would write over such files: name a new or empty folder"
            )
    return None


def _run(cfg: RunConfig, run_dir: Path, dist: Any, log: Any, task: Any) -> Path:
    started = time.time()
    ctx = Ctx(cfg, run_dir, dist, log)
    procs = f", {dist.world} processes" if dist.world > 1 else ""
    ctx.log(
        f"inpo run: {cfg.algorithm} on task '{cfg.task}', {cfg.iterations} iteration(s), "
        f"K = {cfg.generate.k}{procs} → {run_dir}"
    )
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
        # answers a killed multi-process run left in its rank files join the shared cache
        merge_rank_caches(run_dir / "oracle_cache.sqlite")
    if cfg.generate.backend == "vllm":  # vLLM's import, while the run sets itself up
        start_engine(local_rank=dist.local_rank, **engine_options(cfg.generate))
    workload = task or get_workload(cfg)
    plan = getattr(workload, "data_plan", lambda: None)()
    if plan:
        ctx.log(plan)
    rows: list[dict[str, Any]] = []
    trackers = start_run_trackers(cfg, run_dir, is_main=dist.is_main)
    with stop_signals(), trackers:
        try:
            loop = _Loop(ctx, workload, trackers)
            policy = loop.run(rows)
        except KeyboardInterrupt as err:
            if dist.is_main:
                write_metrics(run_dir, rows)
            raise Interrupted(
                f"stopped ({str(err) or 'Ctrl-C'}); completed stages are kept — re-run the same "
                "command to continue"
            ) from None
    if dist.is_main:
        write_metrics(run_dir, rows)
        write_report(run_dir, rows, cfg)
        ctx.log(run_summary(rows, time.time() - started))
        if cfg.push_to_hub:
            push_model(
                Path(policy),
                str(cfg.hub_model_id),
                private=cfg.hub_private_repo,
                message=f"inpo run ({cfg.algorithm}, {cfg.iterations} iterations)",
            )
    dist.barrier()
    return run_dir


class _Loop:
    """The iterations of one run: each stage a :class:`StageRunner` call with the settings and
    inputs its module declares (its hash), its work and its merge."""

    def __init__(self, ctx: Ctx, workload: Any, trackers: Any):
        cfg, dist, run_dir = ctx.cfg, ctx.dist, ctx.run_dir
        self.ctx, self.cfg, self.workload, self.trackers = ctx, cfg, workload, trackers
        self.stage = StageRunner(ctx)
        self.ref = _reference(cfg, workload, run_dir, dist, ctx)
        self.ref_id = model_fingerprint(self.ref)
        self.oracle = workload.oracle(
            cfg.annotate,
            cache=run_dir / "oracle_cache.sqlite",
            rank=dist.rank,
            world=dist.world,
            device=dist.device,
        )
        self.policies: list[Path] = []  # π_0, π_1, …: the anchors comal and mpo move to

    def evaluation(self, folder: Path, it: int, inputs: dict, policy: Path) -> dict:
        """Stage 5: the metrics of ``policy``."""
        ctx, workload = self.ctx, self.workload
        return self.stage(
            folder,
            "evaluate",
            it,
            evaluate.settings(self.cfg, workload),
            inputs,
            lambda w: evaluate.work(ctx, workload, policy, self.ref, w),
            lambda w: evaluate.merge(ctx, workload, w),
        )[1]

    def run(self, rows: list[dict[str, Any]]) -> Path:
        """Every iteration, appending each one's metrics row to ``rows``; the last policy."""
        cfg, ctx, run_dir = self.cfg, self.ctx, self.ctx.run_dir
        policy = resolve_model(cfg.policy, "policy") if cfg.policy else self.ref
        self.policies.append(policy)
        inputs = {"policy": model_fingerprint(policy), "reference": self.ref_id}
        summary = self.evaluation(run_dir / "reference" / "evaluate", 0, inputs, policy)
        rows.append(_row(cfg, 0, summary, {}, 0))
        self.trackers.iteration_done(rows[0], train_steps=0)
        queries_total = 0
        for t in range(cfg.iterations):
            it = run_dir / f"iter_{t:03d}"
            sampler, half = policy, None
            if cfg.spec.two_steps:
                # the half step π_{t+1/2}: from π_t against π_t's samples
                half = self.policy_step(it / "half_step", t, policy, policy, "")
                self.trackers.steps_done(int(half.train.get("steps") or 0))
                sampler = half.folder / "model"
            # π_{t+1} = argmin of the loss from π_t's weights (extragradient: on the half
            # step's samples, with distinct seeds)
            tr_folder, gen, ann, tr = self.policy_step(
                it, t, sampler, policy, ":full" if half else ""
            )
            policy = tr_folder / "model"
            self.policies.append(policy)
            inputs = {"train": manifest_hash(tr_folder), "reference": self.ref_id}
            ev = self.evaluation(it / "evaluate", t + 1, inputs, policy)
            if half is not None:  # both steps' queries and pairs count
                ann = {
                    **ann,
                    "oracle_queries": ann["oracle_queries"] + half.annotate["oracle_queries"],
                    "half_step_pairs": half.annotate.get("pairs", 0),
                }
            queries_total += int(ann["oracle_queries"])
            row = _row(cfg, t + 1, ev, ann, queries_total, train=tr, gen=gen)
            row["seconds"] = _timings(it)
            if half is not None:  # the half step's stages first, as they ran
                halves = {f"half_{k}": v for k, v in _timings(it / "half_step").items()}
                row["seconds"] = {**halves, **row["seconds"]}
                row["half_step_pairs"] = ann["half_step_pairs"]
            rows.append(row)
            self.trackers.iteration_done(row, train_steps=int(tr.get("steps") or 0))
            if ctx.dist.is_main:
                write_metrics(run_dir, rows)
                ctx.log(iteration_summary(rows))
        return policy

    def policy_step(self, folder: Path, t: int, sampler: Path, policy: Path, seeds: str) -> Step:
        """Stages 1–4 in ``folder``: samples of ``sampler``, the loss's prior at ``policy``
        (π_t), training from ``policy``'s weights."""
        cfg, ctx, stage, ref = self.cfg, self.ctx, self.stage, self.ref
        policy_id, sampler_id = model_fingerprint(policy), model_fingerprint(sampler)
        # the reference this iteration's loss sees: π_ref, the policy of the last multiple of
        # ref_update_every (comal, mpo) or π_t itself (dno)
        anchor = _anchor(cfg, t, ref, self.policies)
        anchor_id = self.ref_id if anchor == ref else model_fingerprint(anchor)
        prompts = _training_prompts(cfg, self.workload, t)
        gen_seed = stage_seed(cfg, t, "gen" + seeds)
        train_seed = stage_seed(cfg, t, "train" + seeds)
        beta = cfg.mixture_beta()
        mixture = (ref, beta) if beta is not None else None
        # 1. K samples a prompt from π_t (or the sampler of this step)
        gen_folder, gen = stage(
            folder / "generate",
            "generate",
            t,
            generate.settings(cfg, self.workload, t, seeds),
            generate.inputs(cfg, sampler_id, self.ref_id),
            lambda w: generate.work(ctx, sampler, prompts, gen_seed, w, mixture=mixture),
            lambda w: generate.merge(ctx, prompts, w),
        )
        # 2. the oracle's preferences → pairs (the tournament: 3K/2 − 1 queries)
        ann_folder, ann = stage(
            folder / "annotate",
            "annotate",
            t,
            annotate.settings(cfg, self.oracle),
            {"generate": manifest_hash(gen_folder)},
            lambda w: annotate.work(ctx, self.oracle, gen_folder / "samples.jsonl", w),
            lambda w: annotate.merge(ctx, w),
        )
        # 3. log π_ref and log π_t of every pair, once
        pairs = ann_folder / "pairs.jsonl"
        lp_folder, _ = stage(
            folder / "logps",
            "logps",
            t,
            logps.settings(cfg),
            {"annotate": manifest_hash(ann_folder), "reference": anchor_id, "policy": policy_id},
            lambda w: logps.work(ctx, pairs, anchor, policy, w),
            lambda w: logps.merge(ctx, pairs, w),
        )
        # 4. the loss from π_t's weights
        hook = self.trackers.training_hook()
        tr_folder, tr = stage(
            folder / "train",
            "train",
            t,
            train.settings(cfg),
            {"logps": manifest_hash(lp_folder), "policy": policy_id},
            lambda w: train.work(ctx, lp_folder / "data", policy, train_seed, w, hook),
            lambda w: train.merge(ctx, w),
        )
        if stage.skipped:  # its steps were logged by the run that trained it: again
            self.trackers.replay(tr_folder / "model" / "metrics.jsonl")
        return Step(tr_folder, gen, ann, tr)


def _reference(cfg: RunConfig, workload: Any, run_dir: Path, dist: Any, ctx: Any) -> Path:
    """π_ref's folder: ``reference=`` as given, else the workload's (the default one trains
    and caches an SFT model). Rank 0 builds it first; the other ranks then load the cache."""
    import time

    def resolve() -> Path:
        if cfg.reference:
            return resolve_model(cfg.reference, "reference")
        return workload.reference_model(run_dir)

    if dist.is_main:
        plan = None if cfg.reference else workload.reference_plan()
        if plan:
            ctx.log(f"[reference] {plan}")
        t0 = time.time()
        ref = resolve()
        took = time.time() - t0
        built = f"built in {took:.1f}s, cached" if took > 1 else "ready"
        ctx.log(f"[reference] π_ref {built}: {ref}")
    dist.barrier()
    return ref if dist.is_main else resolve()


def _anchor(cfg: RunConfig, iteration: int, ref: Path, policies: list[Path]) -> Path:
    """The reference of iteration ``iteration``'s loss: ``π_ref``; for algorithms with a moving
    reference the policy ``π_k`` with ``k`` the last multiple of ``ref_update_every`` (``π_0``
    is the start; before the first move it is ``π_ref``); for DNO the previous iterate ``π_t``."""
    if cfg.spec.reference == "previous":
        return policies[iteration]
    every = cfg.ref_every
    if not every:
        return ref
    k = (iteration // every) * every
    return ref if k == 0 else policies[k]


def _training_prompts(cfg: RunConfig, workload: Any, iteration: int) -> list[Any]:
    """Iteration ``iteration``'s prompts: the workload's for it, the first ``max_prompts``,
    each ``prompt_repeats`` times."""
    if hasattr(workload, "train_prompts_for"):
        prompts = workload.train_prompts_for(iteration)[: cfg.max_prompts]
    else:
        prompts = workload.train_prompts()[: cfg.max_prompts]
    return [p for p in prompts for _ in range(cfg.prompt_repeats)]


def _timings(folder: Path) -> dict[str, float]:
    """Seconds each stage of an iteration took (from the manifests, which keep the time of
    the run that made them)."""
    import json

    out = {}
    for name in STAGES:
        path = folder / name / "manifest.json"
        if path.is_file():
            out[name] = json.loads(path.read_text()).get("seconds")
    return out


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
