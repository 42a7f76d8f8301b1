"""``inpo export``: a model's answers in the formats AlpacaEval, MT-Bench and Arena-Hard read.

The questions come from the benchmark's own file (nothing is downloaded):

* ``alpaca_eval``: a JSON list (or JSONL) of ``{"instruction": ...}`` (the ``alpaca_eval.json``
  evaluation set) → a JSON list of ``{"instruction", "output", "generator", "dataset"}``
  (AlpacaEval's ``model_outputs.json``).
* ``mt_bench``: FastChat's ``question.jsonl`` (``question_id``, ``category``, ``turns`` — a
  list of strings) → ``model_answer/<name>.jsonl`` lines ``{"question_id", "answer_id",
  "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}``; the second turn is
  answered in the conversation that includes the model's first answer.
* ``arena_hard``: Arena-Hard-Auto's ``question.jsonl`` (``question_id`` or ``uid``; ``turns``
  of ``{"content": ...}`` or a ``prompt``) → the same answer layout with turns of
  ``{"content", "token_len"}``.

Prompts are given in the model's own format (``--prompt-format auto``): the format inpo trained
it on (``inpo.json`` beside a model inpo trained), else the chat template when the tokenizer has
one, else plain text; the prompt becomes token ids as in training
(:func:`inpo.data.encode_prompt`). Decoding is greedy unless ``--temperature`` is set.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from inpo.commands._args import ArgumentParser, non_negative_float, positive_int
from inpo.data import Records, read_text, row_place
from inpo.errors import ConfigError, DataError, InpoError
from inpo.generation import GenerationSettings, sample_responses

FORMATS = ("alpaca_eval", "mt_bench", "arena_hard")


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="inpo export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="a local transformers model folder")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--questions", required=True, type=Path, help="the benchmark's question file")
    p.add_argument("--output", required=True, type=Path, help="the answer file to write")
    p.add_argument(
        "--name",
        default=None,
        help="model name in the output (default: RUN-iter_00t for a run's model, else the "
        "folder's name)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=1024)
    p.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="0 (default): greedy"
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--limit", type=positive_int, default=None, help="answer only the first N questions"
    )
    p.add_argument(
        "--prompt-format",
        choices=("auto", "chat", "text"),
        default="auto",
        help="chat: through the tokenizer's chat template; text: the turns as plain text; auto "
        "(default): the format inpo trained the model on, else chat if the tokenizer has a "
        "template",
    )
    return p


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"questions file '{path}' does not exist")
    text = read_text(path)
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = Records()
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise DataError(f"{path}: line {i + 1}: not valid JSON ({err})") from err
                rows.lines.append(i + 1)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: {row_place(rows, i)}: expected an object")
    return rows


def _turns(row: dict[str, Any], fmt: str, path: Path, at: str) -> list[str]:
    if fmt == "alpaca_eval":
        text = row.get("instruction")
        if not isinstance(text, str) or not text:
            raise DataError(f"{path}: {at}: missing field 'instruction'")
        extra = row.get("input")
        return [f"{text}\n\n{extra}" if isinstance(extra, str) and extra else text]
    turns = row.get("turns")
    if turns is None and isinstance(row.get("prompt"), str):
        turns = [row["prompt"]]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{path}: {at}: missing field 'turns'")
    out = []
    for t in turns:
        content = t.get("content") if isinstance(t, dict) else t
        if not isinstance(content, str):
            raise DataError(f"{path}: {at}: field 'turns' must hold strings or {{content}}")
        out.append(content)
    return out


class _Answerer:
    def __init__(
        self,
        model_dir: Path,
        max_new_tokens: int,
        temperature: float,
        batch_size: int,
        prompt_format: str = "auto",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not model_dir.is_dir():
            raise InpoError(f"--model '{model_dir}' is not a folder")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
        self.tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        has_template = getattr(self.tok, "chat_template", None) is not None
        if prompt_format == "chat" and not has_template:
            raise InpoError(
                f"--prompt-format chat: the tokenizer of '{model_dir}' has no chat template"
            )
        if prompt_format == "auto":
            # deferred: loads numpy, torch, yaml
            from inpo.training.modeling import (
                read_prompt_format,
            )

            prompt_format = read_prompt_format(model_dir) or ("chat" if has_template else "text")
            if prompt_format == "chat" and not has_template:
                raise InpoError(
                    f"'{model_dir}' was trained on conversations but has no chat template"
                )
        self.chat = prompt_format == "chat"
        self.settings = GenerationSettings(temperature, 1.0, max_new_tokens, batch_size)

    def __call__(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        prompts: list[Any] = (
            conversations
            if self.chat
            else ["\n\n".join(m["content"] for m in c) for c in conversations]
        )
        return [
            r[0] for r in sample_responses(self.model, self.tok, prompts, 1, self.settings, seed=0)
        ]


def default_name(model_dir: Path) -> str:
    """``RUN-iter_00t`` for a run's ``RUN/iter_00t/train/model``, else the folder's name."""
    path = Path(model_dir).resolve()
    if (
        path.name == "model"
        and path.parent.name == "train"
        and path.parent.parent.name.startswith("iter_")
    ):
        return f"{path.parent.parent.parent.name}-{path.parent.parent.name}"
    return path.name


def _check_output(output: Path, questions: Path) -> None:
    """The answer file is never the questions file or a folder (checked before any model
    loads)."""
    if output.is_dir():
        raise ConfigError(f"--output '{output}' is a folder; name the answer file to write")
    if output.exists() and questions.exists() and output.resolve() == questions.resolve():
        raise ConfigError(
            f"--output '{output}' is the --questions file; it would be replaced by the answers: "
            "name another file"
        )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check_output(args.output, args.questions)
    every = _read(args.questions)
    rows = every[: args.limit]
    turns = [
        _turns(r, args.format, args.questions, row_place(every, i)) for i, r in enumerate(rows)
    ]
    name = args.name or default_name(args.model)
    answer = _Answerer(
        args.model, args.max_new_tokens, args.temperature, args.batch_size, args.prompt_format
    )
    # Answer turn by turn: turn j of every question at once, in its conversation so far.
    convs: list[list[dict[str, str]]] = [[] for _ in rows]
    answers: list[list[str]] = [[] for _ in rows]
    for j in range(max(len(t) for t in turns)):
        idx = [i for i, t in enumerate(turns) if j < len(t)]
        for i in idx:
            convs[i].append({"role": "user", "content": turns[i][j]})
        outs = answer([convs[i] for i in idx])
        for i, out in zip(idx, outs):
            convs[i].append({"role": "assistant", "content": out})
            answers[i].append(out)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    if args.format == "alpaca_eval":
        data = [
            {
                "instruction": r["instruction"],
                "output": a[0],
                "generator": name,
                "dataset": r.get("dataset", "helpful_base"),
            }
            for r, a in zip(rows, answers)
        ]
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        with open(tmp, "w") as fh:
            for r, a in zip(rows, answers):
                qid = r.get("question_id", r.get("uid"))
                if args.format == "mt_bench":
                    turns_out: list[Any] = a
                else:
                    turns_out = [
                        {
                            "content": t,
                            "token_len": len(answer.tok(t, add_special_tokens=False)["input_ids"]),
                        }
                        for t in a
                    ]
                line = {
                    "question_id": qid,
                    "answer_id": uuid.uuid4().hex[:22],
                    "model_id": name,
                    "choices": [{"index": 0, "turns": turns_out}],
                    "tstamp": time.time(),
                }
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(args.output)
    print(f"wrote {len(rows)} answers ({args.format}) to {args.output}")
    return 0
