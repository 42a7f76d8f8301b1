"""``inpo compare [CONFIG.yaml] [algorithms=inpo,online_ipo,dpo,sppo|all] [key=value ...]``.

Runs several algorithms (``all``: every algorithm of ``inpo run``) on the same task, prompts,
seeds, iterations and ``K`` — each into ``RUN_DIR/<algorithm>/`` (resumable like ``inpo run``) —
and writes one comparison: ``RUN_DIR/metrics.jsonl`` (every algorithm's rows),
``RUN_DIR/compare.md`` (the table) and ``RUN_DIR/plots/metrics.png``. With
``equal_budget=true`` (default) every algorithm spends about the tournament's ``3K/2 − 1``
queries a prompt: the all-pairs rules (SPPO, DNO) get the largest ``K`` whose ``K(K−1)/2``
queries do not exceed it (for ``K = 8``: 5 samples, 10 queries against 11), and the
extragradient algorithms (egpo, mirror_prox: two tournaments an iteration) the largest power
of two whose two tournaments do not (``K = 4``: 2 × 5). ``ref_update_every=N`` applies to the
algorithms whose reference moves (comal, mpo) and ``margin=``/``teacher=`` to dno; each is left
out of the others' configs (``ref_update_every`` defaults to the algorithm's own, 2). Each
algorithm's budget and defaults come from its record in :mod:`inpo.algorithms`.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from inpo.commands.config import config_help
from inpo.config import parse_config_args as parse_args
from inpo.config import validate_config
from inpo.errors import ConfigError
from inpo.hub import resolve_model
from inpo.pipeline.report import table, write_metrics, write_report

DEFAULT = "inpo,online_ipo,dpo,sppo"


def main(argv: list[str]) -> int:
    from inpo.algorithms import ALGORITHMS  # deferred: loads numpy
    from inpo.pipeline.preflight import (  # deferred: loads numpy, torch, yaml
        load_run_config,
        preflight,
    )
    from inpo.pipeline.run import run_pipeline  # deferred: loads torch

    if argv and argv[0] in ("-h", "--help"):
        usage = (
            "usage: inpo compare [CONFIG.yaml | --config CONFIG.yaml] "
            f"[algorithms={DEFAULT}|all] [equal_budget=true|false] [key=value ...]"
        )
        examples = (
            "  inpo compare run_dir=runs/compare\n"
            "  inpo compare run_dir=runs/compare algorithms=inpo,online_ipo iterations=2 seed=1\n"
            "  inpo compare run_dir=runs/all algorithms=all\n"
        )
        description = __doc__.split("\n\n", 1)[1]
        print(config_help("run", usage, description, examples))
        return 0
    algorithms = DEFAULT
    equal_budget = True
    rest = []
    every = None  # ref_update_every: only for the algorithms whose reference moves
    dno: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("algorithms="):
            algorithms = arg.split("=", 1)[1]
        elif arg.startswith("ref_update_every="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"ref_update_every must be an integer >= 1, got '{value}'")
            every = int(value)
        elif arg.startswith(("margin=", "teacher=")):  # DNO's, applied to dno alone
            key, value = arg.split("=", 1)
            dno[key] = value
        elif arg.startswith("equal_budget="):
            value = arg.split("=", 1)[1].lower()
            if value not in ("true", "false"):
                raise ConfigError(f"equal_budget must be true or false, got '{value}'")
            equal_budget = value == "true"
        else:
            rest.append(arg)
    moving = [a.name for a in ALGORITHMS.values() if a.reference == "moving"]
    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    if names == ["all"]:
        names = list(ALGORITHMS)
        if every is None:
            print(
                f"algorithms=all: {' and '.join(moving)} move their reference every "
                f"{ALGORITHMS[moving[0]].ref_update_every} iterations, their default "
                "(ref_update_every=N to change)",
                file=sys.stderr,
            )
    for name in names:
        if name not in ALGORITHMS:
            raise ConfigError(f"algorithms: unknown '{name}' (allowed: {', '.join(ALGORITHMS)})")
    path, overrides = parse_args(rest)
    base = load_run_config(path, overrides)
    root = Path(base.run_dir)
    # Validate every algorithm's config before any work.
    configs = []
    for name in names:
        cfg = copy.deepcopy(base)
        cfg.algorithm = name
        cfg.run_dir = str(root / name)
        spec = ALGORITHMS[name]
        cfg.ref_update_every = every if spec.reference == "moving" else None
        if spec.pair_filter:  # DNO's own settings stay out of the others' configs
            if "margin" in dno:
                try:
                    cfg.margin = float(dno["margin"])
                except ValueError:
                    raise ConfigError(f"margin must be a number, got '{dno['margin']}'") from None
            cfg.teacher = dno.get("teacher", "")
        if spec.win_rates:
            cfg.annotate.selection = "all_pairs"
        elif cfg.annotate.selection == "all_pairs":
            cfg.annotate.selection = "auto"
        if equal_budget:
            cfg.generate.k = spec.equal_budget_k(base.generate.k)
        validate_config(cfg)
        preflight(cfg)  # DNO's teacher against the prompts, before any work
        configs.append(cfg)
    rows = []
    runs: dict[str, Path] = {}
    for cfg in configs:
        print(f"== {cfg.algorithm} ==", file=sys.stderr, flush=True)
        if runs:  # π_ref's evaluation is the same for every algorithm: evaluated once
            _share_reference_evaluation(next(iter(runs.values())), Path(cfg.run_dir))
        run_dir = run_pipeline(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
        runs[cfg.algorithm] = run_dir
        rows += [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    write_metrics(root, rows)
    write_report(root, rows, base, title=f"inpo compare on task '{base.task}'")
    (root / "report.md").rename(root / "compare.md")
    last = {}
    for r in rows:
        last[r["algorithm"]] = r
    cols = [
        "algorithm",
        "iteration",
        "duality_gap",
        "exploitability",
        "pool_duality_gap",
        "win_rate_vs_ref",
        "kl_to_ref",
        "oracle_queries_total",
    ]
    print(table(list(last.values()), cols))
    if base.task == "panel":
        _final_games(root, runs, base)
    print(f"\ncomparison: {root / 'compare.md'}")
    return 0


def _share_reference_evaluation(first: Path, run_dir: Path) -> None:
    """Copy the first run's finished ``reference/evaluate`` into ``run_dir`` (absent there):
    its stage hash decides whether it applies — a run whose evaluation settings differ
    re-evaluates π_ref as it would have anyway."""
    import shutil

    src, dst = first / "reference" / "evaluate", run_dir / "reference" / "evaluate"
    if (src / "manifest.json").is_file() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst)


def _final_games(root: Path, runs: dict[str, Path], base) -> None:
    """task=panel: the final policies' cross-play matrix and pool-restricted duality gaps
    (:mod:`inpo.pipeline.final`), into ``final.json``, ``plots/crossplay.png`` and ``compare.md``."""
    from inpo.pipeline.final import final_games, plot_crossplay  # deferred: loads numpy
    from inpo.tasks.panel import PanelOracle

    print("== final policies: cross-play and the pool-restricted game ==", file=sys.stderr)
    from inpo.pipeline.workloads import real_model_dir  # deferred: loads numpy, torch, yaml

    name = base.reference or base.policy
    ref = resolve_model(name, "reference") if name else real_model_dir()
    result = final_games(runs, base.iterations, ref, PanelOracle(), base.tau_value)
    (root / "final.json").write_text(json.dumps(result, indent=2))
    plot_crossplay(result, root / "plots" / "crossplay.png", "inpo compare on task 'panel'")
    names = result["policies"]
    rows = [
        {
            "policy": a,
            **{f"vs {b}": result["crossplay"][i][j] for j, b in enumerate(names)},
            "pool_gap": result["pool"][a]["pool_duality_gap"],
            "pool_gap_ci": result["pool"][a]["pool_duality_gap_ci"],
        }
        for i, a in enumerate(names)
    ]
    text = table(rows, list(rows[0]))
    with open(root / "compare.md", "a") as fh:
        fh.write(
            "\n## Final policies against each other\n\nCross-play: the panel's mean P(row's "
            "answer ≻ column's) on the held-out prompts; pool gap: the duality gap of the game "
            "restricted to every answer any of them gave (lower is better), 95% interval over "
            f"prompts. ![cross-play](plots/crossplay.png)\n\n{text}\n"
        )
    print(text)
