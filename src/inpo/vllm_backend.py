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

The engine runs in a child process (``python -m inpo.vllm_backend``) that reads jobs from its
standard input, so the parent never imports vLLM. Starting an engine is the backend's dearest
step (vLLM's import, ~6 s on two CPU cores, then the model's load, its compilation and the KV
cache's allocation: ~4 s uncompiled, ~20 s compiled from the cache, ~65 s compiling), and a
run samples in several stages of each iteration (π_ref's evaluation, generate,
evaluate), so with ``keep_engine`` the engine stays up between calls and a call on other weights
of the same architecture loads them into it (vLLM's in-place ``reload_weights``, then its prefix
cache is emptied), as peers that colocate vLLM with training do. That is the memory plan on a
CPU, where the KV cache is a fixed ``VLLM_CPU_KVCACHE_SPACE`` of host memory; on a GPU the
engine holds ``gpu_memory_utilization`` of the device, which the next stage's model needs, so
there it leaves after each call, as without ``keep_engine``. A different architecture, dtype or
engine setting starts a new engine; the parent's exit (or the end of its standard input) ends
it.

Under ``torchrun`` every rank starts its own child with the torchrun variables removed and, on
GPUs, ``CUDA_VISIBLE_DEVICES`` set to that rank's ``tensor_parallel_size`` devices: one
independent engine per rank, each on its own share of the prompts (vLLM's ``external_launcher``
would instead share one engine across the torchrun ranks, which ties every rank to one
tensor-parallel group).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inpo.data import encode_prompt
from inpo.errors import ConfigError, InpoError
from inpo.generation import end_token_ids, sample_seed

__all__ = [
    "ENGINE_EVENTS",
    "LAST_GENERATE_SECONDS",
    "VLLM_MISSING",
    "check_vllm",
    "close_engine",
    "engine_options",
    "start_engine",
    "vllm_generate",
]

log = logging.getLogger(__name__)

#: Seconds the last :func:`vllm_generate` spent in ``LLM.generate`` (the engine's start-up
#: and any weight reload excluded), for benchmarks.
LAST_GENERATE_SECONDS: float | None = None

#: What this process's engines did, in order: ``("start", model, seconds)`` and
#: ``("reload", model, seconds)`` (read by tests and benchmarks).
ENGINE_EVENTS: list[tuple[str, str, float]] = []

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

#: ``config.json`` keys that do not change the engine a model needs (its weights may differ).
_NOT_ARCHITECTURE = ("_name_or_path", "transformers_version")


def check_vllm() -> None:
    """Raise :class:`inpo.errors.ConfigError` unless vLLM can be imported (checked with the
    config, before any stage runs)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(VLLM_MISSING)


class _Engine:
    """One engine process: jobs in on its standard input, one JSON reply line a job out on a
    pipe of its own (vLLM may print to its standard output); its log in a temporary file."""

    def __init__(self, key: str | None, env: dict[str, str]):
        self.key, self.env, self.model = key, env, None
        fd, self.log_path = tempfile.mkstemp(prefix="inpo-vllm-", suffix=".log")
        with os.fdopen(fd, "w") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inpo.vllm_backend"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                text=True,
            )

    def run(self, model: str, job_file: Path, out_file: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"job": str(job_file), "out": str(out_file)}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            tail = "\n".join(Path(self.log_path).read_text().strip().splitlines()[-15:])
            self.close()
            raise InpoError(f"the vLLM engine for '{model}' failed (exit {code}):\n{tail}")
        self.model = model
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None and self.model is None:
            self.proc.kill()  # started ahead and never used (nothing left to sample): no wait
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # the end of its input: it shuts the engine down
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        Path(self.log_path).unlink(missing_ok=True)


_ENGINE: _Engine | None = None


def close_engine() -> None:
    """End this process's kept engine, if any (also done at exit)."""
    global _ENGINE
    if _ENGINE is not None:
        engine, _ENGINE = _ENGINE, None
        engine.close()


atexit.register(close_engine)


#: The engine child's environment, unless the user's sets these. The CPU build takes most of
#: the machine's memory for its KV cache unless told (GiB): 1 GiB holds ~23k tokens of
#: SmolLM2 in float32 (a ``task=panel`` iteration samples ~10k), and an idle engine holding
#: 2 GiB slowed the parent's training by 10–30% on a two-core VM, 1 GiB by 1–2% (measured;
#: the cause is not known: the idle child takes ~1% of a core). The engine core runs in the child
#: itself, not in a process of its own (with ``distributed_executor_backend="uni"`` below, so
#: does its one worker): each extra process imports vLLM again (~6 s on a CPU) and busy-polls
#: the others for work, which costs a two-core machine its sampling speed and its training
#: the CPU the poll takes (measured in ``benchmarks/results/vllm_iteration.md``). vLLM's
#: ahead-of-time compile cache does not load back on this vLLM and torch ("'function' object
#: has no attribute 'finalize_loading'", so each start compiled again, ~65 s); without it
#: the inductor cache serves a later start.
_CHILD_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_AOT_COMPILE": "0",
}


def _weights_dtype(model_path: str) -> str:
    """The dtype the weights were saved in (``config.json``), which the transformers backend
    samples in too; vLLM's ``auto`` would sample a float32 model in bfloat16, another policy
    than the one trained and scored."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def _engine_key(model_path: Path, env: dict[str, str], engine_args: dict[str, Any]) -> str:
    """What an engine is started with, but the weights: the model's architecture and dtype
    (its ``config.json``), the engine's settings and the environment that places it."""
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        config = {"path": str(model_path)}  # not a plain folder: an engine of its own
    for name in _NOT_ARCHITECTURE:
        config.pop(name, None)
    placed = {k: env.get(k) for k in ("CUDA_VISIBLE_DEVICES", "VLLM_CPU_KVCACHE_SPACE")}
    return json.dumps([config, engine_args, placed], sort_keys=True)


def engine_options(generate: Any) -> dict[str, Any]:
    """The :func:`vllm_generate` keywords a run's ``generate`` section sets (one place for
    every stage that samples)."""
    return {
        "tensor_parallel_size": generate.tensor_parallel_size,
        "gpu_memory_utilization": generate.gpu_memory_utilization,
        "enforce_eager": generate.enforce_eager,
        "keep_engine": generate.reuse_engine,
    }


def _keep_on_this_machine() -> bool:
    """The memory plan: an engine may stay between stages on a CPU only (see the module)."""
    import torch

    return not torch.cuda.is_available()


def _child_env(local_rank: int, tensor_parallel_size: int) -> dict[str, str]:
    """The engine child's environment: this one's without torchrun's variables, with
    :data:`_CHILD_ENV`'s defaults and, under torchrun on GPUs, this rank's devices."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update({k: v for k, v in _CHILD_ENV.items() if k not in env})
    if "CUDA_VISIBLE_DEVICES" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        first = local_rank * tensor_parallel_size
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(d) for d in range(first, first + tensor_parallel_size)
        )
    return env


def start_engine(
    *,
    tensor_parallel_size: int = 1,
    local_rank: int = 0,
    keep_engine: bool = False,
    **_: Any,
) -> None:
    """Spawn the engine's child now, before the model it will serve is known: it imports
    vLLM (~6 s on two CPU cores) while this process sets its run up, and the first
    :func:`vllm_generate` builds the engine in it. Only where the engine is kept
    (``keep_engine``, on a CPU) and none is up; takes :func:`engine_options`' keywords."""
    global _ENGINE
    if _ENGINE is None and keep_engine and _keep_on_this_machine():
        _ENGINE = _Engine(None, _child_env(local_rank, int(tensor_parallel_size)))


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
    enforce_eager: bool = False,
    keep_engine: bool = False,
) -> tuple[list[list[str]], list[list[bool]], list[list[int]]]:
    """``k`` samples of each prompt from a vLLM engine in a child process.

    Returns ``(samples, truncated, prompt_ids)``: the completions of each prompt, which of
    them stopped at ``max_new_tokens``, and the token ids vLLM conditioned on (as it reports
    them), in the order of ``prompts``. ``keep_engine``: leave the engine up for the next call
    (on a CPU; see the module), which loads its model's weights into it. ``enforce_eager``:
    vLLM's own (no ``torch.compile``: a faster start, slower sampling).
    """
    global _ENGINE, LAST_GENERATE_SECONDS
    from transformers import AutoTokenizer, GenerationConfig

    model_path = Path(model_path)
    tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=False)
    try:
        gen_cfg = GenerationConfig.from_pretrained(str(model_path))
    except OSError:
        gen_cfg = None
    work_dir.mkdir(parents=True, exist_ok=True)
    engine_args = {
        "tensor_parallel_size": int(tensor_parallel_size),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "enforce_eager": bool(enforce_eager),
    }
    job = {
        "model": str(model_path),
        "engine": engine_args,
        "k": int(k),
        "temperature": float(settings.temperature),
        "top_p": float(settings.top_p),
        "max_tokens": int(settings.max_new_tokens),
        "stop_token_ids": end_token_ids(tok, gen_cfg, settings.stop_token_ids),
        "requests": [
            {"prompt_token_ids": encode_prompt(tok, p), "seed": sample_seed(seed, i) % 2**31}
            for p, i in zip(prompts, indices, strict=True)
        ],
    }
    job_file, out_file = work_dir / "vllm_job.json", work_dir / "vllm_out.jsonl"
    job_file.write_text(json.dumps(job))
    env = _child_env(local_rank, tensor_parallel_size)
    key = _engine_key(model_path, env, engine_args)
    if _ENGINE is not None and _ENGINE.key is None and _ENGINE.env == env:
        _ENGINE.key = key  # the child start_engine spawned: its first model is this one
    if _ENGINE is not None and (_ENGINE.key != key or _ENGINE.proc.poll() is not None):
        close_engine()
    if _ENGINE is None:
        _ENGINE = _Engine(key, env)
    try:
        reply = _ENGINE.run(str(model_path), job_file, out_file)
    finally:
        if not (keep_engine and _keep_on_this_machine()):
            close_engine()
    for event in ("start", "reload"):
        if event in reply:
            ENGINE_EVENTS.append((event, str(model_path), reply[event]))
            what = "started" if event == "start" else "loaded the weights"
            log.info("vLLM engine %s for %s in %.1fs", what, model_path, reply[event])
    LAST_GENERATE_SECONDS = reply["generate"]
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    for f in (job_file, out_file):
        f.unlink()
    tokens = [r["prompt_token_ids"] for r in rows]
    samples = [[tok.decode(ids, skip_special_tokens=True) for ids in r["token_ids"]] for r in rows]
    return samples, [[bool(c) for c in r["truncated"]] for r in rows], tokens


def _start(job: dict[str, Any]) -> Any:
    import torch
    from vllm import LLM

    # The CPU build cannot rewind a seeded request's generator (``CPU Generator does not use
    # offset``), which vLLM does when a prefill is split over steps: on CPU, prefills are whole.
    cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
    tp = job["engine"]["tensor_parallel_size"]
    return LLM(
        **cpu,
        **({"distributed_executor_backend": "uni"} if tp == 1 else {}),
        model=job["model"],
        dtype=_weights_dtype(job["model"]),
        tokenizer=job["model"],
        trust_remote_code=False,
        skip_tokenizer_init=False,
        tensor_parallel_size=tp,
        gpu_memory_utilization=job["engine"]["gpu_memory_utilization"],
        enforce_eager=job["engine"]["enforce_eager"],
        generation_config="vllm",  # only the sampling parameters below apply
        seed=0,
    )


def _sample(llm: Any, job: dict[str, Any], out_file: str) -> float:
    """Every request of ``job``, the outputs as JSON lines; the seconds it took."""
    from vllm import SamplingParams

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
    return seconds


def _serve() -> int:
    """The child: one engine, started by the first job and kept for the next ones (each may
    name other weights of the same architecture: loaded in place); exits at the end of its
    input. Replies go to the standard output it was given, which vLLM's prints do not reach."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import LLM  # noqa: F401  (before the first job: start_engine spawns it early)

    llm, loaded = None, None
    for line in sys.stdin:
        paths = json.loads(line)
        job = json.loads(Path(paths["job"]).read_text())
        reply: dict[str, float] = {}
        t0 = time.perf_counter()
        if llm is None:
            llm = _start(job)
            reply["start"] = time.perf_counter() - t0
        elif job["model"] != loaded:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": job["model"]})
            llm.reset_prefix_cache()  # its cached prompts were computed with the old weights
            reply["reload"] = time.perf_counter() - t0
        loaded = job["model"]
        reply["generate"] = _sample(llm, job, paths["out"])
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover - the child process
    sys.exit(_serve())
