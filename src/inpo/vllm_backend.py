"""The vLLM generation backend (``generate.backend=vllm``), run in a process of its own.

The contract is the transformers backend's (:mod:`inpo.generation`):

* the prompt ids are :func:`inpo.data.encode_prompt`'s, passed to vLLM as token ids
  (``{"prompt_token_ids": ...}``): vLLM never tokenises a rendered template again, so a
  Llama-3-style template's BOS is not doubled;
* a response ends at the tokenizer's EOS or any ``eos_token_id`` of the model's
  ``generation_config.json`` (:func:`inpo.generation.end_token_ids`, given to vLLM as
  ``stop_token_ids``); vLLM's own defaults from that file (``generation_config="vllm"``) are not
  applied, so only ``temperature``/``top_p``/``max_new_tokens`` shape the samples;
* a sample that stops at ``max_new_tokens`` (``finish_reason == "length"``) is counted as
  truncated;
* each prompt has its own seed (:func:`inpo.generation.sample_seed` of its index), so its
  samples do not depend on how vLLM batches the requests.

The engine runs in a child process (``python -m inpo.vllm_backend JOB``) that exits when the
samples are written, so its memory (the GPU's KV cache above all) is released before the next
stage loads a model in the parent. Under ``torchrun`` every rank starts its own child with the
torchrun variables removed and, on GPUs, ``CUDA_VISIBLE_DEVICES`` set to that rank's
``tensor_parallel_size`` devices: one independent engine per rank, each on its own share of
the prompts (vLLM's ``external_launcher`` would instead share one engine across the torchrun
ranks, which ties every rank to one tensor-parallel group).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inpo.data import encode_prompt
from inpo.errors import ConfigError, InpoError
from inpo.generation import end_token_ids, sample_seed

__all__ = ["LAST_GENERATE_SECONDS", "VLLM_MISSING", "check_vllm", "vllm_generate"]

#: Seconds the last :func:`vllm_generate` spent in ``LLM.generate`` (the engine's start-up
#: excluded), for benchmarks.
LAST_GENERATE_SECONDS: float | None = None

VLLM_MISSING = (
    "generate.backend=vllm needs vLLM: `pip install 'inpo[vllm]'` on a CUDA machine, or the "
    "CPU build (`make vllm-env`); or use generate.backend=transformers"
)

_TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def check_vllm() -> None:
    """Raise :class:`inpo.errors.ConfigError` unless vLLM can be imported (checked with the
    config, before any stage runs)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(VLLM_MISSING)


def vllm_generate(
    model_path: str | Path,
    prompts: Sequence[Any],
    indices: Sequence[int],
    k: int,
    settings: Any,
    *,
    seed: int,
    work_dir: Path,
    tensor_parallel_size: int = 1,
    local_rank: int = 0,
    gpu_memory_utilization: float = 0.85,
) -> tuple[list[list[str]], list[list[bool]], list[list[int]]]:
    """``k`` samples of each prompt from a fresh vLLM engine in a child process.

    Returns ``(samples, truncated, prompt_ids)``: the completions of each prompt, which of
    them stopped at ``max_new_tokens``, and the token ids vLLM conditioned on (as it reports
    them), in the order of ``prompts``.
    """
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=False)
    try:
        gen_cfg = GenerationConfig.from_pretrained(str(model_path))
    except OSError:
        gen_cfg = None
    work_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "model": str(model_path),
        "k": int(k),
        "temperature": float(settings.temperature),
        "top_p": float(settings.top_p),
        "max_tokens": int(settings.max_new_tokens),
        "stop_token_ids": end_token_ids(tok, gen_cfg, settings.stop_token_ids),
        "tensor_parallel_size": int(tensor_parallel_size),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "requests": [
            {"prompt_token_ids": encode_prompt(tok, p), "seed": sample_seed(seed, i) % 2**31}
            for p, i in zip(prompts, indices, strict=True)
        ],
    }
    job_file, out_file = work_dir / "vllm_job.json", work_dir / "vllm_out.jsonl"
    job_file.write_text(json.dumps(job))
    env = {k_: v for k_, v in os.environ.items() if k_ not in _TORCHRUN_VARS}
    # the CPU build takes most of the machine's memory for its KV cache unless told (GiB)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if "CUDA_VISIBLE_DEVICES" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        first = local_rank * tensor_parallel_size
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(d) for d in range(first, first + tensor_parallel_size)
        )
    proc = subprocess.run(
        [sys.executable, "-m", "inpo.vllm_backend", str(job_file), str(out_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise InpoError(
            f"the vLLM engine for '{model_path}' failed (exit {proc.returncode}):\n{tail}"
        )
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    seconds_file = out_file.with_name(out_file.name + ".seconds")
    global LAST_GENERATE_SECONDS
    LAST_GENERATE_SECONDS = json.loads(seconds_file.read_text())["generate"]
    for f in (job_file, out_file, seconds_file):
        f.unlink()
    tokens = [r["prompt_token_ids"] for r in rows]
    samples = [[tok.decode(ids, skip_special_tokens=True) for ids in r["token_ids"]] for r in rows]
    return samples, [[bool(c) for c in r["truncated"]] for r in rows], tokens


def _serve_job(job_file: str, out_file: str) -> int:
    """The child: one engine, every request, the outputs as JSON lines, then exit."""
    import torch
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_file).read_text())
    # The CPU build cannot rewind a seeded request's generator (``CPU Generator does not use
    # offset``), which vLLM does when a prefill is split over steps: on CPU, prefills are whole.
    cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
    llm = LLM(
        **cpu,
        model=job["model"],
        tokenizer=job["model"],
        trust_remote_code=False,
        skip_tokenizer_init=False,
        tensor_parallel_size=job["tensor_parallel_size"],
        gpu_memory_utilization=job["gpu_memory_utilization"],
        generation_config="vllm",  # only the sampling parameters below apply
        seed=0,
    )
    params = [
        SamplingParams(
            n=job["k"],
            temperature=job["temperature"],
            top_p=job["top_p"],
            max_tokens=job["max_tokens"],
            seed=r["seed"],
            stop_token_ids=job["stop_token_ids"],
            ignore_eos=False,
            skip_special_tokens=True,
        )
        for r in job["requests"]
    ]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in job["requests"]]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    Path(out_file + ".seconds").write_text(json.dumps({"generate": seconds}))
    stops = set(job["stop_token_ids"])
    with open(out_file, "w") as fh:
        for out in outputs:
            token_ids = []
            for c in out.outputs:
                ids = list(c.token_ids)
                if ids and ids[-1] in stops:
                    ids = ids[:-1]  # the end token is not part of the answer
                token_ids.append(ids)
            row = {
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": token_ids,
                "truncated": [c.finish_reason == "length" for c in out.outputs],
            }
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover - the child process
    sys.exit(_serve_job(sys.argv[1], sys.argv[2]))
