"""Stage 1: ``K`` samples a prompt from ``π_t`` → ``samples.jsonl``.

Prompts are sharded by index (``rank, rank + world, …``); every sample is seeded by its prompt's
index and its own number (:func:`inpo.generation.sample_seed`), so ``samples.jsonl`` is the same
bytes whatever the number of processes, the batch size, or where a run was killed. Each rank
appends finished chunks to ``samples.rankNNN.jsonl``; a restarted run (with any number of
processes) skips every prompt already in one of those files.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inpo.console import progress
from inpo.distributed import shard
from inpo.errors import DataError
from inpo.generation import GenerationSettings, generate_chunks
from inpo.pipeline.faults import fault
from inpo.pipeline.runtime import Ctx, load_model
from inpo.vllm_backend import engine_options, vllm_generate

__all__ = ["inputs", "merge", "settings", "work"]

#: Generate settings that change no sample (how vLLM's engine is kept).
_NOT_HASHED = ("reuse_engine",)
#: Settings added after runs were made, with their defaults: hashed only when set otherwise,
#: so an earlier run's stage keeps its hash (and resumes instead of sampling again).
_HASHED_WHEN_SET = {"enforce_eager": False}


def _generate_hash_part(g: Any) -> dict[str, Any]:
    return {
        k: v
        for k, v in asdict(g).items()
        if k not in _NOT_HASHED and not (k in _HASHED_WHEN_SET and v == _HASHED_WHEN_SET[k])
    }


def settings(cfg: Any, workload: Any, iteration: int, seeds: str) -> dict[str, Any]:
    """What changes this stage's samples (its hash): the sampling settings, the seed, the
    iteration's prompts and how many; Nash-MD's mixture weight and an extragradient step's
    seed tag only when there (other algorithms' hashes stay as they were)."""
    beta = cfg.mixture_beta()
    prompts = (
        workload.describe_iteration(iteration)
        if hasattr(workload, "describe_iteration")
        else workload.describe()
    )
    return {
        "generate": _generate_hash_part(cfg.generate),
        "seed": cfg.seed,
        "prompts": prompts,
        "max_prompts": cfg.max_prompts,
        "prompt_repeats": cfg.prompt_repeats,
        **({"mixture_beta": beta} if beta is not None else {}),
        **({"seeds": seeds} if seeds else {}),
    }


def inputs(cfg: Any, sampler_id: str, ref_id: str) -> dict[str, str]:
    """The models it samples: the sampler (and π_ref for Nash-MD's mixture)."""
    mixed = cfg.mixture_beta() is not None
    return {"policy": sampler_id, **({"mixture": ref_id} if mixed else {})}


def _valid_lines(path: Path) -> list[str]:
    """The complete JSON lines of a file (a line cut by a kill is dropped)."""
    lines = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except ValueError:
            break
        lines.append(line)
    return lines


def work(
    ctx: Ctx,
    policy: Path,
    prompts: list[Any],
    seed: int,
    folder: Path,
    mixture: tuple[Path, float] | None = None,
) -> None:
    """``mixture=(π_ref's folder, β)``: sample from the token-level geometric mixture of the
    policy and that model (Nash-MD), with the transformers backend."""

    g, dist = ctx.cfg.generate, ctx.dist
    own = folder / f"samples.rank{dist.rank:03d}.jsonl"
    if own.exists():  # drop a line a kill cut short, before anyone reads the files
        own.write_text("".join(line + "\n" for line in _valid_lines(own)))
    dist.barrier()
    done = {
        json.loads(line)["index"]
        for f in folder.glob("samples.rank*.jsonl")
        for line in _valid_lines(f)
    }
    dist.barrier()  # everyone has read the files before anyone appends
    todo = [i for i in shard(prompts, dist.rank, dist.world) if i not in done]
    if not todo:
        return
    settings = GenerationSettings(g.temperature, g.top_p, g.max_new_tokens, g.batch_size)
    subset = [prompts[i] for i in todo]
    if g.backend == "vllm":  # its own process: kept for the next stage only on a CPU
        samples, truncated, _ = vllm_generate(
            policy,
            subset,
            todo,
            g.k,
            settings,
            seed=seed,
            work_dir=folder / f"vllm.rank{dist.rank:03d}",
            local_rank=dist.local_rank,
            **engine_options(g),
        )
        with open(own, "a") as fh:
            for i, responses, cut in zip(todo, samples, truncated):
                row = {"index": i, "responses": responses, "truncated": cut}
                fh.write(json.dumps(row) + "\n")
        (folder / f"vllm.rank{dist.rank:03d}").rmdir()
        return
    model, tok = load_model(policy, dist.device)
    mix = None
    if mixture is not None:
        mix_model, _ = load_model(mixture[0], dist.device)
        mix = (mix_model, mixture[1])
    done_before = len(shard(prompts, dist.rank, dist.world)) - len(todo)
    bar = progress(
        done_before + len(todo),
        "generate",
        enabled=dist.is_main,
        initial=done_before,
        unit=" prompts",
    )
    with open(own, "a") as fh:
        for start, samples, truncated in generate_chunks(
            model, tok, subset, g.k, settings, seed=seed, indices=todo, mixture=mix
        ):
            for j, responses in enumerate(samples):
                row = {"index": todo[start + j], "responses": responses, "truncated": truncated[j]}
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            bar.update(len(samples))
            fault("generate", start // g.batch_size + 1)
    bar.close()
    del model


def merge(ctx: Ctx, prompts: list[Any], folder: Path) -> dict[str, Any]:
    """``samples.jsonl``: one row ``{index, prompt, responses, truncated}`` a prompt, in index
    order; ``truncated[j]`` flags a response cut at ``max_new_tokens`` (no end token)."""
    rows: dict[int, dict[str, Any]] = {}
    files = sorted(folder.glob("samples.rank*.jsonl"))
    for f in files:
        for line in _valid_lines(f):
            row = json.loads(line)
            rows.setdefault(row["index"], row)
    missing = [i for i in range(len(prompts)) if i not in rows]
    if missing:
        raise DataError(f"{folder}: generation left prompts {missing[:5]} without samples")
    truncated = 0
    with open(folder / "samples.jsonl", "w") as fh:
        for i, prompt in enumerate(prompts):
            cut = [bool(c) for c in rows[i]["truncated"]]
            truncated += sum(cut)
            row = {
                "index": i,
                "prompt": prompt,
                "responses": rows[i]["responses"],
                "truncated": cut,
            }
            fh.write(json.dumps(row) + "\n")
    for f in files:
        f.unlink()
    k = ctx.cfg.generate.k
    return {"prompts": len(prompts), "samples": len(prompts) * k, "truncated": truncated}
