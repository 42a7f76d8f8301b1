"""Golden runs: the behaviour a refactor must not change, recorded and compared.

Four runs on the CPU, each from a fixed seed:

- ``default``: ``inpo run`` on the embedded default task (its defaults, 3 iterations);
- ``two_process``: ``torchrun --nproc_per_node 2 -m inpo run`` (1 iteration, 16 prompts x 4);
- ``train_packed_shared``: ``inpo train`` with ``data.packing=true data.share_prompt=true`` on a
  tiny Llama and 32 pairs with reference log-probs;
- ``gpm``: ``inpo train-oracle kind=gpm`` on a tiny Llama and cyclic pairs.

``record OUT`` runs them into ``OUT`` and writes ``OUT/golden.json``: the SHA-256 of every
``samples.jsonl`` and ``pairs.jsonl`` (these must stay byte-identical), every metric row and
every weight file's tensors (these must agree to fp32 tolerance). ``compare A B`` checks two
recordings against each other and exits non-zero naming each difference::

    python benchmarks/golden.py record /tmp/golden-before      # before the change
    python benchmarks/golden.py record /tmp/golden-after       # after it
    python benchmarks/golden.py compare /tmp/golden-before /tmp/golden-after
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

RTOL, ATOL = 1e-4, 1e-6  # fp32 tolerance for weights and metrics (summation order may move)
WORDS = "red blue green circle square say describe a the".split()
_TIME_KEYS = ("seconds", "tokens_per_s", "time", "elapsed", "wall", "_s", "timestamp", "max_rss")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inpo(*args: str, cwd: Path, nproc: int = 1) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "INPO_NO_UPDATE_CHECK": "1"}
    launch = [sys.executable, "-m", "inpo"]
    if nproc > 1:
        launch = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "inpo",
        ]  # fmt: skip
    subprocess.run([*launch, *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def _tiny_pairs(root: Path) -> None:
    from inpo.precompute import precompute_logps
    from inpo.tiny import save_tiny_lm, word_tokenizer

    save_tiny_lm(root / "model", "llama", tokenizer=word_tokenizer(WORDS), hidden_size=32)
    rng = random.Random(0)
    with open(root / "pairs.jsonl", "w") as fh:
        for _ in range(32):
            prompt = " ".join(rng.choice(WORDS) for _ in range(3))
            chosen = rng.choice(WORDS)
            rejected = " ".join(rng.choice(WORDS) for _ in range(2))
            fh.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    precompute_logps(
        root / "pairs.jsonl", root / "model", root / "data", columns="ref",
        max_prompt_length=16, max_completion_length=8,
    )  # fmt: skip


def _gpm_kit(root: Path) -> None:
    from inpo.tiny import pair_words, preference_pairs, save_tiny_lm, word_tokenizer

    save_tiny_lm(root / "lm", "llama", tokenizer=word_tokenizer(pair_words()), hidden_size=32)
    with open(root / "cyclic.jsonl", "w") as fh:
        for row in preference_pairs("cyclic", prompts=["a", "the", "say", "describe"]):
            fh.write(json.dumps(row) + "\n")


def record(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    _inpo("run", "run_dir=default", cwd=out)
    _inpo(
        "run", "run_dir=two_process", "iterations=1", "max_prompts=16", "prompt_repeats=4",
        cwd=out, nproc=2,
    )  # fmt: skip
    kit = out / "kit"
    _tiny_pairs(kit)
    _inpo(
        "train", "model.path=kit/model", "data.train_file=kit/data",
        "data.max_prompt_length=16", "data.max_completion_length=8",
        "data.packing=true", "data.share_prompt=true", "loss.name=dpo", "loss.beta=0.5",
        "optim.learning_rate=1e-2", "optim.global_batch_size=8", "optim.per_device_batch_size=2",
        "optim.warmup_ratio=0", "optim.max_steps=4", "output_dir=train_packed_shared",
        "logging.progress_bar=false", cwd=out,
    )  # fmt: skip
    _gpm_kit(kit)
    _inpo(
        "train-oracle", "kind=gpm", "model.path=kit/lm", "data.train_file=kit/cyclic.jsonl",
        "optim.learning_rate=3e-4", "optim.global_batch_size=16", "optim.max_steps=6",
        "output_dir=gpm", "save_steps=null", "logging.progress_bar=false", cwd=out,
    )  # fmt: skip
    summary = {name: _summarise(out / name) for name in
               ("default", "two_process", "train_packed_shared", "gpm")}  # fmt: skip
    (out / "golden.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"recorded {out / 'golden.json'}")


def _summarise(folder: Path) -> dict:
    """Hashes of the files that must not change at all, metric rows, weight file paths."""
    exact, metrics, weights = {}, {}, []
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.name in ("samples.jsonl", "pairs.jsonl"):
            exact[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.name == "metrics.jsonl":
            metrics[rel] = [_numbers(json.loads(line)) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors" and "checkpoints" not in path.parts:
            weights.append(rel)
    return {"exact": exact, "metrics": metrics, "weights": weights}


def _numbers(row: dict) -> dict:
    return {
        k: v for k, v in row.items()
        if isinstance(v, int | float) and not any(t in k for t in _TIME_KEYS)
    }  # fmt: skip


def compare(a: Path, b: Path) -> int:
    import torch
    from safetensors.torch import load_file

    ga, gb = (json.loads((p / "golden.json").read_text()) for p in (a, b))
    problems = []
    for name, sa in ga.items():
        sb = gb.get(name, {})
        for key in ("exact", "metrics", "weights"):
            if set(sa[key]) != set(sb.get(key, {})):
                problems.append(
                    f"{name}: {key} files differ: {sorted(set(sa[key]) ^ set(sb[key]))}"
                )
        for rel, digest in sa["exact"].items():
            if sb["exact"].get(rel) != digest:
                problems.append(f"{name}/{rel}: bytes differ")
        for rel, rows in sa["metrics"].items():
            other = sb["metrics"].get(rel, [])
            if len(rows) != len(other):
                problems.append(f"{name}/{rel}: {len(rows)} rows then, {len(other)} now")
                continue
            for i, (ra, rb) in enumerate(zip(rows, other, strict=True)):
                for k, v in ra.items():
                    w = rb.get(k)
                    if w is None or abs(v - w) > ATOL + RTOL * abs(v):
                        problems.append(f"{name}/{rel} line {i + 1}: {k} {v!r} then, {w!r} now")
        for rel in sa["weights"]:
            if rel not in sb["weights"]:
                continue
            ta, tb = load_file(a / name / rel), load_file(b / name / rel)
            for k, t in ta.items():
                if k not in tb or not torch.allclose(t.float(), tb[k].float(), RTOL, ATOL):
                    problems.append(f"{name}/{rel}: tensor {k} differs")
    for p in problems:
        print(p)
    runs = len(ga)
    files = sum(len(s["exact"]) + len(s["metrics"]) + len(s["weights"]) for s in ga.values())
    print(f"{'DIFFERENT' if problems else 'same'}: {runs} runs, {files} files compared")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("record").add_argument("out", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out.resolve())
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
