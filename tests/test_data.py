"""Loading, validation, tokenisation and collation of preference data (inpo.data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inpo.data import PreferenceCollator, encode_pair, load_preference_dataset, tokenize_pair
from inpo.errors import DataError
from inpo.tiny import char_tokenizer, word_tokenizer

ROWS = [
    {"prompt": "Say hi.", "chosen": " hi", "rejected": " bye", "tie": False},
    {"prompt": "2+2?", "chosen": " 4", "rejected": " 5", "tie": True},
    {"prompt": "Name a colour.", "chosen": " red", "rejected": " dog", "tie": False},
]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Loading: every file format, every TRL layout
# ---------------------------------------------------------------------------------------------


def _expected(ds) -> None:
    assert ds["prompt"] == [r["prompt"] for r in ROWS]
    assert ds["chosen"] == [r["chosen"] for r in ROWS]
    assert ds["tie"] == [False, True, False]
    assert ds["row_id"] == [0, 1, 2]


def test_jsonl_json_parquet_and_disk_all_load(tmp_path):
    import datasets

    _expected(load_preference_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    _expected(load_preference_dataset(tmp_path / "list.json"))
    columns = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    (tmp_path / "cols.json").write_text(json.dumps(columns))
    _expected(load_preference_dataset(tmp_path / "cols.json"))
    (tmp_path / "splits.json").write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    assert len(load_preference_dataset(tmp_path / "splits.json", split="test")) == 1
    _expected(load_preference_dataset(tmp_path / "splits.json"))  # "train" by default
    (tmp_path / "two.json").write_text(json.dumps({"a": ROWS, "b": ROWS}))
    with pytest.raises(DataError, match="several splits"):
        load_preference_dataset(tmp_path / "two.json")
    raw = datasets.Dataset.from_list(ROWS)
    raw.to_parquet(str(tmp_path / "d.parquet"))
    _expected(load_preference_dataset(tmp_path / "d.parquet"))
    raw.save_to_disk(str(tmp_path / "disk"))
    _expected(load_preference_dataset(tmp_path / "disk"))
    datasets.DatasetDict({"train": raw, "test": raw.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    _expected(load_preference_dataset(tmp_path / "dict"))
    assert len(load_preference_dataset(tmp_path / "dict", split="test")) == 1
    with pytest.raises(DataError, match="split 'nope' not found"):
        load_preference_dataset(tmp_path / "dict", split="nope")


def test_bad_paths_and_file_types(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_preference_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_preference_dataset(tmp_path / "d.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_preference_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_preference_dataset(tmp_path / "empty_dir")


def test_optional_columns_kept_and_unknown_dropped(tmp_path):
    rows = [
        {
            **r,
            "chosen_winrate": 0.75,
            "rejected_winrate": 0.25,
            "ref_chosen_logps": -3.5,
            "ref_rejected_logps": -4,
            "prev_chosen_logps": -3.0,
            "prev_rejected_logps": -4.5,
            "source": "whatever",
        }
        for r in ROWS
    ]
    ds = load_preference_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert "source" not in ds.column_names
    assert ds["ref_rejected_logps"] == [-4.0] * 3
    assert ds["chosen_winrate"] == [0.75] * 3
    batch = PreferenceCollator(char_tokenizer())(ds.to_list())
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["tie"].dtype == torch.bool
    assert batch["tie"].tolist() == [False, True, False]
    for name in ("chosen_winrate", "rejected_winrate", "prev_chosen_logps", "prev_rejected_logps"):
        assert batch[name].shape == (3,)


def test_implicit_prompt_text_and_conversational(tmp_path):
    text = [{"chosen": "Q: is it red? A: yes it is", "rejected": "Q: is it red? A: no"}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "t.jsonl", text))
    assert ds[0]["prompt"] == "Q: is it red? A:"
    assert ds[0]["chosen"] == " yes it is"
    assert ds[0]["rejected"] == " no"
    # the split is at a whole word even when the two differ mid-word
    ds = load_preference_dataset(
        write_jsonl(tmp_path / "w.jsonl", [{"chosen": "The cat", "rejected": "The car"}])
    )
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == ("The", " cat", " car")

    conv = [
        {
            "chosen": [user("hi"), assistant("hello"), user("more"), assistant("sure")],
            "rejected": [user("hi"), assistant("hello"), user("more"), assistant("no")],
        }
    ]
    ds = load_preference_dataset(write_jsonl(tmp_path / "c.jsonl", conv))
    assert ds[0]["prompt"] == [user("hi"), assistant("hello"), user("more")]
    assert ds[0]["chosen"] == [assistant("sure")]
    assert ds[0]["rejected"] == [assistant("no")]


def test_explicit_conversational_drops_extra_message_keys(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi", "name": "x"}],
            "chosen": [assistant("yo")],
            "rejected": [assistant("nah")],
        }
    ]
    ds = load_preference_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    assert ds[0]["prompt"] == [user("hi")]


BAD_ROWS = [
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "expected a string"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "empty completion"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "chosen", "empty completion"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", "empty prompt"),
    ({"prompt": ["p"], "chosen": "c", "rejected": "r"}, "prompt", "expected a string"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "tie": "yes"}, "tie", "expected a bool"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "tie": None}, "tie", "missing"),
    ([1, 2], "<row>", "expected an object"),
]


@pytest.mark.parametrize(("row", "field", "message"), BAD_ROWS)
def test_malformed_text_row_names_file_row_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], row])
    with pytest.raises(DataError) as info:
        load_preference_dataset(path)
    text = str(info.value)
    assert str(path) in text
    assert "bad.jsonl: line 3:" in text  # the third line (1-based, as editors count)
    assert f"field '{field}'" in text
    assert message in text


BAD_CONV = [
    ({"prompt": [user("q")], "chosen": [user("c")], "rejected": [assistant("r")]}, "chosen", "no assistant turn"),
    ({"prompt": [user("q")], "chosen": [assistant("c")], "rejected": [assistant("")]}, "rejected[0].content", "empty completion"),
    ({"prompt": [user("q")], "chosen": "c", "rejected": [assistant("r")]}, "chosen", "list of {role, content}"),
    ({"prompt": [{"role": "user"}], "chosen": [assistant("c")], "rejected": [assistant("r")]}, "prompt[0].content", "missing"),
    ({"prompt": [user("q")], "chosen": [assistant("c"), user("u")], "rejected": [assistant("r")]}, "chosen[1].role", "must be 'assistant'"),
    ({"prompt": [user("q")], "chosen": [], "rejected": [assistant("r")]}, "chosen", "non-empty list"),
    ({"prompt": [user("q")], "chosen": [assistant("c")], "rejected": [{"role": "assistant", "content": 1}]}, "rejected[0].content", "expected a string"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "field", "message"), BAD_CONV)
def test_malformed_conversation_names_file_row_and_field(tmp_path, row, field, message):
    good = {"prompt": [user("q")], "chosen": [assistant("c")], "rejected": [assistant("r")]}
    path = write_jsonl(tmp_path / "conv.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_preference_dataset(path)
    text = str(info.value)
    assert str(path) in text and "line 2" in text and f"field '{field}'" in text, text
    assert message in text


def test_implicit_conversation_without_shared_prompt_is_an_error(tmp_path):
    rows = [{"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("y")]}]
    with pytest.raises(DataError, match=r"line 1: field 'chosen': .*share no prompt"):
        load_preference_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    rows = [{"chosen": "same text", "rejected": "same text"}]
    with pytest.raises(DataError, match=r"line 1: field 'rejected': identical to chosen"):
        load_preference_dataset(write_jsonl(tmp_path / "t.jsonl", rows))


def test_optional_value_ranges(tmp_path):
    rows = [{**ROWS[0], "chosen_winrate": 1.5, "rejected_winrate": 0.5}]
    with pytest.raises(DataError, match=r"field 'chosen_winrate'.*\[0, 1\]"):
        load_preference_dataset(write_jsonl(tmp_path / "w.jsonl", rows))
    rows = [{**ROWS[0], "ref_chosen_logps": 2.0, "ref_rejected_logps": -1.0}]
    with pytest.raises(DataError, match=r"field 'ref_chosen_logps'.*<= 0"):
        load_preference_dataset(write_jsonl(tmp_path / "l.jsonl", rows))
    # an optional column present in one row must be present in all of them
    rows = [{**ROWS[0], "tie": True}, {k: v for k, v in ROWS[1].items() if k != "tie"}]
    with pytest.raises(DataError, match=r"line 2: field 'tie': missing"):
        load_preference_dataset(write_jsonl(tmp_path / "t.jsonl", rows))


def test_skip_bad_rows_counts_and_keeps_source_row_ids(tmp_path, caplog):
    rows = [ROWS[0], {"prompt": "p", "chosen": "", "rejected": "r", "tie": False}, ROWS[1], ROWS[2]]
    rows.insert(3, {"prompt": "p", "chosen": "c", "tie": False})
    ds = load_preference_dataset(write_jsonl(tmp_path / "d.jsonl", rows), skip_bad_rows=True)
    assert ds.skipped_rows == 2
    assert len(ds.skip_reasons) == 2 and "line 2" in ds.skip_reasons[0]
    assert "line 4" in ds.skip_reasons[1] and "'rejected'" in ds.skip_reasons[1]
    assert ds["row_id"] == [0, 2, 4]
    assert "skipped 2 malformed row(s)" in caplog.text
    with pytest.raises(DataError, match="every row is malformed"):
        load_preference_dataset(write_jsonl(tmp_path / "e.jsonl", rows[1:2]), skip_bad_rows=True)


def test_existing_row_id_column_is_kept(tmp_path):
    rows = [{**r, "row_id": 10 + i} for i, r in enumerate(ROWS)]
    ds = load_preference_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert ds["row_id"] == [10, 11, 12]


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


def test_text_pair_has_one_bos_and_eos_appended():
    tok = char_tokenizer(add_bos=True)
    prompt_ids, completion_ids = tokenize_pair(
        tok, "ab", " cd", max_prompt_length=None, max_completion_length=None
    )
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert prompt_ids == [bos, *tok.convert_tokens_to_ids(["a", "b"])]
    assert completion_ids == [*tok.convert_tokens_to_ids([" ", "c", "d"]), eos]
    assert (prompt_ids + completion_ids).count(bos) == 1


def test_no_merge_across_the_boundary():
    tok = word_tokenizer(["hello", "world", "helloworld"])
    prompt_ids, completion_ids = tokenize_pair(
        tok, "hello", "world", max_prompt_length=None, max_completion_length=None
    )
    assert tok.convert_ids_to_tokens(prompt_ids + completion_ids) == ["hello", "world", "</s>"]


def test_chat_template_split_matches_full_render():
    tok = char_tokenizer(add_bos=True)
    prompt = [user("hi"), assistant("yo"), user("ok?")]
    completion = [assistant("fine")]
    prompt_ids, completion_ids = tokenize_pair(
        tok, prompt, completion, max_prompt_length=None, max_completion_length=None
    )
    gen = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids == list(gen)
    assert tok.convert_ids_to_tokens(completion_ids) == ["f", "i", "n", "e", "</s>"]
    full = tok.apply_chat_template([*prompt, *completion], tokenize=True)["input_ids"]
    assert prompt_ids + completion_ids == list(full)
    assert (prompt_ids + completion_ids).count(tok.bos_token_id) == 0  # template has no BOS


def test_chat_template_that_is_not_prefix_stable_is_rejected():
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>THINK{% endif %}"
    )
    with pytest.raises(DataError, match="not a prefix"):
        tokenize_pair(tok, [user("q")], [assistant("a")], max_prompt_length=None, max_completion_length=None)  # fmt: skip


def test_conversation_needs_a_chat_template_and_matching_types():
    tok = char_tokenizer()
    # a text completion after a conversation is its assistant turn (what generation samples)
    assert tokenize_pair(
        tok, [user("q")], "a", max_prompt_length=None, max_completion_length=None
    ) == tokenize_pair(
        tok, [user("q")], [assistant("a")], max_prompt_length=None, max_completion_length=None
    )
    with pytest.raises(DataError, match="completion is a conversation but the prompt is a string"):
        tokenize_pair(tok, "q", [assistant("a")], max_prompt_length=None, max_completion_length=None)  # fmt: skip
    tok.chat_template = None
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        tokenize_pair(tok, [user("q")], [assistant("a")], max_prompt_length=None, max_completion_length=None)  # fmt: skip


def test_truncation_keeps_prompt_end_and_completion_start():
    tok = char_tokenizer(add_bos=True)
    enc = encode_pair(tok, "abcdef", "uvwxyz", max_prompt_length=3, max_completion_length=2)
    assert tok.convert_ids_to_tokens(enc.prompt_ids) == ["d", "e", "f"]
    assert tok.convert_ids_to_tokens(enc.completion_ids) == ["u", "v"]
    assert enc.prompt_truncated and enc.completion_truncated
    enc = encode_pair(tok, "ab", "c", max_prompt_length=3, max_completion_length=2)
    assert not enc.prompt_truncated and not enc.completion_truncated
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode_pair(tok, "ab", "c", max_prompt_length=0, max_completion_length=None)


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_layout(side):
    tok = char_tokenizer(add_bos=True)
    rows = [{**r, "row_id": i} for i, r in enumerate(ROWS)]
    batch = PreferenceCollator(tok, padding_side=side, pad_to_multiple_of=8)(rows)
    n, length = batch["input_ids"].shape
    assert n == 6 and length % 8 == 0
    assert batch["row_id"].tolist() == [0, 1, 2]
    for i, row in enumerate(rows):
        for offset, key in ((0, "chosen"), (3, "rejected")):
            p, c = tokenize_pair(tok, row["prompt"], row[key], max_prompt_length=None, max_completion_length=None)  # fmt: skip
            ids, attn = batch["input_ids"][i + offset], batch["attention_mask"][i + offset]
            comp = batch["completion_mask"][i + offset]
            assert ids[attn.bool()].tolist() == p + c
            assert ids[comp.bool()].tolist() == c
            assert not bool((comp.bool() & ~attn.bool()).any())
            real = attn.nonzero().flatten()
            if side == "right":
                assert real[0] == 0
            else:
                assert real[-1] == length - 1
            assert (ids[~attn.bool()] == tok.pad_token_id).all()
            lengths = batch[f"{key}_lengths"][i]
            assert lengths == len(c)


def test_collator_counts_truncation():
    tok = char_tokenizer()
    collator = PreferenceCollator(tok, max_prompt_length=4, max_completion_length=3)
    batch = collator(ROWS)  # prompts of 7, 4 and 14 tokens
    assert batch["num_truncated_prompts"].item() == 2
    assert (
        batch["num_truncated_completions"].item() == 4
    )  # " hi</s>"=4, " bye</s>"=5, " 4</s>"=3...
    assert collator.truncated_prompts == 2 and collator.truncated_completions == 4
    collator(ROWS[:1])
    assert collator.pairs_seen == 4 and collator.truncated_prompts == 3
    collator.reset_counters()
    assert collator.truncated_prompts == collator.truncated_completions == collator.pairs_seen == 0
    assert batch["completion_mask"].sum(1).max().item() == 3
    assert batch["input_ids"].shape[1] == 7


def test_collator_conversational_rows(tmp_path):
    rows = [
        {"prompt": [user("hi")], "chosen": [assistant("yo")], "rejected": [assistant("nah")]},
    ]
    ds = load_preference_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    tok = char_tokenizer()
    batch = PreferenceCollator(tok)(ds.to_list())
    chosen = batch["input_ids"][0][batch["completion_mask"][0].bool()]
    assert tok.convert_ids_to_tokens(chosen) == ["y", "o", "</s>"]


def test_collator_remembers_encodings_and_gives_the_same_batches():
    """The collator tokenises a repeated prompt or completion once; its batches equal a fresh
    collator's on every row (text and conversational, a completion under two prompts)."""
    tok = char_tokenizer(add_bos=True)
    text = [
        {"prompt": "ab", "chosen": " cd", "rejected": " e"},
        {"prompt": "ab", "chosen": " e", "rejected": " cd"},
        {"prompt": "x", "chosen": " cd", "rejected": " e"},
    ]
    chat = [
        {"prompt": [user("hi")], "chosen": [assistant("yo")], "rejected": [assistant("no")]},
        {"prompt": [user("ho")], "chosen": [assistant("yo")], "rejected": [assistant("no")]},
        {"prompt": [user("hi")], "chosen": "no", "rejected": "yo"},  # text after a chat prompt
    ]
    # text: 2 prompts + 2 completions (a text completion's ids do not depend on the prompt);
    # chat: 2 prompts + 2 completions under each + the text completions under "hi"
    for rows, remembered in ((text, 4), (chat, 8)):
        warm = PreferenceCollator(tok, max_completion_length=2)
        for _ in range(2):  # the second pass is all remembered
            for r in range(len(rows)):
                got = warm([rows[r]])
                want = PreferenceCollator(tok, max_completion_length=2)([rows[r]])
                assert got.keys() == want.keys()
                for key in want:
                    assert torch.equal(got[key], want[key]), (rows[r], key)
        assert len(warm._memo) == remembered
    a, _ = warm.encode_row(chat[0])
    a.prompt_ids.append(-1)  # a caller's change does not reach the memory
    assert warm.encode_row(chat[0])[0].prompt_ids[-1] != -1
