"""Samples cut at ``max_new_tokens``: scored as sampled (no end token), flagged through
samples → pairs → training data, and treated as ``annotate.truncated`` says."""

from __future__ import annotations

import json

import pytest

from inpo.data import PreferenceCollator, encode_completion, load_preference_dataset
from inpo.oracles.synthetic import AnnotatorGroup, AnnotatorPanel, brevity
from inpo.pipeline.stages.annotate import _pairs, _with_teacher
from inpo.tiny import chat_tokenizer

CONV = [{"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_a_cut_conversational_sample_has_no_end_of_turn(style):
    tok = chat_tokenizer(style)
    turn = [{"role": "assistant", "content": "Red and"}]
    ended = encode_completion(tok, CONV, turn)
    cut = encode_completion(tok, CONV, turn, ended=False)
    end = tok.convert_tokens_to_ids("<|eot_id|>" if style == "llama3" else "<|im_end|>")
    assert end in ended and end not in cut
    assert tok.decode(cut) == "Red and"
    assert ended[: len(cut)] == cut  # the same tokens up to where the sample stopped


def test_a_cut_text_sample_has_no_eos():
    tok = chat_tokenizer("chatml")
    assert encode_completion(tok, "Hi", "abc")[-1] == tok.eos_token_id
    assert tok.eos_token_id not in encode_completion(tok, "Hi", "abc", ended=False)


def test_the_cut_flags_reach_the_collated_batch(tmp_path):
    tok = chat_tokenizer("chatml")
    rows = [
        {"prompt": CONV, "chosen": [{"role": "assistant", "content": "Red."}],
         "rejected": [{"role": "assistant", "content": "Blue and"}],
         "chosen_truncated": False, "rejected_truncated": True},
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_preference_dataset(path)
    assert ds[0]["rejected_truncated"] is True and ds[0]["chosen_truncated"] is False
    chosen, rejected = PreferenceCollator(tok).encode_row(ds[0])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in chosen.completion_ids and im_end not in rejected.completion_ids
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "rejected_truncated": "yes"}) + "\n")
    with pytest.raises(Exception, match="rejected_truncated"):
        load_preference_dataset(bad)


def _panel():
    return AnnotatorPanel([AnnotatorGroup(brevity())])  # shorter wins, always


def _chunk():
    # the shortest answer was cut; of the ended ones "abcd" is shorter than "abcdefgh"
    row = {"index": 0, "prompt": "p", "responses": ["ab", "abcd", "abcdefgh", "abcdefghijkl"],
           "truncated": [True, False, False, True]}  # fmt: skip
    return _with_teacher([row], None)


def test_keep_judges_cut_samples_like_any_other():
    pairs, _, _ = _pairs("tournament", _panel(), _chunk(), "drop", truncated="keep")
    assert pairs[0]["chosen"] == "ab" and pairs[0]["chosen_truncated"] is True
    assert pairs[0]["rejected"] == "abcdefghijkl" and pairs[0]["rejected_truncated"] is True


def test_drop_leaves_cut_samples_out_of_selection():
    pairs, _, _ = _pairs("tournament", _panel(), _chunk(), "drop", truncated="drop")
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("abcd", "abcdefgh")
    assert not pairs[0]["chosen_truncated"] and not pairs[0]["rejected_truncated"]
    one_left = [{**_chunk()[0], "truncated": [True, True, True, False]}]
    assert _pairs("tournament", _panel(), one_left, "drop", truncated="drop")[0] == []


def test_lose_makes_a_cut_sample_lose_to_every_ended_one_without_asking():
    panel = _panel()
    pairs, _, _ = _pairs("all_pairs", panel, _chunk(), "drop", truncated="lose")
    # by win rate: "abcd" beats all three others; the cut "ab" loses to both ended ones
    assert pairs[0]["chosen"] == "abcd" and not pairs[0]["chosen_truncated"]
    assert pairs[0]["rejected_truncated"] is True
    asked = panel.stats.queries
    pairs, _, _ = _pairs("all_pairs", _panel(), _chunk(), "drop", truncated="keep")
    assert pairs[0]["chosen"] == "ab"  # kept: the cut one's brevity wins
    assert asked < 6  # of the 6 pairs of 4 responses, those with one cut answer were not asked


def test_samples_written_before_the_flags_count_as_ended():
    row = {"index": 0, "prompt": "p", "responses": ["a", "bb"]}
    assert _with_teacher([row], None)[0]["truncated"] == [False, False]


def test_the_pairwise_judge_keeps_chatml_turn_markers():
    from inpo.oracles.pairwise import render_comparison, strip_sequence_bos

    chatml = chat_tokenizer("chatml")
    chatml.bos_token = "<|im_start|>"  # as SmolLM2's tokenizer has it
    ids = render_comparison(chatml, CONV, "Red.", "Blue.")
    text = chatml.decode(ids)
    assert text.startswith("<|im_start|>user\n[CONTEXT]") and text.count("<|im_start|>") == 1
    judge = chatml.decode(render_comparison(chatml, CONV, "Red.", "Blue.", format="chat"))
    assert "Which answer is better?" in judge and judge.endswith("<|im_start|>assistant\n")
    llama3 = chat_tokenizer("llama3")
    rendered = llama3.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert rendered.startswith("<|begin_of_text|>")
    assert not strip_sequence_bos(llama3, rendered).startswith("<|begin_of_text|>")
