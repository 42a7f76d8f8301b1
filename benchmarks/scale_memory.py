"""Memory per GPU and the time of one INPO iteration at paper scale, computed (not typed).

Writes the tables of ``docs/scale.md`` between its ``<!-- scale-table -->`` markers (and prints
them). Everything is arithmetic on the architectures' configs (parameter counts come from the
shapes below, the ones in the models' ``config.json``) and the INPO paper's training setup; the
assumptions are listed in the output. Run: ``python benchmarks/scale_memory.py``.

Memory accounting (per GPU, training, AdamW, bf16 autocast over fp32 master weights — what
``train.bf16=true`` does):

* full fine-tuning keeps 16 bytes a parameter: fp32 weights (4), fp32 gradients (4), Adam's two
  fp32 moments (8). DDP holds all of it on every GPU; FSDP ``full_shard`` and DeepSpeed ZeRO-3
  divide it by the number of GPUs ``N`` and add the transient all-gather of the largest layers
  (two decoder layers in bf16: the one computing and the one prefetched);
* LoRA keeps the frozen base weights (bf16, 2 bytes; divided by ``N`` when sharded) and 16 bytes
  a trainable adapter parameter;
* activations with activation checkpointing: the bf16 input of every decoder layer plus the
  full activations of one layer being recomputed (``34·s·h`` bytes a sequence of ``s`` tokens,
  fused attention — Korthikanti et al. 2022, Table 2), and the LM head in chunks
  (``inpo.logprobs``: ``chunk_size × V`` fp32 logits, about 3 alive in the backward) instead of
  ``s × V``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale.md"
GIB = 2**30


@dataclass(frozen=True)
class Arch:
    """The shapes of a decoder-only transformer (names as in transformers' configs)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o, k, v (biases ignored: < 0.1%)
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        return attn + mlp + 2 * h  # two RMSNorms

    @property
    def params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_hidden_layers * self.layer_params + embed + head + self.hidden_size

    def lora_params(self, r: int = 16) -> int:
        """LoRA on q, k, v, o (the default ``target_modules``)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        per_layer = r * ((h + h) * 2 + (h + kv) * 2)
        return self.num_hidden_layers * per_layer


ARCHS = [
    Arch("Qwen2-0.5B", 896, 4864, 24, 14, 2, 151936, True),
    Arch("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, False),
    Arch("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, False),
]

#: The INPO paper's setup (§5; the Online-RLHF recipe it follows): 8 GPUs, global batch 128
#: pairs, prompt and completion up to 512 tokens each (1024 a sequence), one pair per GPU per
#: micro-batch (two sequences), activation checkpointing.
GPUS = 8
SEQ = 1024
MICRO_PAIRS = 1
CHUNK = 1024  # inpo.logprobs chunk_size


def activations(a: Arch) -> float:
    seqs = 2 * MICRO_PAIRS
    layer_inputs = a.num_hidden_layers * seqs * SEQ * a.hidden_size * 2
    one_layer = 34 * seqs * SEQ * a.hidden_size
    head = 3 * CHUNK * a.vocab_size * 4
    return layer_inputs + one_layer + head


def memory_rows() -> list[list[str]]:
    rows = []
    for a in ARCHS:
        p = a.params
        act = activations(a)
        gather = 2 * a.layer_params * 2
        lora = a.lora_params()
        cases = {
            "DDP": 16 * p,
            "FSDP full_shard": 16 * p / GPUS + gather,
            "ZeRO-3": 16 * p / GPUS + gather,
            "DDP + LoRA r=16": 2 * p + 16 * lora,
            "FSDP full_shard + LoRA r=16": 2 * p / GPUS + gather + 16 * lora / GPUS,
        }
        for how, states in cases.items():
            total = states + act
            fits = "yes" if total < 80 * GIB else "no"
            rows.append(
                [
                    a.name,
                    f"{p / 1e9:.2f}B",
                    how,
                    f"{states / GIB:.1f}",
                    f"{act / GIB:.1f}",
                    f"{total / GIB:.1f}",
                    fits,
                ]
            )
    return rows


#: Assumed sustained fractions of the bf16 dense peak (H100 SXM: 989 TFLOP/s). Prefill-like
#: passes (scoring, training) are compute-bound; sampling is decode, bound by memory bandwidth.
PEAK = 989e12
MFU = {"generate": 0.10, "annotate": 0.40, "logps": 0.40, "train": 0.35}


def iteration_rows() -> list[list[str]]:
    """One INPO iteration of the paper: 20k prompts, K = 8 samples of up to 512 tokens after a
    512-token prompt, 11 tournament queries a prompt to an 8B pairwise model (prompt + two
    responses), ``log π_ref`` and ``log π_t`` of 20k pairs, one training epoch over them."""
    a = ARCHS[1]
    p = a.params
    prompts, k, queries = 20_000, 8, 11
    flops = {
        "generate": 2 * p * prompts * k * SEQ,
        "annotate": 2 * p * prompts * queries * (SEQ + 512),
        "logps": 2 * (2 * p * prompts * 2 * SEQ),
        "train": 6 * p * prompts * 2 * SEQ,
    }
    rows, total = [], 0.0
    for stage, f in flops.items():
        seconds = f / (GPUS * PEAK * MFU[stage])
        total += seconds
        rows.append([stage, f"{f:.2e}", f"{MFU[stage]:.0%}", f"{seconds / 60:.0f}"])
    rows.append(["one iteration", "", "", f"{total / 60:.0f}"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render() -> str:
    mem = table(
        [
            "policy",
            "parameters",
            "sharding",
            "states GiB",
            "activations GiB",
            "total GiB",
            "fits 80 GB",
        ],
        memory_rows(),
    )
    it = table(["stage", "FLOPs", "assumed MFU", "minutes on 8 × H100"], iteration_rows())
    return (
        f"Computed by `python benchmarks/scale_memory.py` for {GPUS} GPUs, sequences of {SEQ} "
        f"tokens, {MICRO_PAIRS} pair a GPU per micro-batch, AdamW, bf16 autocast over fp32 "
        "master weights, activation checkpointing, the chunked LM head.\n\n"
        f"{mem}\n\n"
        "One iteration of the paper (20k prompts, K = 8, 11 queries a prompt, an 8B policy and "
        "an 8B pairwise preference model), from FLOP counts at *assumed* utilisations — no GPU "
        "was available to measure them (see the GPU check below):\n\n"
        f"{it}\n"
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    text = render()
    print(text)
    if DOC.is_file():
        doc = DOC.read_text()
        new = re.sub(
            r"(<!-- scale-table -->\n).*?(<!-- /scale-table -->)",
            lambda m: m.group(1) + text + m.group(2),
            doc,
            flags=re.S,
        )
        DOC.write_text(new)


if __name__ == "__main__":
    main()
