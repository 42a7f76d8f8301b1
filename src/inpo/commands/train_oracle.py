"""``inpo train-oracle [CONFIG.yaml] [key=value ...]``: train a preference oracle.

The config is :class:`inpo.training.oracle_config.OracleTrainConfig`; ``kind=bt|pairwise|gpm``.
The output folder is what ``annotate.oracle=reward_model|pairwise|gpm`` (``annotate.model=``)
and ``inpo eval --oracle`` load. Re-running the same command continues from the newest
checkpoint (``resume=never`` starts over).
"""

from __future__ import annotations

from inpo.commands.config import config_help
from inpo.config import load_config
from inpo.config import parse_config_args as parse_args
from inpo.distributed import get_dist

__all__ = ["main"]

USAGE = "usage: inpo train-oracle [CONFIG.yaml | --config CONFIG.yaml] [key=value ...]"

DESCRIPTION = """
Trains a preference model on preference pairs (TRL's standard or conversational format, an
optional `tie` column, and for kind=bt an optional `margin` column):
  kind=bt        a Bradley–Terry reward model (sequence classification, one label):
                 -log σ(r_chosen - r_rejected - margin); loads as annotate.oracle=reward_model
  kind=pairwise  an RLHFlow-format A/B model, trained on both orders; annotate.oracle=pairwise
  kind=gpm       a General Preference Model (embedding 2k, skew-symmetric operator, prompt
                 scale gates): K forward passes for all K² preferences; annotate.oracle=gpm
With data.eval_file, held-out accuracy, Brier score and ECE (through the oracle that will
serve the model) go to output_dir/eval_metrics.json.
"""

EXAMPLES = """\
  inpo train-oracle kind=gpm model.path=MODEL_DIR data.train_file=pairs.jsonl data.eval_file=heldout.jsonl output_dir=gpm
  inpo train-oracle oracle.yaml kind=bt optim.learning_rate=2e-6
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(config_help("train-oracle", USAGE, DESCRIPTION, EXAMPLES))
        return 0
    from inpo.training.oracle_config import OracleTrainConfig  # deferred: loads numpy, torch, yaml
    from inpo.training.oracle_loop import train_oracle

    path, overrides = parse_args(argv)
    cfg = load_config(OracleTrainConfig, path, overrides)
    result = train_oracle(cfg)

    if not get_dist().is_main:
        return 0
    where = result.output_dir.resolve()
    print(f"inpo train-oracle: {cfg.kind} model, {result.steps} steps, written to {where}")
    if result.last_metrics:
        m = result.last_metrics
        print(f"  last step: loss {m['loss']:.4g}, accuracy {m['accuracy']:.2f}")
    if result.eval_metrics:
        e = result.eval_metrics
        print(
            f"  held-out ({e['pairs']} pairs): accuracy {e['accuracy']:.3f}, Brier "
            f"{e['brier']:.4f}, ECE {e['ece']:.4f}  ({where / 'eval_metrics.json'})"
        )
    return 0
