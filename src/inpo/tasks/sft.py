"""The default task's policy: a word-level tokenizer, a tiny Llama, and its supervised fine-tune.

Prompts are plain text. The task tokenizer (:func:`task_tokenizer`) is ``inpo.tiny``'s word-level
tokenizer with a post-processor that frames a prompt as ``<s> {prompt} <|assistant|>``:
``tokenizer(prompt)`` (what :func:`inpo.data.encode_prompt` calls for a text prompt) ends with the
``<|assistant|>`` marker, so the model knows where the response starts, and a completion is its
words (``add_special_tokens=False``) followed by ``</s>``. The framing is stored in
``tokenizer.json``, so ``AutoTokenizer.from_pretrained`` restores it.

:func:`train_sft` fits the model to responses drawn from a target distribution: for the
reference, a broad ``μ`` (a length ``l ∈ {1..max_len}`` with probabilities ``length_probs``, then
``l`` words uniformly), for every training prompt alike — maximum likelihood on fresh samples,
``−mean log π(y + EOS | x)`` (summed token log-probs) with AdamW. The result is ``π_ref ≈ μ``,
which covers the whole response space.

:func:`cached_build` writes a folder under a temporary name and renames it into place, so a
crashed or concurrent build never leaves a half-written reference behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from inpo.console import progress
from inpo.hashing import folder_sha256
from inpo.logprobs import sequence_logps
from inpo.tiny import word_tokenizer

__all__ = [
    "MANIFEST",
    "cached_build",
    "read_manifest",
    "task_tokenizer",
    "torch_threads",
    "train_sft",
]

MANIFEST = "task_manifest.json"


def task_tokenizer(words: Sequence[str]):
    """A word-level fast tokenizer over ``words`` framing prompts as ``<s> … <|assistant|>``."""
    from tokenizers import processors

    tok = word_tokenizer(words)
    tok.chat_template = None  # the task's prompts are text; no template to apply by mistake
    backend = tok.backend_tokenizer
    specials = [(t, backend.token_to_id(t)) for t in ("<s>", "<|assistant|>")]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A <|assistant|>",
        pair="<s> $A <|assistant|> $B",
        special_tokens=specials,
    )
    return tok


@contextmanager
def torch_threads(n: int | None):
    """Cap torch's intra-op threads at ``n`` inside the block (``None``: leave them)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_sft(
    model: Any,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    response_probs: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    pad_token_id: int,
    num_threads: int | None = 1,
    desc: str = "",
) -> dict[str, float]:
    """Maximum-likelihood fine-tune of ``model`` on ``(x, y)`` with ``x`` uniform over the
    prompts and ``y ~ response_probs[x]``, ``steps`` AdamW steps of ``batch_size`` pairs.

    Args:
        prompt_ids: token ids of each of the ``M`` training prompts.
        completion_ids: token ids (with EOS) of each of the ``N`` enumerable responses.
        response_probs: the target distribution over responses, ``[N]`` (the same for every
            prompt, e.g. the broad ``μ`` of the module docstring) or ``[M, N]`` (per prompt,
            e.g. to distil a tabular policy into the LM).
        desc: a progress display's label (empty: none).
        num_threads: torch intra-op threads during the call (restored afterwards; ``None``
            leaves them). A model this small runs fastest on one thread: on a loaded 2-core
            machine one step took 20 ms on 1 thread and 140–370 ms on 2.

    The loss is ``−mean log π(y + EOS | x)`` (summed token log-probs,
    :func:`inpo.logprobs.sequence_logps`); the learning rate decays linearly to 10% of
    ``learning_rate``. Returns ``{"loss_first", "loss_last", "seconds"}`` (mean NLL of the
    first and last 10 steps; the optimum is the target's entropy).
    """
    import torch

    t0 = time.perf_counter()
    probs = np.asarray(response_probs, dtype=np.float64)
    probs = np.broadcast_to(probs, (len(prompt_ids), len(completion_ids)))
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("response_probs must be non-negative and sum to 1 for every prompt")
    cdf = np.cumsum(probs, axis=1)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(1, steps))
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()

    bar = progress(steps if desc else 0, desc, unit=" steps")
    with torch_threads(num_threads), bar:
        for _ in range(steps):
            xs = rng.integers(len(prompt_ids), size=batch_size)
            u = rng.random(batch_size) * cdf[xs, -1]
            ys = [
                min(int(np.searchsorted(cdf[x], v, side="right")), cdf.shape[1] - 1)
                for x, v in zip(xs, u)
            ]
            seqs = [(prompt_ids[x], completion_ids[y]) for x, y in zip(xs, ys)]
            width = max(len(p) + len(c) for p, c in seqs)
            ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            comp = torch.zeros_like(ids)
            for r, (p, c) in enumerate(seqs):
                ids[r, : len(p) + len(c)] = torch.tensor(p + c)
                attn[r, : len(p) + len(c)] = 1
                comp[r, len(p) : len(p) + len(c)] = 1
            logps = sequence_logps(model, ids.to(device), attn.to(device), comp.to(device))
            loss = -logps.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    model.eval()
    window = max(1, min(10, len(losses)))
    return {
        "loss_first": float(np.mean(losses[:window])) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-window:])) if losses else float("nan"),
        "seconds": time.perf_counter() - t0,
    }


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a cached folder, or ``None`` if absent or unreadable."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _files(folder: Path) -> dict[str, str]:
    return folder_sha256(folder, exclude=MANIFEST)


def cache_problem(folder: Path, key: str) -> str | None:
    """Why the cached ``folder`` cannot be reused for ``key`` (``None``: it can). Its
    manifest, written last, holds every file's SHA-256: a truncated or altered file is found."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "absent" if not folder.exists() else "no readable manifest"
    if manifest.get("key") != key:
        return "built for other settings"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest has no checksums (an older cache)"
    if _files(folder) != files:
        return "a file is missing, truncated or altered (checksum mismatch)"
    return None


def cached_build(
    final: Path, key: str, build: Callable[[Path], dict[str, Any]]
) -> tuple[Path, bool]:
    """Reuse ``final`` if its manifest's ``key`` matches and its files match their checksums,
    else build it atomically (a corrupt cache is rebuilt, with a warning).

    ``build(tmp)`` writes the folder's content into ``tmp`` and returns the manifest (``key``
    and the files' checksums are added, and it is written last). The folder is then renamed to
    ``final``; if another process got there first, its folder is kept and ours discarded.
    Returns ``(final, built)``.
    """
    import logging

    final = Path(final)
    problem = cache_problem(final, key)
    if problem is None:
        return final, False
    if final.exists() and problem != "built for other settings":
        logging.getLogger(__name__).warning(
            "cached %s is not usable (%s): rebuilding", final, problem
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        manifest = {"key": key, **build(tmp)}
        manifest["files"] = _files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if final.exists():  # a stale or corrupt folder: replace it
            if cache_problem(final, key) is None:
                return final, False  # a concurrent build finished first
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if cache_problem(final, key) is not None:
                raise
            return final, False
        return final, True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
