"""A GGUF file turned into a plain Hugging Face model folder (``inpo convert``).

Many people hold their models as GGUF files (llama.cpp's format). transformers reads them
through its own GGUF loader (the ``gguf`` package), dequantising every tensor to fp32, but it
refuses ``save_pretrained`` on the model it loaded. So the conversion is:

1. check the file: the GGUF magic, a SHA-256 when one is given, the header readable with every
   tensor's bytes present (a truncated download fails here), an architecture transformers'
   loader knows;
2. load the tokenizer and the model through transformers' loader (``gguf_file=``);
3. build the same architecture from its config (without the quantisation record) and load the
   dequantised state dict into it;
4. write the folder — safetensors weights, the tokenizer with its chat template, and a
   ``generation_config.json`` whose ``eos_token_id`` holds the end-of-turn token — into a
   temporary folder beside the target, renamed into place only when complete, with
   ``convert.json`` recording the source file, its SHA-256 and the versions used.

The result loads with plain ``AutoModelForCausalLM.from_pretrained(folder)``. Nothing is
downloaded, and an existing non-empty folder is never written over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from inpo.errors import ConfigError, DataError
from inpo.generation import end_token_ids
from inpo.hashing import file_sha256

__all__ = ["GGUF_MAGIC", "check_gguf", "convert_gguf"]

GGUF_MAGIC = b"GGUF"


def _reader(path: Path):
    try:
        import gguf  # heavy optional dependency: only the convert command needs it
    except ImportError:
        raise ConfigError(
            "reading a GGUF file needs the 'gguf' package: pip install 'inpo[gguf]'"
        ) from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/struct.error on bad bytes
        raise DataError(
            f"{path}: not a readable GGUF file (truncated or corrupt? {type(err).__name__}: "
            f"{str(err)[:120]})"
        ) from None


def check_gguf(path: str | Path, sha256: str | None = None) -> dict:
    """Check ``path`` is a whole GGUF file of an architecture transformers can load.

    Returns ``{"architecture", "name", "tensors", "bytes"}``. Raises :class:`DataError` (one
    line, naming the file) for a missing, foreign, truncated or mismatching file and
    :class:`ConfigError` for an architecture transformers' GGUF loader does not know.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise DataError(f"{path}: not a GGUF file (it starts {magic!r}, not {GGUF_MAGIC!r})")
    if sha256 is not None:
        want = sha256.strip().lower()
        got = file_sha256(path)
        if got != want:
            raise DataError(f"{path}: SHA-256 mismatch: expected {want}, the file has {got}")
    reader = _reader(path)
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise DataError(f"{path}: truncated: its tensors need {end:,} bytes, the file has {size:,}")
    field = reader.fields.get("general.architecture")
    if field is None:
        raise DataError(f"{path}: no 'general.architecture' in its header")
    arch = str(field.contents())
    name_field = reader.fields.get("general.name")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path}: architecture '{arch}' is not one transformers' GGUF loader supports "
            f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return {
        "architecture": arch,
        "name": str(name_field.contents()) if name_field is not None else None,
        "tensors": len(reader.tensors),
        "bytes": size,
    }


def _target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"'{out_dir}' exists and is not a folder; name a new folder to write")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(
            f"'{out_dir}' exists and is not empty; name a new folder (nothing was written)"
        )


def convert_gguf(
    gguf_file: str | Path, out_dir: str | Path, *, sha256: str | None = None, dtype: str = "float32"
) -> dict:
    """Convert ``gguf_file`` into the Hugging Face folder ``out_dir`` (see the module doc).

    Returns the record written to ``out_dir/convert.json``.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got '{dtype}'")
    _target(out_dir)
    info = check_gguf(gguf_file, sha256)
    folder, name = str(gguf_file.parent), gguf_file.name
    transformers.utils.logging.disable_progress_bar()  # one line is printed at the end instead
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = (
        {k for k in missing if k.endswith("lm_head.weight")}
        if config.tie_word_embeddings
        else set()
    )
    if set(missing) - tied or unexpected:
        raise DataError(
            f"{gguf_file}: the dequantised weights do not fit {type(model).__name__} "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    generation = loaded.generation_config
    eos = end_token_ids(tokenizer, generation)  # the tokenizer's EOS (<|im_end|>) among them
    generation.eos_token_id = eos if len(eos) > 1 else eos[0]
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    del loaded
    record = {
        "source": str(gguf_file),
        "sha256": file_sha256(gguf_file) if sha256 is None else sha256.strip().lower(),
        **info,
        "dtype": dtype,
        "eos_token_id": eos,
        "chat_template": tokenizer.chat_template is not None,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the folder is an ordinary one
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "convert.json").write_text(json.dumps(record, indent=2) + "\n")
        if out_dir.is_dir():  # empty, checked above
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
