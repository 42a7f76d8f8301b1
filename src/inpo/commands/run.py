"""``inpo run [CONFIG.yaml] [key=value ...]``: the INPO iteration pipeline.

With no arguments it runs the embedded default task into ``./inpo-run``. Precedence: the
paper's defaults < the task's defaults < CONFIG.yaml < ``key=value`` overrides. The config is
validated before any model loads; re-running the same command continues an interrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = "usage: inpo run [CONFIG.yaml | --config CONFIG.yaml] [key=value ...]"

DESCRIPTION = """
Runs INPO (or another algorithm=..., listed below) for `iterations` rounds of
generate → annotate → logps → train → evaluate, one folder per iteration and stage under
run_dir (default ./inpo-run). With no arguments: the embedded default task (no download, no
GPU). Re-run the same command to continue an interrupted run.
"""


def algorithms_help() -> str:
    """Every ``algorithm=`` value: what it trains, and the paper (and equation) it follows."""
    import textwrap

    from inpo.pipeline.config import ALGORITHMS, PAPERS

    out = ["algorithms (algorithm=NAME):"]
    for name, spec in ALGORITHMS.items():
        out.append(f"  {name}")
        for text in (spec["doc"], PAPERS[name]):
            out += textwrap.wrap(text, 92, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


EXAMPLES = """\
  inpo run
  inpo run run_dir=runs/inpo iterations=3 seed=0 report_to=tensorboard
  inpo run task=prompts prompts=prompts.jsonl reference=MODEL_DIR annotate.oracle=reward_model annotate.model=RM_DIR
  torchrun --standalone --nproc_per_node 2 -m inpo run run_dir=runs/two
"""


def parse_args(argv: list[str]) -> tuple[Path | None, list[str]]:
    from inpo.errors import ConfigError

    path = None
    overrides = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c"):  # as TRL and torchtune users type it
            if not args:
                raise ConfigError(f"{arg} needs a CONFIG.yaml after it")
            arg = args.pop(0)
            if path is not None:
                raise ConfigError("two config files given; pass one (and key=value overrides)")
            path = Path(arg)
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        elif "=" in arg:
            overrides.append(arg)
        elif path is None and arg.endswith((".yaml", ".yml")):
            path = Path(arg)
        else:
            raise ConfigError(f"unexpected argument '{arg}' (expected CONFIG.yaml or key=value)")
    return path, overrides


def load_run_config(path: Path | None, overrides: list[str]):
    """Resolve the run config: task defaults first, then the YAML, then the overrides."""
    from inpo.config import load_config, parse_overrides, read_yaml
    from inpo.pipeline.config import RunConfig
    from inpo.pipeline.workloads import workload_defaults

    task = "default"
    if path is not None:
        loaded = read_yaml(path)
        if isinstance(loaded.get("task"), str):
            task = loaded["task"]
    task = parse_overrides(overrides).get("task", task)
    return load_config(RunConfig, path, overrides, base=workload_defaults(str(task)))


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        from inpo.commands.config import config_help

        print(config_help("run", USAGE, DESCRIPTION + "\n" + algorithms_help(), EXAMPLES))
        return 0
    path, overrides = parse_args(argv)
    cfg = load_run_config(path, overrides)
    from inpo.console import verbosity
    from inpo.distributed import get_dist
    from inpo.pipeline.run import run_pipeline

    quiet = verbosity() < 0

    def log(msg: str) -> None:  # -q: the per-iteration tables only, not each stage's lines
        if not (quiet and msg.startswith("[")):
            print(msg, file=sys.stderr, flush=True)

    run_dir = run_pipeline(cfg, log=log)
    if get_dist().is_main:
        print(
            f"run folder: {run_dir}\nmetrics: {run_dir / 'metrics.jsonl'}\n"
            f"report: {run_dir / 'report.md'}"
        )
    return 0
