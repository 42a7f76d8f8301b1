"""The pipeline orchestrator on a tiny task: stages, skip, resume, invalidation, metrics, report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from inpo.config import from_dict
from inpo.pipeline.config import RunConfig
from inpo.pipeline.oracle import build_oracle
from inpo.pipeline.run import run_pipeline
from inpo.pipeline.workloads import Workload

WORDS = "red blue green circle square say describe a the".split()
#: An oracle named for task=prompts configs whose workload is built but whose oracle is not used.
JUDGE = ["annotate.oracle=http", "annotate.url=http://127.0.0.1:9", "annotate.judge_model=j"]


class ToyTask(Workload):
    """Four prompts, a tiny llama over a word vocabulary, a two-taste annotator panel."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.evaluations = 0

    def describe(self):
        return {"task": "toy"}

    def train_prompts(self):
        return ["say red", "say blue", "describe a circle", "describe the square"]

    def reference_model(self, run_dir):
        from inpo.tiny import save_tiny_lm, word_tokenizer

        path = self.root / "ref"
        if not path.exists():
            save_tiny_lm(
                path, "llama", tokenizer=word_tokenizer(WORDS), hidden_size=32, num_hidden_layers=2
            )
        return path

    def oracle(self, acfg, *, cache, rank=0, world=1, device=None):
        from inpo.oracles.synthetic import AnnotatorGroup, AnnotatorPanel, brevity, keyword

        panel = AnnotatorPanel(
            [AnnotatorGroup(brevity(), 1.0), AnnotatorGroup(keyword("red"), 1.0)], epsilon=0.1
        )
        return build_oracle(acfg, cache, task_oracle=panel, seed=0, rank=rank, world=world)

    def evaluate(self, policy, ref):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from inpo.layout import completion_logps

        self.evaluations += 1
        model = AutoModelForCausalLM.from_pretrained(policy)
        tok = AutoTokenizer.from_pretrained(policy)
        lp = completion_logps(model, tok, ["say red"] * 2, ["red", "blue green"])
        return {"logp_red": float(lp[0]), "logp_blue_green": float(lp[1])}


def _cfg(tmp_path, **kw):
    data = {
        "run_dir": str(tmp_path / "run"),
        "iterations": 2,
        "eta": 0.5,
        # The toy's brevity annotator prefers an empty (EOS-only) sample, and pairs with an
        # empty response are dropped: a seed whose first samples leave pairs to train on.
        "seed": 1,
        "generate": {"k": 4, "max_new_tokens": 4, "batch_size": 2},
        "train": {
            "optim": {
                "learning_rate": 1e-3,
                "global_batch_size": 4,
                "per_device_batch_size": 2,
                "warmup_ratio": 0.0,
            },
            "data": {"max_prompt_length": 16, "max_completion_length": 8},
        },
    }
    data.update(kw)
    return from_dict(RunConfig, data)


def test_pipeline_runs_and_skips_complete_stages(tmp_path):
    task = ToyTask(tmp_path)
    logs: list[str] = []
    run = run_pipeline(_cfg(tmp_path), log=logs.append, task=task)
    for t in range(2):
        for stage in ("generate", "annotate", "logps", "train", "evaluate"):
            assert (run / f"iter_{t:03d}" / stage / "manifest.json").is_file(), (t, stage)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[0]["oracle_queries"] == 0 and rows[1]["oracle_queries"] == 4 * 5  # K=4: 5 each
    assert (run / "report.md").is_file() and (run / "config.yaml").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "iter_001" / "train" / "model")
    import yaml

    saved = yaml.safe_load((run / "iter_001" / "train" / "model" / "train_config.yaml").read_text())
    assert saved["output_dir"] == str(run / "iter_001" / "train" / "model")  # not the .partial
    # Re-running the same command does nothing new.
    logs.clear()
    run_pipeline(_cfg(tmp_path), log=logs.append, task=task)
    stage_lines = [line for line in logs if line.startswith("[") and "] π_ref " not in line]
    assert len(stage_lines) == 11 and all("skipped" in line for line in stage_lines), logs
    # the per-iteration tables are shown again (the run's story), nothing else
    assert all(line.startswith(("[", "iteration ", "inpo run:", "done:")) for line in logs), logs


def test_changed_setting_invalidates_that_stage_and_later(tmp_path):
    task = ToyTask(tmp_path)
    run_pipeline(_cfg(tmp_path, iterations=1), log=lambda m: None, task=task)
    logs: list[str] = []
    cfg = _cfg(tmp_path, iterations=1)
    cfg.train.optim.learning_rate = 2e-3
    run_pipeline(cfg, log=logs.append, task=task)
    text = "\n".join(logs)
    assert "[iter_000/generate] complete, skipped" in text
    assert "[iter_000/annotate] complete, skipped" in text
    assert "[iter_000/train] redo: its configuration changed" in text
    assert "[iter_000/evaluate] redo: its inputs changed (train)" in text


def test_corrupt_artifact_is_redone(tmp_path):
    task = ToyTask(tmp_path)
    run = run_pipeline(_cfg(tmp_path, iterations=1), log=lambda m: None, task=task)
    pairs = run / "iter_000" / "annotate" / "pairs.jsonl"
    pairs.write_text(pairs.read_text()[:-5])
    logs: list[str] = []
    run_pipeline(_cfg(tmp_path, iterations=1), log=logs.append, task=task)
    text = "\n".join(logs)
    assert "[iter_000/annotate] redo: output 'pairs.jsonl' is corrupt" in text


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("algorithm", "inpoo", "did you mean 'inpo'"),
        ("tau", 1.0, "tau must satisfy 0 <= tau <= eta"),
        ("policy", "/does/not/exist", "policy '/does/not/exist' does not exist"),
        ("reference", "acme/not-cached", "reference 'acme/not-cached' is not a local folder"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, key, value, needle):
    from inpo.errors import ConfigError
    from inpo.pipeline.preflight import load_run_config

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, [f"{key}={value}", "eta=0.5"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("algorithm", ["sppo", "dpo"])
def test_peer_algorithms_run(tmp_path, algorithm):
    task = ToyTask(tmp_path)
    cfg = _cfg(tmp_path, iterations=1, algorithm=algorithm)
    if algorithm == "sppo":
        cfg.annotate.selection = "all_pairs"
    run = run_pipeline(cfg, log=lambda m: None, task=task)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["algorithm"] == algorithm
    pairs = [
        json.loads(x)
        for x in (run / "iter_000" / "annotate" / "pairs.jsonl").read_text().splitlines()
    ]
    if algorithm == "sppo":
        assert rows[1]["oracle_queries"] == 4 * (4 * 3 // 2)  # all pairs of K = 4
        assert all(p["chosen_winrate"] >= p["rejected_winrate"] for p in pairs)
    else:
        assert rows[1]["oracle_queries"] == 4 * 5


def test_vllm_backend_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("inpo")  # always present; vLLM must be absent for this test
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    from inpo.config import load_config
    from inpo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"generate\.backend=vllm needs vLLM"):
        load_config(RunConfig, None, ["generate.backend=vllm"])  # at the config check


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            "generate.kk=4",
            "unknown config key 'generate.kk' in overrides; did you mean 'generate.k'?",
        ),
        ("iterations=three", "'iterations' must be an integer, got 'three' (in overrides)"),
        ("annotate.oracle=reward_model", "annotate.model is required"),
        # a section checks itself under the name it has here, not in `inpo train`
        ("train.model.lora.r=0", "train.model.lora: r must be >= 1, got 0"),
        (
            "annotate.oracle=http annotate.url=ftp://x annotate.judge_model=m",
            "annotate.url 'ftp://x' must start with http:// or https://",
        ),
        # literals as YAML spells them
        ("train.bf16=maybe", "'train.bf16' must be one of auto, true, false; got 'maybe'"),
    ],
)
def test_more_bad_configs(override, needle):
    from inpo.config import load_config
    from inpo.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, override.split())
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "text,needle",
    [
        (
            "train:\n  optim:\n    learning_rat: 3\n",
            "unknown config key 'train.optim.learning_rat' in {file}; did you mean "
            "'train.optim.learning_rate'",
        ),
        (
            "train:\n  learning_rate: 3\n",
            "unknown config key 'train.learning_rate' in {file}; it is 'train.optim.learning_rate'",
        ),
        (
            "train:\n  optim:\n    learning_rate: abc\n",
            "'train.optim.learning_rate' must be a number, got 'abc' (in {file})",
        ),
        ("iterations: abc\n", "'iterations' must be an integer, got 'abc' (in {file})"),
    ],
)
def test_a_bad_config_file_is_named_in_the_error(tmp_path, text, needle):
    from inpo.config import load_config
    from inpo.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert needle.format(file=path) in str(err.value)


def test_prompt_file_task_with_a_reward_model_oracle(tmp_path):
    """Real use beyond the default: a local policy folder, prompts in TRL's prompt-only JSONL,
    a transformers reward model as the oracle, best-of-K/worst-of-K selection, via the CLI."""
    import subprocess
    import sys

    from inpo.tiny import save_tiny_lm, tiny_reward_model, word_tokenizer

    tok = word_tokenizer(WORDS)
    policy = save_tiny_lm(tmp_path / "policy", "llama", tokenizer=tok, hidden_size=32)
    rm = tiny_reward_model("llama", tok, hidden_size=32)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ToyTask(tmp_path).train_prompts())
    )
    args = [
        f"run_dir={tmp_path / 'run'}",
        "task=prompts",
        f"prompts={prompts}",
        f"reference={policy}",
        "annotate.oracle=reward_model",
        f"annotate.model={tmp_path / 'rm'}",
        "annotate.selection=best_worst",
        "iterations=1",
        "seed=1",  # see _cfg: samples that leave non-empty pairs
        "eta=0.5",
        "generate.k=4",
        "generate.max_new_tokens=4",
        "train.optim.learning_rate=1e-3",
        "train.optim.global_batch_size=4",
        "train.optim.per_device_batch_size=2",
        "evaluate.num_prompts=1",  # no eval_prompts: the file's last prompt is held out
        "evaluate.k=2",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "run", *args],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["win_rate_vs_ref"] is not None and len(rows[0]["win_rate_ci"]) == 2
    # iteration 0 is π_ref against itself, judged from probabilities (not sampled 0/1 labels)
    assert abs(rows[0]["win_rate_vs_ref"] - 0.5) < 0.05
    for row in rows:  # the Monte-Carlo KL comes with its interval over prompts
        lo, hi = row["kl_to_ref_ci"]
        assert lo <= row["kl_to_ref"] + 1e-12 and row["kl_to_ref"] <= hi + 1e-12
    assert (
        "KL(π ‖ π_ref)" in proc.stderr and rows[1]["kl_to_ref_ci"][0] <= rows[1]["kl_to_ref_ci"][1]
    )
    assert rows[1]["oracle_queries"] == 3 * 4  # best/worst of K = 4: K reward calls a prompt
    assert rows[1]["eval_prompts"] == 1
    samples = (tmp_path / "run" / "iter_000" / "generate" / "samples.jsonl").read_text()
    assert "describe the square" not in samples  # the held-out prompt is never trained on
    assert "[data] prompts" in proc.stderr and "held out for evaluation" in proc.stderr
    assert 0.0 <= rows[1]["win_rate_vs_ref"] <= 1.0


def test_changing_the_prompt_set_redoes_generation(tmp_path):
    task = ToyTask(tmp_path)
    run_pipeline(_cfg(tmp_path, iterations=1), log=lambda m: None, task=task)
    logs: list[str] = []
    run_pipeline(_cfg(tmp_path, iterations=1, prompt_repeats=2), log=logs.append, task=task)
    assert "[iter_000/generate] redo: its configuration changed" in "\n".join(logs)


def test_a_second_run_on_a_folder_in_use_refuses_naming_the_holder(tmp_path):
    """The lock is real across processes: this process holds it, `inpo run` in another refuses
    (exit 2, one line with our pid); a holder killed with SIGKILL leaves no stale lock."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from inpo.pipeline.lock import acquire

    run_dir = tmp_path / "run"
    fd = acquire(run_dir)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "inpo", "run", f"run_dir={run_dir}", "iterations=1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(fd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is in use by pid {os.getpid()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "config.yaml").exists()  # nothing of the holder's was touched
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from inpo.pipeline.lock import acquire;"
            f"acquire(Path({str(run_dir)!r})); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's flock at once
        try:
            os.close(acquire(run_dir))
            break
        except Exception:
            assert time.time() < deadline, "the killed holder's lock was not released"
            time.sleep(0.1)


def test_the_console_shows_each_iteration_and_no_library_bars(tmp_path):
    import subprocess
    import sys

    args = [f"run_dir={tmp_path / 'run'}", "iterations=1", "max_prompts=4", "prompt_repeats=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "run", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "iteration 1 (inpo):" in proc.stderr and "duality gap" in proc.stderr
    assert "seconds:" in proc.stderr
    for noise in ("Loading weights", "Saving the dataset", "Writing model shards"):
        assert noise not in proc.stderr, noise


def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path):
    """A real file-system refusal (here: the run folder's parent is a file): exit 2, one line
    naming the path, no traceback — the same handler as a full disk or a read-only folder."""
    import subprocess
    import sys

    (tmp_path / "a_file").write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "run", f"run_dir={tmp_path / 'a_file' / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("inpo run: error:") and "a_file" in last


def test_quiet_shows_the_iteration_tables_only(tmp_path):
    import subprocess
    import sys

    args = [f"run_dir={tmp_path / 'run'}", "iterations=1", "max_prompts=4", "prompt_repeats=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "-q", "run", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "iteration 1 (inpo):" in proc.stderr
    assert "[iter_000/" not in proc.stderr and "it/s" not in proc.stderr  # no stage lines, bars
    assert "report:" in proc.stdout


def test_report_to_tensorboard_is_one_run_on_the_global_training_step(tmp_path, monkeypatch):
    """`inpo run report_to=tensorboard`: one tracker run under RUN/trackers, training metrics
    under TRL's names at the global step, each iteration's metrics at the step it ended."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run = run_pipeline(
        _cfg(tmp_path, report_to="tensorboard"), log=lambda m: None, task=ToyTask(tmp_path)
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    folder = run / "trackers" / "inpo"
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "loss",
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "learning_rate",
        "oracle/queries",
        "iteration",
        "eval/logp_red",
    ):
        assert tag in tags, tag
    steps = [e.step for e in events.Scalars("loss")]
    per_iter = [r["train_steps"] for r in rows[1:]]
    assert steps == list(range(1, sum(per_iter) + 1))  # one axis across iterations
    ends = [e.step for e in events.Scalars("iteration")]
    assert ends == [0, per_iter[0], per_iter[0] + per_iter[1]]
    queries = [e.value for e in events.Scalars("oracle/queries")]
    assert queries == [r["oracle_queries"] for r in rows]
    # no tracker run per iteration inside the model folders
    assert not (run / "iter_000" / "train" / "model" / "trackers").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("report_to=tensorbord", "report_to: unknown tracker 'tensorbord'.*did you mean"),
        ("report_to=wandb", "report_to=wandb needs the wandb package"),
        ("train.report_to=wandb", "train.report_to"),
    ],
)
def test_report_to_is_checked_before_any_model_loads(override, needle):
    import importlib.util

    from inpo.errors import ConfigError
    from inpo.pipeline.preflight import load_run_config

    if "wandb" in override and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, [override])


def test_prompts_from_a_hub_dataset_in_the_cache_or_a_folder_of_files(tmp_path, monkeypatch):
    """`prompts=acme/prompts prompts_split=… eval_prompts_split=…`: read through
    `datasets.load_dataset` from the local Hugging Face cache (nothing downloads), or from a
    plain folder of data files; a split that is not there is one line naming the splits."""
    from inpo.errors import ConfigError, DataError
    from inpo.pipeline.preflight import load_run_config
    from inpo.pipeline.workloads import PromptFileWorkload, load_prompts

    repo = tmp_path / "hub" / "datasets--acme--prompts"
    snap = repo / "snapshots" / "feed"
    (snap / "data").mkdir(parents=True)
    (snap / "data" / "train.jsonl").write_text('{"prompt": "say red"}\n{"prompt": "say blue"}\n')
    (snap / "data" / "test.jsonl").write_text('{"prompt": "describe a circle"}\n')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("feed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    policy = ToyTask(tmp_path).reference_model(tmp_path)
    cfg = load_run_config(
        None,
        [
            "task=prompts",
            "prompts=acme/prompts",
            "eval_prompts=acme/prompts",
            "eval_prompts_split=test",
            f"reference={policy}",
            *JUDGE,
        ],
    )
    work = PromptFileWorkload(cfg)
    assert work.train_prompts() == ["say red", "say blue"]
    assert work.eval_prompts() == ["describe a circle"]
    assert load_prompts(snap / "data", split="test") == ["describe a circle"]
    with pytest.raises(DataError, match=r"split 'dev' not found \(splits: train, test\)"):
        load_prompts("acme/prompts", split="dev")
    with pytest.raises(ConfigError, match="prompts 'acme/other' is not a local file"):
        load_run_config(None, ["task=prompts", "prompts=acme/other", f"reference={policy}"])


def test_a_tracker_added_to_a_finished_run_gets_the_whole_run(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    task = ToyTask(tmp_path)
    run_pipeline(_cfg(tmp_path), log=lambda m: None, task=task)
    logs: list[str] = []
    run = run_pipeline(_cfg(tmp_path, report_to="tensorboard"), log=logs.append, task=task)
    assert not any("running" in line for line in logs)  # nothing redone
    events = EventAccumulator(str(run / "trackers" / "inpo"))
    events.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == list(range(1, sum(r["train_steps"] for r in rows[1:]) + 1))
    assert len(events.Scalars("iteration")) == len(rows)


def test_pi_ref_answers_are_sampled_once_a_run_and_give_the_same_metrics(tmp_path, monkeypatch):
    """task=prompts evaluates π_t against π_ref's answers; those (a fixed seed) are sampled once
    per run, not once per iteration, and the metrics are bit-identical to sampling them anew."""
    import inpo.generation as generation
    import inpo.pipeline.workloads as workloads
    from inpo.pipeline.preflight import load_run_config
    from inpo.pipeline.workloads import PromptFileWorkload

    task = ToyTask(tmp_path)
    policy = task.reference_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task.train_prompts()))
    cfg = load_run_config(
        None,
        [
            "task=prompts",
            f"prompts={prompts}",
            f"reference={policy}",
            "generate.max_new_tokens=4",
            "evaluate.k=2",
            "evaluate.num_prompts=2",
            *JUDGE,
        ],
    )
    calls = []
    real = generation.sample_responses  # counted, not replaced
    monkeypatch.setattr(
        workloads, "sample_responses", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )

    def workload():
        work = PromptFileWorkload(cfg)
        toy = dataclasses.replace(cfg.annotate, oracle="task")  # the toy's own panel
        work._oracle = task.oracle(toy, cache=tmp_path / f"cache{len(calls)}.sqlite")
        return work

    work = workload()
    first, second = work.evaluate(policy, policy), work.evaluate(policy, policy)
    assert len(calls) == 3  # π_t twice, π_ref once
    assert first == second == workload().evaluate(policy, policy)


class _AlwaysTied:
    """An oracle with no preference between any two responses: every final is a tie."""

    oracle_id = "always-tied"

    def prob_prefers(self, prompts, a, b):
        import numpy as np

        return np.full(len(prompts), 0.5)


class TiedToyTask(ToyTask):
    def oracle(self, acfg, *, cache, rank=0, world=1, device=None):
        return build_oracle(acfg, cache, task_oracle=_AlwaysTied(), seed=0, rank=rank, world=world)


@pytest.mark.parametrize("algorithm", ["todo", "inpo"])
def test_tie_labels_train_the_losses_that_take_them(tmp_path, algorithm):
    """``annotate.tie_policy=tie`` keeps tied finals as tie labels and the loss trains on them
    (TODO's tie term, INPO's zero target); the default drops them; a loss without tie support
    is refused at the config check."""
    from inpo.config import load_config
    from inpo.errors import ConfigError, InpoError

    cfg = _cfg(tmp_path, iterations=1, algorithm=algorithm)
    cfg.annotate.tie_policy = "tie"
    run = run_pipeline(cfg, log=lambda m: None, task=TiedToyTask(tmp_path))
    pairs = [
        json.loads(x) for x in (run / "iter_000/annotate/pairs.jsonl").read_text().splitlines()
    ]
    assert pairs and all(p["tie"] for p in pairs)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["pairs"] == len(pairs) and rows[1]["train_loss"] is not None
    cfg = _cfg(tmp_path / "drop", iterations=1, algorithm=algorithm)  # default: drop
    with pytest.raises(InpoError, match="confirmed no pair"):
        run_pipeline(cfg, log=lambda m: None, task=TiedToyTask(tmp_path))
    with pytest.raises(ConfigError, match="algorithm=dpo would train on as strict"):
        load_config(RunConfig, None, ["algorithm=dpo", "annotate.tie_policy=tie"])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("ref_update_every=2", "ref_update_every is for comal and mpo"),
        ("algorithm=comal ref_update_every=0", "ref_update_every must be >= 1"),
    ],
)
def test_moving_reference_settings_are_checked(override, needle):
    from inpo.config import load_config
    from inpo.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, None, override.split())


@pytest.mark.parametrize("algorithm", ["comal", "mpo"])
def test_moving_reference_algorithms_start_with_their_default_schedule(algorithm):
    """comal and mpo need no ref_update_every: their record carries the default (2), which an
    explicit setting overrides; an algorithm with a fixed reference has no schedule."""
    from inpo.algorithms import ALGORITHMS
    from inpo.config import load_config

    cfg = load_config(RunConfig, None, [f"algorithm={algorithm}"])
    assert cfg.ref_every == ALGORITHMS[algorithm].ref_update_every == 2
    assert (
        load_config(RunConfig, None, [f"algorithm={algorithm}", "ref_update_every=3"]).ref_every
        == 3
    )
    assert load_config(RunConfig, None, ["algorithm=inpo"]).ref_every is None


def test_mpo_trains_with_inpos_loss_at_eta_plus_tau():
    """MMD's update is INPO's at (eta + tau, tau) (inpo.game.algorithms): the LM loss is too."""
    from inpo.config import load_config

    cfg = load_config(RunConfig, None, ["algorithm=mpo", "ref_update_every=2", "eta=0.3",
                                        "tau=0.1"])  # fmt: skip
    assert cfg.loss_hparams() == ("inpo", {"eta": pytest.approx(0.4), "tau": 0.1})
    import numpy as np

    from inpo.game import make_game
    from inpo.game.algorithms import inpo_step, mmd_step

    p = make_game("random", size=5, prompts=2, seed=3)
    pi = np.random.default_rng(0).dirichlet(np.ones(5), size=2)
    ref = np.full((2, 5), 0.2)
    np.testing.assert_allclose(
        mmd_step(p, pi, ref, eta=0.3, tau=0.1), inpo_step(p, pi, ref, eta=0.4, tau=0.1), atol=1e-12
    )


@pytest.mark.slow
def test_comal_moves_its_anchor_to_the_policy(tmp_path):
    """comal with ref_update_every=1: iteration t's log-prob stage uses π_t as its reference
    (the manifest's input says so), the evaluation keeps π_ref."""
    from inpo.hashing import model_fingerprint

    cfg = _cfg(tmp_path, iterations=2, algorithm="comal", ref_update_every=1)
    run = run_pipeline(cfg, log=lambda m: None, task=ToyTask(tmp_path))
    ref = ToyTask(tmp_path).reference_model(None)

    def inputs(stage: str, t: int) -> dict:
        manifest = json.loads((run / f"iter_{t:03d}" / stage / "manifest.json").read_text())
        return manifest["input_hashes"]

    assert inputs("logps", 0)["reference"] == model_fingerprint(ref)
    assert inputs("logps", 1)["reference"] == model_fingerprint(run / "iter_000/train/model")
    assert inputs("evaluate", 1)["reference"] == model_fingerprint(ref)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,twin", [("comal", "inpo"), ("mpo", "mmd")])
def test_comal_and_mpo_on_the_default_task_track_their_exact_updates(tmp_path, algorithm, twin):
    """Three iterations of the LM algorithm (ref_update_every=2) against the exact twin's
    iterates from the same π_ref table (the twin's reference moved every 2 updates too):
    the last gap within a factor 1.6 of the exact one, and under half of π_ref's.
    (Recorded for two seeds in benchmarks/results/lm_vs_exact.md.)"""
    import subprocess
    import sys

    from inpo.pipeline.workloads import RUN_DEFAULTS
    from inpo.tasks import DefaultTask, DefaultTaskConfig

    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inpo",
            "-q",
            "run",
            f"run_dir={run}",
            f"algorithm={algorithm}",
            "ref_update_every=2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    task = DefaultTask(DefaultTaskConfig(eta=RUN_DEFAULTS["eta"], tau=RUN_DEFAULTS["tau"]))
    task.build_reference()
    exact = task.tabular_inpo(
        task.reference_table(), iterations=3, algorithm=twin, ref_update_every=2
    )["gap"]
    assert rows[0]["duality_gap"] == pytest.approx(exact[0], rel=1e-6)  # the same π_ref table
    assert 1 / 1.6 < rows[-1]["duality_gap"] / exact[-1] < 1.6, (rows[-1], exact)
    assert rows[-1]["duality_gap"] < 0.5 * rows[0]["duality_gap"]


def test_nash_md_samples_a_mixture_and_refuses_vllm(tmp_path):
    """nash_md's generate stage depends on π_ref and β (its hash says so) and vLLM is refused
    at the config check."""
    from inpo.config import load_config
    from inpo.errors import ConfigError

    with pytest.raises(ConfigError, match="nash_md samples from a mixture"):
        load_config(RunConfig, None, ["algorithm=nash_md", "generate.backend=vllm"])
    cfg = load_config(RunConfig, None, ["algorithm=nash_md", "eta=0.4", "tau=0.1"])
    assert cfg.mixture_beta() == pytest.approx(0.25) and cfg.loss_hparams()[0] == "inpo"
    run = run_pipeline(
        _cfg(tmp_path, iterations=1, algorithm="nash_md"),
        log=lambda m: None,
        task=ToyTask(tmp_path),
    )
    manifest = json.loads((run / "iter_000" / "generate" / "manifest.json").read_text())
    assert "mixture" in manifest["input_hashes"]


@pytest.mark.parametrize("labels", ["sample", "threshold", "soft"])
def test_evaluation_reads_probabilities_whatever_the_training_labels(tmp_path, labels):
    """``annotate.labels`` labels training pairs; the oracle's ``probabilities`` (what
    evaluation reads) are the backend's ``P(a ≻ b)`` through the same cache, never a 0/1 draw."""
    import numpy as np

    from inpo.oracles.synthetic import AnnotatorGroup, AnnotatorPanel, keyword
    from inpo.pipeline.config import AnnotateConfig
    from inpo.pipeline.oracle import build_oracle

    panel = AnnotatorPanel([AnnotatorGroup(keyword("red"))], epsilon=0.3)  # P = 0.7 or 0.3
    acfg = AnnotateConfig(oracle="task", labels=labels)
    oracle = build_oracle(acfg, tmp_path / "cache.sqlite", task_oracle=panel, seed=0)
    prompts, a, b = ["p"] * 40, [f"red {i}" for i in range(40)], [f"blue {i}" for i in range(40)]
    probs = oracle.probabilities.prob_prefers(prompts, a, b)
    np.testing.assert_allclose(probs, 0.7)
    trained = oracle.prob_prefers(prompts, a, b)
    if labels == "soft":
        np.testing.assert_allclose(trained, 0.7)
    else:
        assert set(np.unique(trained)) <= {0.0, 1.0}
    np.testing.assert_allclose(oracle.probabilities.prob_prefers(prompts, a, b), 0.7)  # cached


def test_pi_refs_evaluation_is_redone_when_its_judge_or_sampling_changes(tmp_path):
    """The evaluate stage's hash holds what a sampled evaluation reads — the judge and the
    sampling settings — so π_ref's evaluation (iteration 0, no other stage before it) is never
    reused from another judge or temperature; the default task's exact evaluation reads neither."""
    from inpo.pipeline.preflight import load_run_config
    from inpo.pipeline.stages import evaluate
    from inpo.pipeline.workloads import DefaultWorkload, PromptFileWorkload

    task = ToyTask(tmp_path)
    policy = task.reference_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task.train_prompts()))
    base = ["task=prompts", f"prompts={prompts}", f"reference={policy}", *JUDGE]

    def settings(*extra):
        cfg = load_run_config(None, [*base, *extra])
        return evaluate.settings(cfg, PromptFileWorkload(cfg))

    same = settings()
    assert settings() == same
    assert settings("generate.temperature=0.7") != same
    assert settings("generate.max_new_tokens=9") != same
    assert settings("annotate.judge_model=another-judge") != same
    cfg = load_run_config(None, [f"run_dir={tmp_path / 'd'}"])
    assert "reads" not in evaluate.settings(cfg, DefaultWorkload(cfg))


def test_the_generate_hash_ignores_how_vllms_engine_is_kept_and_keeps_old_runs_hashes(tmp_path):
    """``generate.reuse_engine`` changes no sample: not hashed. ``generate.enforce_eager``
    (added later) is hashed only when set, so a run made before it resumes its stages."""
    from dataclasses import asdict

    from inpo.pipeline.preflight import load_run_config
    from inpo.pipeline.stages import generate
    from inpo.pipeline.workloads import DefaultWorkload

    def settings(*extra):
        cfg = load_run_config(None, [f"run_dir={tmp_path / 'd'}", *extra])
        return generate.settings(cfg, DefaultWorkload(cfg), 0, "")

    same = settings()
    before = asdict(load_run_config(None, [f"run_dir={tmp_path / 'd'}"]).generate)
    del before["reuse_engine"], before["enforce_eager"]
    assert same["generate"] == before  # the hash of a run made before either setting
    assert settings("generate.reuse_engine=false") == same
    assert settings("generate.enforce_eager=true") != same
    assert settings("generate.temperature=0.7") != same
