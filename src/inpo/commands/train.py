"""``inpo train [CONFIG.yaml] [key=value ...]``: train a causal LM on preference pairs.

The config is :class:`inpo.training.TrainConfig` (see ``examples/train_inpo.yaml``); overrides
use dotted keys (``optim.max_steps=100``, ``loss.name=dpo``, ``loss.beta=0.1``). Everything is
validated before the model loads. Re-running the same command continues from the newest
checkpoint in ``output_dir/checkpoints`` (``resume=auto``; ``resume=never`` starts over).
"""

from __future__ import annotations

import os

from inpo.commands._args import ArgumentParser
from inpo.commands.config import config_help
from inpo.config import load_config
from inpo.pipeline.faults import train_stop_after

__all__ = ["main"]

USAGE = "usage: inpo train [CONFIG.yaml | --config CONFIG.yaml] [key=value ...]"

DESCRIPTION = """
Trains a causal LM on preference pairs (TRL's formats) with INPO, IPO, DPO, SPPO or TODO.
output_dir gets the trained model (safetensors + tokenizer + model card; loads with
AutoModelForCausalLM.from_pretrained), train_config.yaml, metrics.jsonl/.csv and checkpoints/.
Losses: inpo (needs ref_* and prev_* log-prob columns: run `inpo precompute` first), ipo, dpo,
todo (reads a `tie` column), sppo (needs prev_* and chosen_winrate/rejected_winrate).
Re-running the same command continues from the newest checkpoint (resume=never starts over).
"""

EXAMPLES = """\
  inpo train examples/train_inpo.yaml
  inpo train examples/train_inpo.yaml output_dir=runs/it1 optim.max_steps=100
  inpo train --config examples/train_inpo.yaml loss.name=dpo loss.eta=null loss.beta=0.1
  inpo train model.path=toy/policy data.train_file=pairs-ref output_dir=runs/dpo loss.name=dpo
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(config_help("train", USAGE, DESCRIPTION, EXAMPLES))
        return 0
    parser = ArgumentParser(prog="inpo train", add_help=False)
    parser.add_argument("config", nargs="?", help="YAML config file (inpo.training.TrainConfig)")
    parser.add_argument(
        "--config", "-c", dest="config_flag", metavar="CONFIG.yaml", help="the same, as a flag"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. optim.max_steps=10",
    )
    args = parser.parse_args(argv)
    if args.config and "=" in args.config:  # `inpo train --config X.yaml key=value`
        args.overrides.insert(0, args.config)
        args.config = None
    if args.config_flag:
        if args.config:
            parser.error("give the config file once (positional or --config)")
        args.config = args.config_flag
    if not args.config and not args.overrides:
        parser.error(
            "give a CONFIG.yaml or key=value settings (at least model.path and data.train_file)"
        )

    from inpo.training import TrainConfig, train  # deferred: loads numpy, torch, yaml

    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = train(cfg, stop_after=train_stop_after())  # the kill tests' hook; unset in use
    if not result.finished:
        print(f"inpo train: stopped after step {result.steps} (INPO_FAULT_KILL)")
        return 0
    if os.environ.get("RANK", "0") != "0":  # one report a launch
        return 0
    where = result.output_dir.resolve()
    if result.resumed_from is not None and result.resumed_from.name.endswith(
        f"{result.total_steps:06d}"
    ):
        print(f"inpo train: already finished ({result.total_steps} steps); model in {where}")
    else:
        print(f"inpo train: trained {result.total_steps} steps; model written to {where}")
    if result.last_metrics:
        m = result.last_metrics
        print(f"  last step: loss {m['loss']:.4g}, accuracy {m['accuracy']:.2f}, lr {m['lr']:.3g}")
    print(f"  metrics: {where / 'metrics.jsonl'}  config: {where / 'train_config.yaml'}")
    return 0
