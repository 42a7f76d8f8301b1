#!/usr/bin/env bash
# One whole `inpo run` iteration on a ~0.5B-parameter policy (random weights from a Qwen2-0.5B
# config: nothing is downloaded) with a reward-model oracle, bf16 autocast, on one GPU: once
# without FSDP, once with FSDP full_shard (torchrun, one process). Seconds per stage come from
# the stage manifests; training tokens/s and MFU from the train stage's metrics. Sized to fit
# in ~8 minutes on one H100/H200. Writes benchmarks/results/gpu_iteration.md.
# NOT RUN YET: no GPU was lent to the work that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/inpo-gpu}
mkdir -p "$OUT"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from transformers import Qwen2Config, Qwen2ForCausalLM
from inpo.tiny import word_tokenizer, tiny_reward_model
out = Path(sys.argv[1])
words = "say describe a the red blue green circle square small large bright dark".split()
tok = word_tokenizer(words)
cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=len(tok),
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
Qwen2ForCausalLM(cfg).save_pretrained(out / "policy"); tok.save_pretrained(out / "policy")
rm = tiny_reward_model("llama", tok, hidden_size=256)
rm.save_pretrained(out / "rm"); tok.save_pretrained(out / "rm")
import random
rng = random.Random(0)
with open(out / "prompts.jsonl", "w") as fh:
    for _ in range(256):
        fh.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(8))}) + "\n")
PY
COMMON=(task=prompts "prompts=$OUT/prompts.jsonl" "reference=$OUT/policy"
  annotate.oracle=reward_model "annotate.model=$OUT/rm" annotate.selection=best_worst
  iterations=1 generate.k=8 generate.max_new_tokens=128 generate.batch_size=64
  train.bf16=true train.learning_rate=1e-5 train.global_batch_size=64
  train.per_device_batch_size=8 train.max_prompt_length=64 train.max_completion_length=128
  evaluate.num_prompts=32)
python -m inpo run "run_dir=$OUT/ddp" "${COMMON[@]}"
torchrun --standalone --nproc_per_node 1 -m inpo run "run_dir=$OUT/fsdp" "${COMMON[@]}" train.fsdp=full_shard
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["# One inpo run iteration on one GPU (Qwen2-0.5B shape, random weights)", "",
         "| run | " + " | ".join(["generate", "annotate", "logps", "train", "evaluate"]) + " | train tokens/s |",
         "|---|---|---|---|---|---|---|"]
for run in ("ddp", "fsdp"):
    it = out / run / "iter_000"
    secs = [json.loads((it / s / "manifest.json").read_text())["seconds"] for s in ("generate", "annotate", "logps", "train", "evaluate")]
    rows = [json.loads(l) for l in (it / "train" / "model" / "metrics.jsonl").read_text().splitlines()]
    tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
    lines.append(f"| {run} | " + " | ".join(f"{s:.1f}" for s in secs) + f" | {tps:.0f} |")
Path("benchmarks/results/gpu_iteration.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
