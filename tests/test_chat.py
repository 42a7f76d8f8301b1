"""Chat models end to end: one prompt-to-ids path for every stage, one BOS, the model's end tokens.

Tokenizers are built in code (:func:`inpo.tiny.chat_tokenizer`): a Llama-3-style one whose
template writes ``{{ bos_token }}`` and whose tokenizer adds a BOS to any text (so tokenising a
rendered template again would give two), turns ending in ``<|eot_id|>`` that only
``generation_config.json`` names as an end token; and a ChatML (Qwen2) one without a BOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inpo.data import PreferenceCollator, as_completion, encode_prompt
from inpo.generation import GenerationSettings, generate_chunks
from inpo.tiny import always_say, char_tokenizer, chat_tokenizer, save_tiny_chat_lm, save_tiny_lm

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
]


def _model(kind: str, path: Path) -> Path:
    if kind == "text":
        return save_tiny_lm(path, "llama", tokenizer=char_tokenizer(add_bos=True), hidden_size=32)
    return save_tiny_chat_lm(path, kind, hidden_size=32)


def _prompt(kind: str):
    return "Name a colour." if kind == "text" else CONVERSATION


@pytest.mark.parametrize("kind", ["text", "llama3", "chatml"])
def test_generation_training_and_precompute_condition_on_the_same_ids(kind, tmp_path):
    """The ids ``generate`` receives for a prompt are the ids the collator (training and the
    logps stage) puts before the completion; a BOS appears once (none for ChatML)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model(kind, tmp_path / kind)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompt = _prompt(kind)
    seen = []
    real = model.generate
    model.generate = lambda **kw: seen.append(kw) or real(**kw)  # recorded, not replaced
    settings = GenerationSettings(max_new_tokens=3, batch_size=2)
    list(generate_chunks(model, tok, [prompt, prompt], 2, settings, seed=0))
    ids, mask = seen[0]["input_ids"], seen[0]["attention_mask"]
    generated = ids[0][mask[0].bool()].tolist()  # left padding removed
    batch = PreferenceCollator(tok)(
        [{"prompt": prompt, "chosen": as_completion(prompt, "x"), "rejected": "y"}]
        if kind == "text"
        else [
            {
                "prompt": prompt,
                "chosen": as_completion(prompt, "x"),
                "rejected": [{"role": "assistant", "content": "y"}],
            }
        ]
    )
    row = batch["input_ids"][0]
    prompt_part = row[(batch["attention_mask"][0] == 1) & (batch["completion_mask"][0] == 0)]
    assert generated == prompt_part.tolist() == encode_prompt(tok, prompt)
    bos = tok.bos_token_id
    expected = 0 if kind == "chatml" else 1
    assert generated.count(bos) == expected if bos is not None else True
    assert (row == (bos if bos is not None else -1)).sum().item() == expected
    if kind != "text":  # a prompt templated by hand keeps the template's one BOS
        rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert encode_prompt(tok, rendered) == generated
    # the completion is the assistant turn with its end-of-turn token, as TRL writes it
    completion = row[batch["completion_mask"][0] == 1].tolist()
    end = {"text": tok.eos_token, "llama3": "<|eot_id|>", "chatml": "<|im_end|>\n"}[kind]
    assert tok.decode(completion) == "x" + end


def test_generation_stops_at_the_end_tokens_of_generation_config(tmp_path):
    """``<|eot_id|>`` is not the tokenizer's EOS; the model's ``generation_config.json`` lists it,
    and a sample ends there (empty, not truncated). Without it listed, the same model runs to
    ``max_new_tokens``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = save_tiny_chat_lm(tmp_path / "m", "llama3", hidden_size=32)
    always_say(path, "<|eot_id|>")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|end_of_text|>"
    settings = GenerationSettings(max_new_tokens=5, batch_size=4)
    [(_, samples, truncated)] = list(
        generate_chunks(model, tok, [CONVERSATION], 3, settings, seed=0)
    )
    assert samples == [["", "", ""]] and truncated == [[False] * 3]
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)  # eot not listed
    [(_, samples, truncated)] = list(
        generate_chunks(model, tok, [CONVERSATION], 3, settings, seed=0)
    )
    assert truncated == [[True] * 3]  # the end-of-turn token is not an end: every sample runs on


def test_bad_conversations_are_named_before_any_model_loads(tmp_path):
    from inpo.errors import DataError
    from inpo.pipeline.workloads import load_prompts

    cases = [
        ([{"role": "assistant", "content": "hi"}], "prompt[0].role", "expected a 'user' turn"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "prompt[1].role",
            "alternate",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": " "},
                {"role": "user", "content": "b"},
            ],
            "prompt[1].content",
            "empty assistant turn",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "prompt[1].role",
            "must end with a user turn",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "prompt[1].role",
            "system turn must come first",
        ),
        ([{"role": "robot", "content": "a"}], "prompt[0].role", "unknown role"),
    ]
    for i, (prompt, field, needle) in enumerate(cases):
        path = tmp_path / f"p{i}.jsonl"
        path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": prompt}))
        with pytest.raises(DataError) as err:
            load_prompts(path)
        assert f"{path}: line 2: field '{field}'" in str(err.value) and needle in str(err.value)


def _run_args(tmp_path: Path, model: Path, files: list[Path], ev: Path) -> list[str]:
    return [
        f"run_dir={tmp_path / 'run'}",
        "task=prompts",
        f"prompts={','.join(str(f) for f in files)}",
        f"eval_prompts={ev}",
        f"reference={model}",
        "iterations=3",
        "eta=0.5",
        "generate.k=4",
        "generate.max_new_tokens=6",
        "generate.batch_size=4",
        "train.optim.learning_rate=1e-3",
        "train.optim.global_batch_size=4",
        "train.optim.per_device_batch_size=2",
        "train.data.max_prompt_length=256",
        "train.data.max_completion_length=16",
        "evaluate.num_prompts=2",
        "evaluate.k=2",
        # an oracle is named (the workloads below are built, not run; later keys win)
        "annotate.oracle=http",
        "annotate.url=http://127.0.0.1:9",
        "annotate.judge_model=judge",
    ]


def test_no_chat_template_and_too_long_prompts_fail_before_any_model_loads(tmp_path):
    from inpo.config import load_config
    from inpo.errors import DataError
    from inpo.pipeline.config import RunConfig
    from inpo.pipeline.workloads import PromptFileWorkload

    tok = char_tokenizer(add_bos=True)
    tok.chat_template = None
    plain = save_tiny_lm(tmp_path / "plain", "llama", tokenizer=tok, hidden_size=32,
                         max_position_embeddings=64)  # fmt: skip
    files = tmp_path / "p.jsonl"
    rows = [{"prompt": "short"}, {"prompt": [{"role": "user", "content": "hi"}]}]
    files.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = tmp_path / "e.jsonl"
    ev.write_text(json.dumps({"prompt": "held out"}) + "\n")
    cfg = load_config(RunConfig, None, _run_args(tmp_path, plain, [files], ev))
    with pytest.raises(DataError, match=r"p.jsonl: line 2: field 'prompt': a conversation, but "):
        PromptFileWorkload(cfg)
    rows[1] = {"prompt": "x" * 80}
    files.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 2: field 'prompt': 81 tokens, longer than the "):
        PromptFileWorkload(cfg)
    cfg.skip_bad_rows = True
    work = PromptFileWorkload(cfg)
    assert work.train_prompts_for(0) == ["short"] and work.skipped == 1
    assert "1 bad prompts skipped" in work.data_plan()


def _save_oracle(kind: str, path: Path) -> Path:
    """A tiny reward model (Llama-3-style template) or pairwise model (ChatML template)."""
    from inpo.tiny import tiny_causal_lm, tiny_reward_model

    if kind == "reward_model":
        tok = chat_tokenizer("llama3")
        model = tiny_reward_model("llama", tok, seed=3, hidden_size=32)
        with torch.no_grad():
            model.score.weight.mul_(40.0)
    else:
        tok = chat_tokenizer("chatml")
        model = tiny_causal_lm("llama", tok, seed=4, hidden_size=32)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("oracle", ["reward_model", "pairwise"])
def test_the_papers_shape_on_a_tiny_chat_model(oracle, tmp_path):
    """``task=prompts`` with conversational prompts, a chat template and a model oracle: three
    iterations, each on its own prompt file, held-out evaluation prompts, then ``inpo export`` in
    AlpacaEval format. Every sequence any stage feeds the policy, the reference or the reward
    model (all three with the Llama-3-style tokenizer) holds exactly one BOS; the logps stage's
    columns are the reference's log-probs of the TRL completion (content + ``<|eot_id|>``)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inpo.commands.export import main as export
    from inpo.config import load_config
    from inpo.layout import completion_logps
    from inpo.pipeline.config import RunConfig
    from inpo.pipeline.run import run_pipeline

    policy = save_tiny_chat_lm(tmp_path / "policy", "llama3", hidden_size=32)
    files = []
    for t in range(3):
        f = tmp_path / f"iter{t}.jsonl"
        rows = [{"prompt": [{"role": "user", "content": f"Say {w} {t}."}]} for w in "abcd"]
        rows.append({"prompt": CONVERSATION})
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(f)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n"
                          for q in ("Hi?", "Bye?")))  # fmt: skip
    args = _run_args(tmp_path, policy, files, ev)
    args += [f"annotate.oracle={oracle}", f"annotate.model={_save_oracle(oracle, tmp_path / 'o')}"]
    # the BOS count below reads one sequence a row: no packed rows (tested on their own)
    args += ["train.data.packing=false"]
    cfg = load_config(RunConfig, None, args)
    bos = chat_tokenizer("llama3").bos_token_id
    vocab = len(chat_tokenizer("llama3"))
    rows_seen = {"rows": 0, "bad": []}

    def count_bos(module, inputs):
        ids = inputs[0]
        if module.num_embeddings != vocab or ids.dim() != 2 or ids.shape[1] < 2:
            return  # another tokenizer's model, or a decoding step
        for row in ids.tolist():
            rows_seen["rows"] += 1
            if row.count(bos) != 1:
                rows_seen["bad"].append(row)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, i: count_bos(m, i) if isinstance(m, torch.nn.Embedding) else None
    )
    try:
        run = run_pipeline(cfg, log=lambda m: None)
        out = tmp_path / "alpaca" / "model_outputs.json"
        q = tmp_path / "alpaca_eval.json"
        q.write_text(json.dumps([{"instruction": "Name a colour."}, {"instruction": "Count."}]))
        model = run / "iter_002" / "train" / "model"
        assert export(["--model", str(model), "--format", "alpaca_eval", "--questions", str(q),
                       "--output", str(out), "--max-new-tokens", "4"]) == 0  # fmt: skip
    finally:
        hook.remove()
    assert rows_seen["rows"] > 50 and not rows_seen["bad"], rows_seen["bad"][:2]

    # each iteration sampled its own file's prompts, never the held-out ones
    for t in range(3):
        samples = (run / f"iter_{t:03d}" / "generate" / "samples.jsonl").read_text()
        assert f"Say a {t}." in samples and "Hi?" not in samples
        assert f"Say a {(t + 1) % 3}." not in samples
    # the pairs are TRL's conversational format; the logps columns are π_ref's log-probs
    pairs = [
        json.loads(x) for x in (run / "iter_000/annotate/pairs.jsonl").read_text().splitlines()
    ]
    assert pairs and all(p["chosen"][0]["role"] == "assistant" for p in pairs)
    data = load_from_disk(str(run / "iter_000" / "logps" / "data"))
    assert {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"} <= set(
        data.column_names
    )
    ref = AutoModelForCausalLM.from_pretrained(policy)
    tok = AutoTokenizer.from_pretrained(policy)
    ended = [not cut for cut in data["chosen_truncated"]]
    expected = completion_logps(ref, tok, data["prompt"], data["chosen"], ended=ended)
    torch.testing.assert_close(torch.tensor(data["ref_chosen_logps"]), expected, atol=1e-4, rtol=0)
    # by hand: the prompt's template render, then the content and <|eot_id|> (if it was sampled)
    row = data[0]
    ids = encode_prompt(tok, row["prompt"])
    end = "" if row["chosen_truncated"] else "<|eot_id|>"
    completion = tok(row["chosen"][0]["content"] + end, add_special_tokens=False)
    full = torch.tensor([ids + completion["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(ref(input_ids=full).logits[0, :-1].double(), -1)
    targets = full[0, 1:]
    by_hand = logp[torch.arange(len(targets)), targets][len(ids) - 1 :].sum()
    assert abs(float(by_hand) - row["ref_chosen_logps"]) < 1e-4
    # every iteration evaluated on the held-out prompts; exported answers named after the run
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(m["eval_prompts"] == 2 for m in metrics)
    answers = json.loads(out.read_text())
    assert [a["generator"] for a in answers] == ["run-iter_002"] * 2
    assert json.loads((model / "inpo.json").read_text()) == {"prompt_format": "chat"}


def test_without_eval_prompts_the_first_files_last_prompts_are_held_out(tmp_path):
    """The public command has no eval_prompts: the last evaluate.num_prompts prompts of the
    first file (at most half of it) are held out of every iteration's training; given
    eval_prompts that overlap the training prompts are an error."""
    from inpo.config import load_config
    from inpo.errors import ConfigError
    from inpo.pipeline.config import RunConfig
    from inpo.pipeline.workloads import PromptFileWorkload

    model = save_tiny_chat_lm(tmp_path / "m", "chatml", hidden_size=32)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    conv = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    a.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in conv[:4]))
    b.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in conv[2:]))
    judge = ["annotate.oracle=http", "annotate.url=http://127.0.0.1:9", "annotate.judge_model=j"]
    cfg = load_config(
        RunConfig, None, ["task=prompts", f"prompts={a},{b}", f"reference={model}", *judge]
    )
    work = PromptFileWorkload(cfg)  # evaluate.num_prompts=64, capped at half of a's 4
    assert work.eval_prompts() == conv[2:4]
    assert work.train_prompts_for(0) == conv[:2]  # a, without the held-out two
    assert work.train_prompts_for(1) == conv[4:]  # b, likewise
    assert work.train_prompts_for(2) == conv[:2]  # cycling
    assert "held out for evaluation" in work.data_plan()
    cfg = load_config(
        RunConfig,
        None,
        ["task=prompts", f"prompts={a}", f"eval_prompts={b}", f"reference={model}", *judge],
    )
    with pytest.raises(ConfigError, match="shares 2 prompt"):
        PromptFileWorkload(cfg)
    cfg = load_config(RunConfig, None, ["task=prompts", f"prompts={a}", f"reference={model}"])
    assert cfg.annotate.oracle == "task"  # the default
    with pytest.raises(ConfigError, match="task=prompts has no oracle of its own"):
        PromptFileWorkload(cfg)


def test_a_prompt_of_no_tokens_is_a_named_bad_row(tmp_path):
    """A prompt the tokenizer makes nothing of is refused before any model loads, naming the
    row (generation would otherwise fail deep inside ``generate`` on an empty attention mask:
    seen with a word tokenizer saved beside a Qwen2 config, which transformers swapped for
    Qwen2's). Here a tokenizer whose normaliser deletes digits, and a prompt of digits."""
    from tokenizers import Regex, normalizers

    from inpo.config import load_config
    from inpo.errors import DataError
    from inpo.pipeline.config import RunConfig
    from inpo.pipeline.workloads import PromptFileWorkload
    from inpo.tiny import word_tokenizer

    tok = word_tokenizer(["red", "blue"])
    tok.backend_tokenizer.normalizer = normalizers.Replace(Regex("[0-9]"), "")
    policy = save_tiny_lm(tmp_path / "words", "llama", tokenizer=tok, hidden_size=32)
    files = tmp_path / "p.jsonl"
    rows = [{"prompt": "red blue"}, {"prompt": "2026"}, {"prompt": "blue"}]
    files.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = tmp_path / "e.jsonl"
    ev.write_text(json.dumps({"prompt": "red"}) + "\n")
    cfg = load_config(RunConfig, None, _run_args(tmp_path, policy, [files], ev))
    with pytest.raises(DataError, match=r"p.jsonl: line 2: field 'prompt': no tokens: the "):
        PromptFileWorkload(cfg)
    cfg.skip_bad_rows = True
    work = PromptFileWorkload(cfg)
    assert work.train_prompts_for(0) == ["red blue", "blue"] and work.skipped == 1
