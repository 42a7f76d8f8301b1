"""``inpo precompute``: write reference / previous-iterate log-probs into a preference dataset."""

from __future__ import annotations

import argparse
import logging

from inpo.commands._args import positive_int

DESCRIPTION = """\
Score every (prompt, chosen, rejected) pair of a preference dataset with one causal LM and save a
copy of the dataset with two more columns of summed completion log-probs:
  --columns ref   ->  ref_chosen_logps,  ref_rejected_logps   (the reference policy)
  --columns prev  ->  prev_chosen_logps, prev_rejected_logps  (the previous iterate)
Run `ref` and then `prev` on its output to get all four (what INPO's loss needs).

The output is a `datasets.save_to_disk` folder plus manifest.json (model, dataset hash, counts,
timing), written under a temporary name and renamed. If OUTPUT already holds the same computation
it is left alone. Use the same --max-prompt-length / --max-completion-length as training.
"""

EPILOG = """\
example:
  inpo precompute pairs.jsonl --model runs/sft --output runs/it0/data_ref --columns ref
  inpo precompute runs/it0/data_ref --model runs/it0/policy --output runs/it0/data --columns prev
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inpo precompute",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dataset", help="preference data: .jsonl / .json / .parquet file or save_to_disk folder"
    )
    parser.add_argument("--model", required=True, help="local transformers causal-LM folder")
    parser.add_argument("--output", required=True, help="output folder (save_to_disk)")
    parser.add_argument(
        "--columns", choices=("ref", "prev"), default="ref", help="which columns (default: ref)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--split", default=None, help="split of a DatasetDict folder / JSON dict")
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip malformed rows (counted in manifest)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="pairs per forward (8)")
    parser.add_argument("--max-prompt-length", type=positive_int, default=None, help="keep the end")
    parser.add_argument(
        "--max-completion-length", type=positive_int, default=None, help="keep the start"
    )
    parser.add_argument("--padding-side", choices=("right", "left"), default="right")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=1024, help="LM-head chunk (positions)"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an OUTPUT that holds something else"
    )
    parser.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score each batch as padding-free rows (the same log-probs, no padding computed); "
        "default: the batches of sequences from 64 tokens where that measured faster on the "
        "device (CPU; CUDA) and is exact for the model; --no-packing: never",
    )
    parser.add_argument(
        "--share-prompt",
        action="store_true",
        help="score each pair as one row prompt + chosen + rejected: the prompt computed once "
        "(the same log-probs; sdpa, eager or flex attention, no sliding window)",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from inpo.precompute import precompute_logps  # deferred: loads torch

    result = precompute_logps(
        args.dataset,
        args.model,
        args.output,
        columns=args.columns,
        tokenizer_path=args.tokenizer,
        split=args.split,
        skip_bad_rows=args.skip_bad_rows,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        padding_side=args.padding_side,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        packing=args.packing,
        share_prompt=args.share_prompt,
    )
    m = result.manifest
    if result.skipped:
        print(f"{result.output}: up to date ({', '.join(result.columns)}); nothing to do")
    else:
        print(
            f"{result.output}: wrote {', '.join(result.columns)} for {m['rows']} pairs "
            f"({m['skipped_rows']} rows skipped, {m['truncated_prompts']} prompts and "
            f"{m['truncated_completions']} completions truncated) in {m['seconds_score']:.1f}s"
        )
        longest = (
            f"  longest prompt {m['longest_prompt_tokens']} tokens, "
            f"longest completion {m['longest_completion_tokens']}"
        )
        if m["truncated_prompts"] or m["truncated_completions"]:
            limits = [m["max_prompt_length"], m["max_completion_length"]]
            limits = ["null" if v is None else v for v in limits]
            print(
                f"{longest}: train with the same limits (data.max_prompt_length={limits[0]} "
                f"data.max_completion_length={limits[1]})"
            )
        else:
            print(f"{longest}: training limits at or above these cut nothing, as here")
    return 0
