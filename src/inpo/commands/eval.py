"""``inpo eval``: judge models' answers against a baseline's with any oracle.

    inpo eval --answers A.json [--answers B.json ...] --baseline BASE.json \\
              --oracle reward_model|pairwise|gpm|http (--model DIR | --url URL --judge-model M) \\
              --output DIR [--questions Q.jsonl] [--instruction-difficulty D.csv]

Answer files: AlpacaEval's ``model_outputs.json`` (``instruction``, ``output``, ``generator``;
what ``inpo export --format alpaca_eval`` writes), or MT-Bench / Arena-Hard answer files
(``question_id``, ``model_id``, ``choices[0].turns``) with ``--questions`` (the question file
they answered; a multi-turn answer is judged as its turns joined, after the questions joined),
or a ``task=prompts`` run's iteration folder (``RUN/iter_00t``: the answers its evaluation
judged, ``evaluate/answers.jsonl``; as ``--baseline``, the π_ref answers judged against them).
Every model's answers must cover the baseline's instructions exactly.

Each pair is judged in both orders through the query cache ``DIR/oracle_cache.sqlite`` (a
re-run asks nothing again): a positional judge (pairwise model, HTTP judge) is asked each order
on its own, ``P_A(model, baseline)`` and ``P_A(baseline, model)``; the preference is
``½[P_A(m, b) + 1 − P_A(b, m)]`` and the position bias ``½ mean[P_A(m, b) − (1 − P_A(b, m))]``,
the judge's average lean towards whichever answer is shown first (0 for a reward model or a
GPM, which have no positions). Written to ``DIR``: ``eval.json``,
``eval.md`` (win rate and LC win rate with 95% intervals bootstrapped over prompts,
Arena-Hard-style BT scores) and ``win_rates.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inpo.commands._args import ArgumentParser, positive_int
from inpo.data import read_text
from inpo.errors import ConfigError, DataError

ORACLES = ("reward_model", "pairwise", "gpm", "http")


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="inpo eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--answers",
        action="append",
        required=True,
        type=Path,
        help="a model's answer file (repeat for several models)",
    )
    p.add_argument("--baseline", required=True, type=Path, help="the baseline's answer file")
    p.add_argument("--oracle", required=True, choices=ORACLES, help="the judge")
    p.add_argument("--model", default="", help="the reward / pairwise / GPM model folder")
    p.add_argument(
        "--pairwise-format",
        choices=("rlhflow", "chat"),
        default="rlhflow",
        help="--oracle pairwise: RLHFlow's rendering (its pairwise models) or a general judging "
        "question through the model's chat template (any chat model as judge)",
    )
    p.add_argument("--url", default="", help="the OpenAI-compatible judge's base URL (http)")
    p.add_argument("--judge-model", default="", help="the model the HTTP judge is asked for")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="where the judge's key is")
    p.add_argument("--questions", type=Path, default=None, help="MT-Bench / Arena-Hard questions")
    p.add_argument(
        "--instruction-difficulty",
        type=Path,
        default=None,
        help="CSV of instruction,difficulty (AlpacaEval's γ_x) for the LC GLM",
    )
    p.add_argument(
        "--output", required=True, type=Path, help="the folder for eval.json/.md and the plot"
    )
    p.add_argument(
        "--bootstrap", type=positive_int, default=1000, help="bootstrap samples (default 1000)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip (and count) rows with an empty or missing output instead of stopping",
    )
    return p


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = read_text(path)
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON or JSONL ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of objects (or JSONL lines of objects)")
    return rows


def _questions(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    out = {}
    for i, r in enumerate(_read_rows(path)):
        qid = r.get("question_id", r.get("uid"))
        turns = r.get("turns") or ([r["prompt"]] if "prompt" in r else None)
        if qid is None or not turns:
            raise DataError(f"{path}: row {i}: needs 'question_id' (or 'uid') and 'turns'")
        out[str(qid)] = "\n\n".join(t["content"] if isinstance(t, dict) else str(t) for t in turns)
    return out


def _run_answers(path: Path, column: str) -> tuple[str, dict[str, tuple[Any, str, str]]]:
    """A run's iteration (or ``reference``) folder: the answers its evaluation judged."""
    file = path / "evaluate" / "answers.jsonl"
    if not file.is_file():
        raise DataError(
            f"{path}: no evaluate/answers.jsonl (a task=prompts run's iteration folder holds the "
            "answers its evaluation judged; for the default task use `inpo export`)"
        )
    out = {}
    for i, line in enumerate(read_text(file).splitlines()):
        try:
            r = json.loads(line)
            prompt, answer, sample = r["prompt"], r[column], int(r["sample"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{file}: row {i}: unreadable ({err})") from None
        key = json.dumps(prompt, sort_keys=True)
        out[f"{key}#{sample}"] = (prompt, str(answer), key)
    run = path.resolve()
    return f"{run.parent.name}-{run.name}", out


def read_answers(
    path: Path, questions: dict[str, str], skip_bad: bool = False, *, baseline: bool = False
) -> tuple[str, dict[str, tuple[Any, str, str]], int]:
    """``(model name, {key: (prompt, answer, cluster)}, rows skipped)`` of an answer file, or of
    a run's iteration folder (its π_t answers; as ``baseline``, the π_ref answers judged
    against them). ``cluster``: the prompt, which intervals resample."""
    if path.is_dir():
        name, out = _run_answers(path, "reference_answer" if baseline else "answer")
        return (f"{name}-reference" if baseline else name), out, 0
    rows = _read_rows(path)
    out: dict[str, tuple[Any, str, str]] = {}
    skipped, name = 0, path.stem
    for i, r in enumerate(rows):
        if "instruction" in r:  # AlpacaEval
            key, prompt, answer, field = (
                str(r["instruction"]),
                str(r["instruction"]),
                r.get("output"),
                "output",
            )
            name = str(r.get("generator", name))
        elif "question_id" in r or "uid" in r:  # MT-Bench / Arena-Hard
            key = str(r.get("question_id", r.get("uid")))
            if not questions:
                raise DataError(
                    f"{path}: MT-Bench / Arena-Hard answers need --questions (the question file they answered)"
                )
            if key not in questions:
                raise DataError(
                    f"{path}: row {i}: question_id {key!r} is not in the questions file"
                )
            prompt, field = questions[key], "choices[0].turns"
            try:
                turns = r["choices"][0]["turns"]
                answer = "\n\n".join(t["content"] if isinstance(t, dict) else str(t) for t in turns)
            except (KeyError, IndexError, TypeError):
                answer = None
            name = str(r.get("model_id", name))
        else:
            raise DataError(
                f"{path}: row {i}: neither an AlpacaEval row ('instruction', 'output') nor an answer row ('question_id', 'choices')"
            )
        if not isinstance(answer, str) or not answer.strip():
            if skip_bad:
                skipped += 1
                continue
            what = (
                f"is not text ({type(answer).__name__})"
                if answer is not None and not isinstance(answer, str)
                else "is missing, empty or only whitespace"
            )
            raise DataError(
                f"{path}: row {i}: field '{field}' {what} (--skip-bad-rows skips such rows)"
            )
        if key in out:
            raise DataError(f"{path}: row {i}: instruction {key[:60]!r} answered twice")
        out[key] = (prompt, answer, key)
    if not out:
        raise DataError(f"{path}: no answers")
    return name, out, skipped


class _FirstPosition:
    """An oracle's one-order answers ``P_A(a, b)`` (``a`` shown first) as an oracle of their
    own, so that they go through the query cache under an id of their own."""

    def __init__(self, base: Any):
        self.base = base
        self.oracle_id = f"{base.oracle_id}:first-position"
        if hasattr(base, "iter_position_probs"):
            # answers streamed into the cache as they arrive: a judge failing part-way loses
            # (and re-asks) none of them
            self.iter_prob_prefers = base.iter_position_probs
        self.stats = base.stats

    def prob_prefers(self, prompts, responses_a, responses_b):
        return self.base.position_probs(prompts, responses_a, responses_b)


def _oracle(args: Any, cache: Path) -> Any:
    from inpo.oracles.cache import CachedOracle  # deferred: loads numpy

    if args.oracle in ("reward_model", "pairwise", "gpm") and not args.model:
        raise ConfigError(f"--oracle {args.oracle} needs --model DIR")
    if args.oracle == "http" and not (args.url and args.judge_model):
        raise ConfigError("--oracle http needs --url and --judge-model")
    if args.oracle == "http":
        from inpo.oracles.http import HTTPJudgeOracle  # deferred: loads numpy

        base = HTTPJudgeOracle(args.url, args.judge_model, api_key_env=args.api_key_env)
    else:
        from inpo.training.oracle_loop import load_oracle  # deferred: loads numpy, torch, yaml

        kind = {"reward_model": "bt"}.get(args.oracle, args.oracle)
        extra = {"format": args.pairwise_format} if kind == "pairwise" else {}
        base = load_oracle(kind, args.model, **extra)
    if hasattr(base, "position_probs"):  # a positional judge: each order asked on its own
        return CachedOracle(_FirstPosition(base), cache)
    return CachedOracle(base, cache)


def judge(
    oracle: Any, prompts: list[str], model: list[str], baseline: list[str]
) -> tuple[Any, Any]:
    """``P(model ≻ baseline)`` with the model shown first and with it shown second."""
    import numpy as np

    first = np.asarray(oracle.prob_prefers(prompts, model, baseline), dtype=np.float64)
    second = 1.0 - np.asarray(oracle.prob_prefers(prompts, baseline, model), dtype=np.float64)
    return first, second


def _difficulty(path: Path | None, keys: list[str]):
    if path is None:
        return None
    import csv

    import numpy as np

    with open(path, newline="") as fh:
        table = {row[0]: row[1] for row in csv.reader(fh) if row}
    missing = [k for k in keys if k not in table]
    if missing:
        raise DataError(
            f"{path}: no difficulty for instruction {missing[0][:60]!r} ({len(missing)} missing)"
        )
    try:
        return np.array([float(table[k]) for k in keys])
    except ValueError as err:
        raise DataError(f"{path}: a difficulty is not a number ({err})") from None


#: What ``inpo eval`` writes in ``--output``: a folder holding only these is an eval folder.
_EVAL_FILES = ("eval.json", "eval.md", "win_rates.png", "oracle_cache.sqlite")


def _check_output(output: Path) -> None:
    """``--output`` is a new folder, an empty one, or an earlier ``inpo eval``'s (its judge
    cache is reused): a file, or a folder of other files that the report would sit among or
    write over, is refused before anything is read or asked."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output '{output}' is a file; name a folder for the report")
    if not output.is_dir():
        return
    names = sorted(p.name for p in output.iterdir())
    if not names or any(n in _EVAL_FILES for n in names):
        return
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    raise ConfigError(
        f"--output '{output}' is not empty and is not an inpo eval folder (it holds {shown}); "
        "the report would write among them: name a new or empty folder"
    )


def main(argv: list[str]) -> int:
    import numpy as np

    from inpo.evaluation import bradley_terry_scores, win_rate_summary  # deferred: loads numpy
    from inpo.oracles.pairwise import combine_orders

    args = _parser().parse_args(argv)
    _check_output(args.output)
    questions = _questions(args.questions)
    base_name, base, base_skipped = read_answers(
        args.baseline, questions, args.skip_bad_rows, baseline=True
    )
    models = []
    for path in args.answers:
        name, answers, skipped = read_answers(path, questions, args.skip_bad_rows)
        extra, missing = set(answers) - set(base), set(base) - set(answers)
        if args.skip_bad_rows:  # a skipped row's instruction leaves every model's comparison
            extra = {k for k in extra if k not in base}
            missing = set()
        if extra or missing:
            example = next(iter(sorted(extra or missing)))
            raise DataError(
                f"{path} and {args.baseline} answer different instructions ({len(missing)} of the "
                f"baseline's missing, {len(extra)} not in the baseline; e.g. {example[:60]!r})"
            )
        models.append((name, path, answers, skipped))
    _check_names([(m[0], m[1]) for m in models])
    args.output.mkdir(parents=True, exist_ok=True)
    oracle = _oracle(args, args.output / "oracle_cache.sqlite")
    keys = sorted(set(base).intersection(*(set(m[2]) for m in models)))
    prompts = [base[k][0] for k in keys]
    clusters = [base[k][2] for k in keys]
    difficulty = _difficulty(args.instruction_difficulty, keys)
    results, battles = {}, {}
    for name, path, answers, skipped in models:
        ours = [answers[k][1] for k in keys]
        theirs = [base[k][1] for k in keys]
        first, second = judge(oracle, prompts, ours, theirs)
        pref = combine_orders(first, 1.0 - second)  # ½[P_A(m, b) + 1 − P_A(b, m)]
        summary = win_rate_summary(
            pref,
            clusters,
            np.array([len(a) for a in ours]),
            np.array([len(a) for a in theirs]),
            difficulty=difficulty,
            samples=args.bootstrap,
            seed=args.seed,
        )
        summary["position_bias"] = float(0.5 * np.mean(first - second))
        summary["skipped_rows"] = skipped
        summary["answers"] = str(path)
        results[name] = summary
        battles[name] = (pref, clusters)
        (args.output / f"annotations.{_slug(name)}.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "instruction": k,
                        "model": name,
                        "baseline": base_name,
                        "preference": float(p),
                        "model_first": float(f),
                        "model_second": float(s),
                    }
                )
                + "\n"
                for k, p, f, s in zip(keys, pref, first, second)
            )
        )
    bt = bradley_terry_scores(battles, samples=args.bootstrap, seed=args.seed)
    for name in results:
        results[name]["bt"] = bt[name]
    report = {
        "baseline": base_name,
        "baseline_skipped_rows": base_skipped,
        "oracle": getattr(oracle, "oracle_id", args.oracle),
        "instructions": len(keys),
        # the judge's answers used, those asked of it now, and those read back from the cache
        "oracle_queries": int(oracle.stats.queries),
        "queries_sent": int(oracle.stats.extra.get("cache_misses", 0)),
        "answers_reused": int(oracle.stats.cache_hits),
        "models": results,
    }
    (args.output / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "eval.md").write_text(_markdown(report))
    _plot(report, args.output / "win_rates.png")
    print(_markdown(report).split("\n\n", 2)[1] if len(results) else "")
    print(
        f"inpo eval: {args.output / 'eval.md'}, {args.output / 'eval.json'}, {args.output / 'win_rates.png'}"
    )
    return 0


def _check_names(models: list[tuple[str, Path]]) -> None:
    """Every model gets a row and an annotations file of its own: two answer files with one
    generator name, or names that make one file name, are refused, naming both files."""
    seen: dict[str, tuple[str, Path]] = {}
    for name, path in models:
        slug = _slug(name)
        if slug in seen:
            other, other_path = seen[slug]
            same = "the same generator" if other == name else "generators"
            raise ConfigError(
                f"{other_path} and {path} have {same} '{other}'"
                + ("" if other == name else f" and '{name}'")
                + f" (one results row, one annotations.{slug}.jsonl); rename one "
                "(the 'generator' field)"
            )
        seen[slug] = (name, path)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# inpo eval: {len(report['models'])} model(s) against {report['baseline']}",
        "",
        "| model | win rate % [95% CI] | LC win rate % [95% CI] | BT score % [95% CI] | position bias | instructions |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        lo, hi = m["win_rate_ci"]
        llo, lhi = m["lc_win_rate_ci"]
        blo, bhi = m["bt"]["score_ci"]
        lines.append(
            f"| {name} | {_pct(m['win_rate'])} [{_pct(lo)}, {_pct(hi)}] | {_pct(m['lc_win_rate'])} "
            f"[{_pct(llo)}, {_pct(lhi)}] | {_pct(m['bt']['score'])} [{_pct(blo)}, {_pct(bhi)}] | "
            f"{m['position_bias']:+.3f} | {m['n']} |"
        )
    lines += [
        "",
        f"Judge: `{report['oracle']}`, each pair in both orders. Intervals: bootstrap over "
        "instructions. LC: AlpacaEval 2's GLM (length term at zero). BT: Arena-Hard's "
        "Bradley–Terry fit, as the win rate against the baseline it implies.",
        "",
    ]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the plot extra
        return
    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(names) + 2), 3.2))
    for offset, (key, label) in enumerate(
        (("win_rate", "win rate"), ("lc_win_rate", "LC win rate"))
    ):
        vals = [100 * report["models"][n][key] for n in names]
        ci = [report["models"][n][f"{key}_ci"] for n in names]
        err = [
            [v - 100 * c[0] for v, c in zip(vals, ci)],
            [100 * c[1] - v for v, c in zip(vals, ci)],
        ]
        xs = [i + (offset - 0.5) * 0.35 for i in range(len(names))]
        ax.bar(xs, vals, width=0.35, yerr=err, capsize=3, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(f"% vs {report['baseline']}")
    ax.set_ylim(0, 100)
    # the legend above the axes: inside, it covered a bar (and its interval) near 100%
    ax.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
