"""``inpo run [CONFIG.yaml] [key=value ...]``: the INPO iteration pipeline.

With no arguments it runs the embedded default task into ``./inpo-run``. Precedence: the
paper's defaults < the task's defaults < CONFIG.yaml < ``key=value`` overrides. The config is
validated before any model loads; re-running the same command continues an interrupted run.
"""

from __future__ import annotations

import sys

from inpo.commands.config import config_help
from inpo.config import parse_config_args
from inpo.console import verbosity
from inpo.distributed import get_dist

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

    from inpo.algorithms import ALGORITHMS  # deferred: loads numpy

    out = ["algorithms (algorithm=NAME):"]
    for name, spec in ALGORITHMS.items():
        out.append(f"  {name}")
        for text in (spec.doc, spec.paper):
            out += textwrap.wrap(text, 92, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


EXAMPLES = """\
  inpo run
  inpo run run_dir=runs/inpo iterations=3 seed=0 report_to=tensorboard
  inpo run task=prompts prompts=prompts.jsonl reference=MODEL_DIR annotate.oracle=reward_model annotate.model=RM_DIR
  torchrun --standalone --nproc_per_node 2 -m inpo run run_dir=runs/two
"""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(config_help("run", USAGE, DESCRIPTION + "\n" + algorithms_help(), EXAMPLES))
        return 0
    from inpo.pipeline.preflight import load_run_config  # deferred: loads numpy, torch, yaml

    path, overrides = parse_config_args(argv)
    cfg = load_run_config(path, overrides)
    from inpo.pipeline.run import run_pipeline  # deferred: loads numpy, torch, yaml

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
