"""DeepSpeed ZeRO-3 through an accelerate config (``accelerate launch --config_file ds.yaml``),
two processes on CPU (gloo): the weights one process trains, a resume after a stop equal to an
uninterrupted run, and the refusals a user meets. Opt in: ``make test-deepspeed`` (an
environment with DeepSpeed; the suite skips without it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, tiny_pairs

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]


def scale_page() -> tuple[str, list[str]]:
    """``docs/scale.md``'s ``ds.yaml`` (at 2 processes) and its DeepSpeed launch command: the
    page's own text is what runs here."""
    import shlex

    text = (ROOT / "docs" / "scale.md").read_text()
    after = text[text.index("`ds.yaml`:") :]
    yaml_block = after[
        after.index("```yaml\n") + 8 : after.index("```", after.index("```yaml") + 7)
    ]
    line = next(x for x in after.splitlines() if x.startswith("accelerate launch --config_file"))
    return yaml_block.replace("num_processes: 8", "num_processes: 2"), shlex.split(line)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ds")
    tiny_pairs(d, save_steps=1)
    ds_yaml, _ = scale_page()
    # the page's bf16 is DeepSpeed's (bf16 weights): these tests compare fp32 weights
    (d / "ds.yaml").write_text(ds_yaml.replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    return d


def _run(
    workdir: Path,
    *args: str,
    launch: bool = True,
    env: dict | None = None,
    config: Path | str = "ds.yaml",
):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "inpo", "train", "cfg.yaml", *args]
    if launch:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--main_process_port",
            str(free_port()),  # never torchrun's default 29500: suites must not collide
            *cmd[1:],
        ]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=400)


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _zero_config(checkpoint: Path) -> dict:
    """The ZeRO section of the DeepSpeed config the engine ran with (DeepSpeed records it in
    each rank's model-states file of the checkpoint)."""
    import torch

    # ZeRO-3 names it per rank (zero_pp_rank_0_mp_rank_00_...), ZeRO-2 once (mp_rank_00_...)
    states = sorted(checkpoint.glob("zero/*/*mp_rank_00_model_states.pt"))[0]
    return torch.load(states, weights_only=False, map_location="cpu")["ds_config"][
        "zero_optimization"
    ]


def test_zero3_two_processes_train_the_weights_of_one_and_resume_exactly(workdir):
    import torch

    one = _run(workdir, "output_dir=one", launch=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(workdir, "output_dir=two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "lr_scheduler.step()" not in two.stderr  # the engine's step counts as the step
    a, b, start = _weights(workdir / "one"), _weights(workdir / "two"), _weights(workdir / "model")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # it trained
    assert set(a) == set(b)
    for k in a:  # the reduction order differs (see test_training_distributed): Adam's 2e-5
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
    rows = {
        name: [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    for r1, r2 in zip(rows["one"], rows["two"], strict=True):
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5)
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    # the final model loads with plain from_pretrained; a checkpoint holds the gathered
    # weights and every rank's optimizer partition, under its checksums
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(workdir / "two")
    ckpt = workdir / "two" / "checkpoints" / "step_000003"
    sums = json.loads((ckpt / "checksums.json").read_text())
    parts = sorted(k for k in sums if k.startswith("zero/") and k.endswith("optim_states.pt"))
    assert len(parts) == 2, sums.keys()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["optimizer_format"] == "deepspeed" and state["num_processes"] == 2
    assert not list((workdir / "two" / "checkpoints").glob("*.zero-parts"))
    # ZeRO's buffers sized by the model (accelerate's `auto`), not DeepSpeed's fixed
    # 5e8-element gradient bucket
    h = json.loads((workdir / "model" / "config.json").read_text())["hidden_size"]
    zero = _zero_config(ckpt)
    assert zero["reduce_bucket_size"] == h * h
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert zero["stage3_param_persistence_threshold"] == 10 * h

    # stopped after step 2 (as if killed), then the same command: the uninterrupted weights
    stop = _run(workdir, "output_dir=three", env={"INPO_FAULT_KILL": "train:2"})
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert "stopped after step 2" in stop.stdout
    again = _run(workdir, "output_dir=three")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step_000002" in again.stdout
    c = _weights(workdir / "three")
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=0)

    # a DeepSpeed checkpoint resumed by one process: said in one line, nothing trained
    (workdir / "three" / "model.safetensors").unlink()
    shutil.rmtree(workdir / "three" / "checkpoints" / "step_000003")
    alone = _run(workdir, "output_dir=three", launch=False)
    assert alone.returncode != 0
    assert "optimizer partitions of 2 processes" in alone.stderr
    assert "Traceback" not in alone.stderr


def test_the_scale_page_launch_runs_as_shown(workdir):
    """``accelerate launch --config_file ds.yaml -m inpo train train.yaml``, as the page shows
    it (its ds.yaml at 2 processes, bf16 as there)."""
    ds_yaml, argv = scale_page()
    assert argv[:4] == ["accelerate", "launch", "--config_file", "ds.yaml"]
    page = workdir / "page"
    page.mkdir()
    (page / "ds.yaml").write_text(ds_yaml)
    text = (workdir / "cfg.yaml").read_text().replace("model}", f"{workdir}/model}}")
    (page / "train.yaml").write_text(
        text.replace("train_file: data", f"train_file: {workdir}/data")
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:4]]
    cmd += ["--main_process_port", str(free_port()), *argv[4:], "output_dir=out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=page, capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained 3 steps" in out.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(page / "out")


def test_zero2_trains_the_weights_of_one_process(workdir):
    """``zero_stage: 2`` (weights replicated, gradients and optimizer state partitioned)."""
    import torch

    if not (workdir / "one" / "model.safetensors").exists():
        assert _run(workdir, "output_dir=one", launch=False).returncode == 0
    (workdir / "ds2.yaml").write_text(
        (workdir / "ds.yaml")
        .read_text()
        .replace("zero_stage: 3", "zero_stage: 2")
        .replace("zero3_init_flag: true", "zero3_init_flag: false")
    )
    out = _run(workdir, "output_dir=zero2", config="ds2.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _weights(workdir / "one"), _weights(workdir / "zero2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
    assert _zero_config(workdir / "zero2" / "checkpoints" / "step_000003")["stage"] == 2


def test_a_deepspeed_json_keeps_the_bucket_sizes_it_sets(workdir):
    """An accelerate config pointing at a DeepSpeed JSON: the sizes it sets are kept, the ones
    it leaves out follow the model's hidden size."""
    own = workdir / "own"
    own.mkdir()
    (own / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 5000}})
    )
    (own / "ds.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {own / 'ds.json'}\n"
        "  zero3_init_flag: true\nnum_machines: 1\nnum_processes: 2\n"
    )
    out = _run(workdir, "output_dir=own/out", "optim.max_steps=1", config=own / "ds.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    h = json.loads((workdir / "model" / "config.json").read_text())["hidden_size"]
    zero = _zero_config(workdir / "own" / "out" / "checkpoints" / "step_000001")
    assert zero["reduce_bucket_size"] == 5000
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)


def test_zero3_refuses_shared_prompt_and_fsdp_in_one_line(workdir):
    for args, words in (
        (["output_dir=x", "data.share_prompt=true"], "data.share_prompt=true is not supported"),
        (["output_dir=y", "fsdp=full_shard"], "choose one engine"),
    ):
        out = _run(workdir, *args)
        assert out.returncode != 0
        assert words in out.stderr, out.stderr[-2000:]
        # the launcher reports its failed child with a traceback of its own; ours has none
        assert not [ln for ln in out.stderr.splitlines() if 'File "' in ln and "/inpo/" in ln]


def test_inpo_run_under_zero3_leaves_the_files_of_one_process(workdir):
    """``accelerate launch --config_file ds.yaml -m inpo run ...``: every stage on two ranks,
    training through ZeRO-3, two iterations (the second train stage reuses accelerate's state;
    the stages after training load ordinary models): the samples and pairs of one process byte
    for byte, the metrics to 1e-5, the final weights to Adam's 2e-5."""
    import filecmp

    import torch

    args = ["iterations=2", "max_prompts=16", "prompt_repeats=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "inpo", "-q", "run", "run_dir=r1", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds.yaml"]
    launch += ["--main_process_port", str(free_port())]
    two = subprocess.run(
        [*launch, "-m", "inpo", "-q", "run", "run_dir=r2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for it in ("iter_000", "iter_001"):
        for f in ("generate/samples.jsonl", "annotate/pairs.jsonl"):
            assert filecmp.cmp(workdir / "r1" / it / f, workdir / "r2" / it / f, shallow=False)
    rows = {
        r: [json.loads(x) for x in (workdir / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("r1", "r2")
    }
    for a, b in zip(rows["r1"], rows["r2"], strict=True):
        for k, v in a.items():
            if k != "seconds" and isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    model = Path("iter_001/train/model")
    w1, w2 = _weights(workdir / "r1" / model), _weights(workdir / "r2" / model)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=2e-5)
