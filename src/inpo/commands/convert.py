"""``inpo convert GGUF_FILE OUT_DIR``: a GGUF model as a plain Hugging Face folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` and keeps the chat template and
the end-of-turn token; see :mod:`inpo.convert`. Needs the ``gguf`` extra
(``pip install 'inpo[gguf]'``). Nothing is downloaded.
"""

from __future__ import annotations

import os

from inpo.commands._args import ArgumentParser
from inpo.convert import convert_gguf

__all__ = ["main"]


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="inpo convert",
        description="Turn a GGUF file into a Hugging Face model folder (safetensors, tokenizer, "
        "chat template); an existing non-empty folder is never written over.",
    )
    parser.add_argument("gguf_file", help="the .gguf file (dequantised to --dtype)")
    parser.add_argument("out_dir", help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--sha256", help="the file's expected SHA-256; a mismatch stops here")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="the weights' dtype in the folder (default float32)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the loader's per-tensor bar; one line is printed
    record = convert_gguf(args.gguf_file, args.out_dir, sha256=args.sha256, dtype=args.dtype)
    print(
        f"wrote {args.out_dir}: {record['architecture']} ({record['name']}), "
        f"{record['tensors']} tensors, {args.dtype}, end-of-turn ids {record['eos_token_id']}"
    )
    return 0
