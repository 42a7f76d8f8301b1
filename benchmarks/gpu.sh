#!/usr/bin/env bash
# The GPU measurements in one prepared run (~8 minutes on one H200; nothing is downloaded):
#   0. the gpu-marked tests, when pytest is installed (60 s at most);
#   1. benchmarks/train_throughput.py --device cuda: inpo train (padded, share_prompt, packing)
#      vs TRL DPOTrainer (default, precomputed references), tokens/s and MFU, bf16, 0.5B sizes;
#   2. benchmarks/gpu_iteration.py: one whole `inpo run` iteration, then the same with FSDP
#      from a copy of its folder (samples and pairs reused; the table is written after each);
#   3. benchmarks/packing.py --device cuda: packed/flex/shared-prompt layouts and the fp32 check
#      of flex attention's shared-prompt gradients against sdpa's dense mask.
# Each writes its Markdown table to $OUT (default /tmp/inpo-gpu-out) with its log; copy the
# tables into benchmarks/results/. Needs trl and datasets (pip install -e '.[lm,bench]').
# Usage: OUT=/some/dir bash benchmarks/gpu.sh      (or: make bench-gpu)
# Dry run on a CPU (the same steps at tiny sizes, about two minutes; checks the script has not
# rotted while no GPU was lent): DRY=1 OUT=/tmp/inpo-gpu-dry bash benchmarks/gpu.sh  (make gpu-dry)
# On a lent H200 (its image has torch, transformers, accelerate, peft and pytest, not trl or
# datasets): download their wheels for cp312 into .whl/ (ignored by .git/info/exclude: trl,
# datasets, dill, multiprocess), carry .whl, and run
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && OUT=$OUT bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/inpo-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
{ nvidia-smi || true; uptime; python -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"; } >"$OUT/env.txt" 2>&1
rc=0
if [[ "${DRY:-0}" == 1 ]]; then
  # tiny sizes on the CPU: every step, every table, in a minute or two
  TT=(--device cpu --steps 2 --rounds 1 --micro 2 --accum 1)
  GI=(--size tiny --prompts 8 --max-new-tokens 8 --eval-prompts 4 --global-batch 8 --micro 4)
  PK=(--device cpu --rounds 1 --batches 1)
  T1=200 T2=300 T3=120
else
  TT=(--device cuda --steps 4 --rounds 2 --micro 32 --accum 1)
  GI=(--prompts 96 --max-new-tokens 96)
  PK=(--device cuda --rounds 3 --batches 4)
  T1=250 T2=170 T3=80
  # 0. the gpu-marked tests (torch's varlen flash kernel, packing: null on CUDA), if pytest is here
  if python -c "import pytest" 2>/dev/null; then
    timeout 60 python -m pytest -q -m gpu -p no:cacheprovider tests/test_varlen.py tests/test_training.py \
      >"$OUT/pytest_gpu.log" 2>&1 || rc=1
    tail -n 5 "$OUT/pytest_gpu.log"
  fi
fi
timeout $T1 python benchmarks/train_throughput.py "${TT[@]}" \
  --kinds inpo-packed,inpo-shared,trl,trl-precompute --out "$OUT/train_throughput_gpu.md" >"$OUT/train_throughput.log" 2>&1 || rc=1
tail -n 30 "$OUT/train_throughput.log"
timeout $T2 python benchmarks/gpu_iteration.py "${GI[@]}" \
  --out "$OUT/gpu_iteration.md" >"$OUT/gpu_iteration.log" 2>&1 || rc=1
tail -n 20 "$OUT/gpu_iteration.log"
timeout $T3 python benchmarks/packing.py "${PK[@]}" \
  --out "$OUT/packing_gpu.md" >"$OUT/packing_gpu.log" 2>&1 || rc=1
tail -n 25 "$OUT/packing_gpu.log"
exit $rc
