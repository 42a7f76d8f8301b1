"""Workloads: what ``inpo run`` runs — prompts, a reference, an oracle and an evaluation.

A *workload* is the pipeline's unit of "what to align on" (``task=`` in the config):

* ``task=default`` — :class:`DefaultWorkload`, the embedded synthetic world of
  :mod:`inpo.tasks` (a prompt grammar, 399 enumerable responses, a cyclic annotator panel),
  whose evaluation is exact;
* ``task=prompts`` — :class:`PromptFileWorkload`, TRL prompt-only data (``prompts=FILE``:
  JSONL/JSON/Parquet or a ``datasets`` folder with a ``prompt`` column), evaluated by the
  oracle's win rate against the reference on held-out prompts, with a 95% interval.

(:mod:`inpo.tasks` holds the *worlds* — environments with exact answers; a workload wraps one
for the pipeline.) Every workload gives ``describe()``, ``train_prompts()``,
``reference_model(run_dir)``, ``oracle(...)`` and a sharded evaluation:
``evaluate_shard(policy, ref, work, rank, world)`` on every rank, then
``evaluate_merge(work, world)`` on rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inpo.config import config_to_dict
from inpo.console import progress
from inpo.data import (
    Records,
    _is_saved_dataset,
    _RowError,
    check_prompt,
    encode_prompt,
    load_dataset_rows,
    read_text,
    row_place,
)
from inpo.distributed import get_dist, shard
from inpo.errors import ConfigError, DataError
from inpo.evaluation import cluster_bootstrap, win_rate_summary
from inpo.generation import GenerationSettings, sample_responses
from inpo.hub import looks_like_hub_id, resolve_model
from inpo.layout import completion_logps
from inpo.pipeline.config import AnnotateConfig, RunConfig
from inpo.pipeline.oracle import build_oracle
from inpo.pipeline.runtime import load_model
from inpo.tasks.default import DefaultTask, DefaultTaskConfig, default_cache_dir
from inpo.tasks.evaluate import PolicyTable, evaluate_tables
from inpo.tasks.panel import PanelOracle, cyclic_share, panel_prompts, pool_game
from inpo.tasks.sft import cache_problem
from inpo.vllm_backend import engine_options, vllm_generate

__all__ = [
    "RUN_DEFAULTS",
    "DefaultWorkload",
    "PromptFileWorkload",
    "Workload",
    "get_workload",
    "load_prompts",
    "prompt_sources",
    "workload_defaults",
]

#: Run settings of the default workload (precedence: paper < these < YAML < key=value): a
#: tiny model needs a larger learning rate, 1–3-word responses a larger ``eta``.
RUN_DEFAULTS: dict[str, Any] = {
    "eta": 0.35,
    "tau": 0.05,
    "beta": 0.05,
    "iterations": 3,
    "prompt_repeats": 16,
    "generate": {"k": 8, "temperature": 1.0, "max_new_tokens": 4, "batch_size": 64},
    "train": {
        "optim": {
            "learning_rate": 1e-3,
            "warmup_ratio": 0.03,
            "global_batch_size": 32,
            "per_device_batch_size": 32,
            "epochs": 2,
        },
        "data": {"max_prompt_length": 16, "max_completion_length": 8},
        "save_steps": 20,
    },
    "annotate": {"batch_size": 512},
}


def _device():
    return get_dist().device


class Workload:
    """The base of a workload. Subclasses give ``describe``, ``train_prompts``,
    ``reference_model``, ``oracle`` and either ``evaluate(policy, ref) -> metrics`` (run on
    rank 0 alone, the default below) or their own sharded ``evaluate_shard``/``evaluate_merge``.
    """

    def reference_plan(self) -> str | None:
        """What :meth:`reference_model` is about to do when it is slow (``None``: nothing)."""
        return None

    def train_prompts_for(self, iteration: int) -> list[Any]:
        """Iteration ``iteration``'s training prompts (default: the same every iteration)."""
        return self.train_prompts()

    def describe_iteration(self, iteration: int) -> dict[str, Any]:
        """What iteration ``iteration``'s generation depends on (default: :meth:`describe`)."""
        return self.describe()

    def data_plan(self) -> str | None:
        """A line on where the prompts come from, for the run's header (``None``: nothing)."""
        return None

    def evaluate(self, policy: Path, ref: Path) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def evaluate_shard(self, policy: Path, ref: Path, work: Path, rank: int, world: int) -> None:
        """Rank 0 evaluates; the others wait (override to shard a large evaluation)."""
        if rank == 0:
            metrics = self.evaluate(policy, ref)
            (work / "eval.rank000.json").write_text(json.dumps(metrics))

    def evaluate_merge(self, work: Path, world: int) -> dict[str, Any]:
        path = work / "eval.rank000.json"
        metrics = json.loads(path.read_text())
        path.unlink()
        return metrics


def load_prompts(
    path: str | Path, *, split: str | None = None, config: str | None = None, key: str = "prompts"
) -> list[Any]:
    """Prompts in TRL's prompt-only format: a ``prompt`` column (text or a message list), from
    a JSONL/JSON/Parquet file, a ``save_to_disk`` folder, a folder of data files or a hub
    dataset in the local cache (``split``/``config`` for those two, via ``load_dataset``)."""

    original = str(path)
    path = Path(path)
    if looks_like_hub_id(original) or (path.is_dir() and not _is_saved_dataset(path)):
        rows = load_dataset_rows(original, config=config, split=split, key=key)
    elif path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if hasattr(data, "keys") and not hasattr(data, "column_names"):
            data = data[next(iter(data.keys()))]
        rows = list(data)
    elif path.suffix in (".jsonl", ".json"):
        text = read_text(path)
        rows = []
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = Records()
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise DataError(f"{path}: line {number}: not valid JSON ({err})") from err
                rows.lines.append(number)
    elif path.suffix == ".parquet":
        from datasets import Dataset

        rows = list(Dataset.from_parquet(str(path)))
    else:
        raise DataError(f"{path}: prompts must be .jsonl, .json, .parquet or a datasets folder")

    prompts = Records()
    prompts.lines = list(getattr(rows, "lines", []))  # row i of the file is prompt i
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{path}: {row_place(rows, i)}: missing field 'prompt'")
        try:
            prompts.append(check_prompt(row["prompt"], "prompt"))
        except _RowError as err:
            raise DataError(
                f"{path}: {row_place(rows, i)}: field '{err.field}': {err.message}"
            ) from None
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def prompt_sources(value: str | list[str]) -> list[str]:
    """``prompts=`` as a list of sources: a YAML list, or one string (commas separate several
    unless the whole string names an existing path)."""
    if isinstance(value, list):
        return [str(v) for v in value if str(v).strip()]
    if not value:
        return []
    if "," in value and not Path(value).exists():
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def _as_list(value: str | list[str] | None, n: int) -> list[str | None]:
    """A per-source setting (one value for all, or one per source)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [value] * max(n, 1)


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class PromptFileWorkload(Workload):
    """Prompts from files (one a iteration, cycling), any oracle backend, evaluation by win rate
    against the reference on held-out prompts.

    The data schedule (the INPO paper trains each iteration on fresh prompts): ``prompts`` is one
    source or a list, iteration ``t`` taking source ``t mod n`` (``prompts_split`` likewise, one
    split or one a source), its first ``max_prompts``. ``eval_prompts`` are held out: an error if
    any of them is a training prompt. Without ``eval_prompts`` the last ``evaluate.num_prompts``
    prompts of the first source (at most half of it) are held out of every iteration's
    training.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.sources = prompt_sources(cfg.prompts)
        if not self.sources:
            raise ConfigError("task=prompts needs prompts=FILE (TRL prompt-only format)")
        if not cfg.policy and not cfg.reference:
            raise ConfigError("task=prompts needs reference=MODEL_DIR (and optionally policy=)")
        if cfg.annotate.oracle in ("task", "task_bt") and type(self) is PromptFileWorkload:
            raise ConfigError(
                f"annotate.oracle={cfg.annotate.oracle}: task=prompts has no oracle of its own; "
                "set annotate.oracle=reward_model, pairwise, gpm (with annotate.model=...) or http"
            )
        splits = _as_list(cfg.prompts_split, len(self.sources))
        if len(splits) != len(self.sources):
            raise ConfigError(
                f"prompts_split has {len(splits)} splits for {len(self.sources)} prompt sources; "
                "give one split, or one a source"
            )
        self.splits = splits
        self._loaded: dict[int, list[Any]] = {}
        self._eval = (
            load_prompts(
                cfg.eval_prompts,
                split=cfg.eval_prompts_split,
                config=cfg.dataset_config,
                key="eval_prompts",
            )
            if cfg.eval_prompts
            else None
        )
        self.skipped = 0
        if self._eval is not None:
            self._eval = self._fit_model(self._eval, cfg.eval_prompts)
        self.held_out: set[str] = set()
        n_eval = cfg.evaluate.num_prompts
        if self._eval is None:  # hold the first source's last prompts out of training
            first = self._source(0)
            n_eval = min(n_eval, len(first) // 2)  # at most half the file
            if n_eval < 1:
                raise ConfigError(
                    f"prompts '{self.sources[0]}' has {len(first)} prompt: none can be held out "
                    "for evaluation; set eval_prompts=FILE (held-out prompts)"
                )
            self._eval = first[-n_eval:]
            self.held_out = {_prompt_key(x) for x in self._eval}
        else:
            evals = {_prompt_key(x) for x in self._eval[:n_eval]}
            for i, source in enumerate(self.sources):
                clash = evals & {_prompt_key(x) for x in self._source(i)}
                if clash:
                    raise ConfigError(
                        f"eval_prompts '{cfg.eval_prompts}' shares {len(clash)} prompt(s) with "
                        f"the training prompts '{source}' (e.g. {sorted(clash)[0][:60]!r}); "
                        "held-out prompts must never be trained on"
                    )
        self._oracle = None
        self._ref_samples: dict[Any, tuple[list[list[str]], list[list[bool]]]] = {}
        self._logps: dict[tuple[str, str, str, bool], float] = {}

    def _source(self, i: int) -> list[Any]:
        if i not in self._loaded:
            prompts = load_prompts(
                self.sources[i],
                split=self.splits[i],
                config=self.cfg.dataset_config,
                key="prompts",
            )
            self._loaded[i] = self._fit_model(prompts, self.sources[i])
        return self._loaded[i]

    def _tokenizer_and_context(self) -> tuple[Any, int | None, str]:
        if not hasattr(self, "_tok"):
            from transformers import AutoConfig, AutoTokenizer

            name = self.cfg.policy or self.cfg.reference
            key = "policy" if self.cfg.policy else "reference"
            path = resolve_model(name, key)
            self._tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
            self._ctx = getattr(config, "max_position_embeddings", None)
            self._model_name = name
        return self._tok, self._ctx, self._model_name

    def _fit_model(self, prompts: list[Any], source: str) -> list[Any]:
        """Every prompt checked against the policy before any model loads: a conversation needs
        a chat template; a prompt must be at least one token (a tokenizer that does not know the
        text can make nothing of it) and fit the context with room for one more. A bad row is
        an error naming the file and row, or (``skip_bad_rows``) skipped and counted."""

        tok, ctx, name = self._tokenizer_and_context()
        template = getattr(tok, "chat_template", None) is not None
        kept = []
        for i, prompt in enumerate(prompts):
            problem = None
            if isinstance(prompt, list) and not template:
                problem = f"a conversation, but the tokenizer of '{name}' has no chat template"
            else:
                n = len(encode_prompt(tok, prompt))
                if n == 0:
                    problem = f"no tokens: the tokenizer of '{name}' makes nothing of it"
                elif ctx is not None and n >= ctx:
                    problem = (
                        f"{n} tokens, longer than the context of '{name}' "
                        f"({ctx} positions, one needed for the answer)"
                    )
            if problem is None:
                kept.append(prompt)
            elif self.cfg.skip_bad_rows:
                self.skipped += 1
            else:
                raise DataError(
                    f"{source}: {row_place(prompts, i)}: field 'prompt': {problem} "
                    "(skip_bad_rows=true skips such rows, counted)"
                )
        if not kept:
            raise DataError(f"{source}: every prompt was skipped ({len(prompts)})")
        return kept

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "task": "prompts",
            "prompts": c.prompts,
            "eval": c.eval_prompts,
            # only when set, so the stage hashes of runs from before these keys stay the same
            **({"prompts_split": c.prompts_split} if c.prompts_split else {}),
            **({"eval_prompts_split": c.eval_prompts_split} if c.eval_prompts_split else {}),
            **({"dataset_config": c.dataset_config} if c.dataset_config else {}),
            **({"held_out": "last"} if not c.eval_prompts else {}),
        }

    def describe_iteration(self, iteration: int) -> dict[str, Any]:
        """What iteration ``iteration`` trains on (its source alone: adding a source for later
        iterations leaves the earlier ones' stages as they are)."""
        if len(self.sources) == 1:
            return self.describe()
        i = iteration % len(self.sources)
        return {
            **self.describe(),
            "prompts": self.sources[i],
            "prompts_split": self.splits[i],
            "source": i,
        }

    def train_prompts(self) -> list[Any]:
        return self.train_prompts_for(0)

    def train_prompts_for(self, iteration: int) -> list[Any]:
        prompts = self._source(iteration % len(self.sources))
        if self.held_out:
            prompts = [x for x in prompts if _prompt_key(x) not in self.held_out]
        return list(prompts)

    def data_plan(self) -> str:
        """One line on where training and evaluation prompts come from."""
        n = len(self.sources)
        src = (
            f"{n} prompt sources, one an iteration (cycling)"
            if n > 1
            else f"prompts {self.sources[0]}"
        )
        if self.held_out:
            ev = (
                f"the last {len(self._eval)} of {self.sources[0]} held out for evaluation "
                f"(evaluate.num_prompts={self.cfg.evaluate.num_prompts}, at most half the "
                "file; eval_prompts=FILE to choose them)"
            )
        else:
            ev = f"{len(self.eval_prompts())} held-out prompts from {self.cfg.eval_prompts}"
        skipped = f"; {self.skipped} bad prompts skipped" if self.skipped else ""
        return f"[data] {src}; {ev}{skipped}"

    def eval_prompts(self) -> list[Any]:
        return self._eval[: self.cfg.evaluate.num_prompts]

    def evaluation_settings(self) -> dict[str, Any]:
        """What the evaluation reads beyond the evaluate section: the judge (the annotate
        oracle's probabilities) and the sampling settings of the answers it judges."""
        a, g = self.cfg.annotate, self.cfg.generate
        judge: dict[str, Any] = {"oracle": a.oracle}
        if a.oracle == "http":
            judge.update(url=a.url, judge_model=a.judge_model)
        elif a.oracle not in ("task", "task_bt"):
            judge["model"] = a.model
        if a.oracle == "pairwise":
            judge["pairwise_format"] = a.pairwise_format
        sampling = {"temperature": g.temperature, "top_p": g.top_p,
                    "max_new_tokens": g.max_new_tokens, "backend": g.backend,
                    **({"enforce_eager": True} if g.enforce_eager else {})}  # fmt: skip
        return {"judge": judge, "sampling": sampling}

    def reference_model(self, run_dir: Path) -> Path:
        return Path(self.cfg.reference or self.cfg.policy)

    def oracle(self, acfg: AnnotateConfig, *, cache: Path, rank=0, world=1, device=None):
        self._oracle = build_oracle(
            acfg, cache, seed=self.cfg.seed, rank=rank, world=world, device=device
        )
        return self._oracle

    def _answers(
        self, path: Path, prompts: list[Any], k: int, settings: Any, seed: int, who: str,
        loaded: Any = None,
    ):  # fmt: skip
        """``(answers, cut)``: ``k`` answers a prompt from the model in ``path`` and their
        cut-at-``max_new_tokens`` flags, with the configured generation backend (vLLM's engine in
        its own process when ``generate.backend=vllm``, kept between stages on a CPU:
        :mod:`inpo.vllm_backend`; ``loaded``: the ``(model, tokenizer)`` already in memory for
        transformers)."""

        g = self.cfg.generate
        if g.backend == "vllm":
            import tempfile

            with tempfile.TemporaryDirectory(prefix="inpo-eval-") as tmp:
                samples, cut, _ = vllm_generate(
                    path, prompts, list(range(len(prompts))), k, settings, seed=seed,
                    work_dir=Path(tmp), **engine_options(g),
                )  # fmt: skip
            return samples, cut

        model, tok = loaded if loaded is not None else load_model(path, _device())
        cut: list[list[bool]] = []
        with progress(len(prompts), f"evaluate ({who}'s answers)", unit=" prompts") as bar:
            answers = sample_responses(
                model, tok, prompts, k, settings, seed=seed, progress=bar.update, truncated=cut
            )
        return answers, cut

    def evaluate(self, policy: Path, ref: Path) -> dict[str, Any]:
        """Win rate of one sample of π_t against one of π_ref per held-out prompt, by the
        oracle; response lengths; a Monte-Carlo KL estimate ``E_{y~π_t}[log π_t − log π_ref]``.
        The answers are sampled with the configured backend (``generate.backend``)."""
        import numpy as np
        import torch

        prompts = self.eval_prompts()
        g = self.cfg.generate
        settings = GenerationSettings(g.temperature, g.top_p, g.max_new_tokens, g.batch_size)
        k = self.cfg.evaluate.k

        vllm = g.backend == "vllm"  # sample first: on a GPU its engine leaves before the load
        answered = self._answers(policy, prompts, k, settings, 12345, "π_t") if vllm else None
        model, tok = load_model(policy, _device())
        if answered is None:
            answered = self._answers(policy, prompts, k, settings, 12345, "π_t", (model, tok))
        ys, cut = answered
        flat_p = [p for p, rs in zip(prompts, ys) for _ in rs]
        flat_y = [y for rs in ys for y in rs]
        # the KL's samples scored as they were sampled (a cut one without an end token)
        ended = [not c for cs in cut for c in cs]
        lp_pol = completion_logps(model, tok, flat_p, flat_y, ended=ended)
        del model
        # π_ref's answers do not change between iterations (a fixed seed): sampled once a run
        key = (str(Path(ref).resolve()), repr(prompts), k, repr(settings), g.backend)
        if vllm and key not in self._ref_samples:
            self._ref_samples[key] = self._answers(ref, prompts, k, settings, 54321, "π_ref")
        ref_model, ref_tok = load_model(ref, _device())
        if key not in self._ref_samples:
            self._ref_samples[key] = self._answers(
                ref, prompts, k, settings, 54321, "π_ref", (ref_model, ref_tok)
            )
        yr, ref_cut = self._ref_samples[key]
        lp_ref = completion_logps(ref_model, ref_tok, flat_p, flat_y, ended=ended)
        del ref_model
        for path, lp in ((policy, lp_pol), (ref, lp_ref)):  # for the pool game (task=panel)
            remember_logps(self._logps, path, flat_p, flat_y, ended, lp)
        flat_r = [y for rs in yr for y in rs]
        # the answers judged, for `inpo eval --answers RUN/iter_00t` (written by evaluate_shard)
        self._judged = [
            {"prompt": p, "sample": j, "answer": y, "reference_answer": r,
             "truncated": c, "reference_truncated": rc}
            for (p, rs, refs, cs, rcs) in zip(prompts, ys, yr, cut, ref_cut)
            for j, (y, r, c, rc) in enumerate(zip(rs, refs, cs, rcs))
        ]  # fmt: skip
        # P(π_t's answer ≻ π_ref's) from the oracle's probabilities, asked in both orders
        # (½[P(y ≻ r) + 1 − P(r ≻ y)]: a judge's position bias cancels): π_ref against itself
        # reads ½ in expectation, never a sampled 0/1 label (annotate.labels is for training)
        judge = getattr(self._oracle, "probabilities", self._oracle)
        first = np.asarray(judge.prob_prefers(flat_p, flat_y, flat_r), dtype=np.float64)
        second = np.asarray(judge.prob_prefers(flat_p, flat_r, flat_y), dtype=np.float64)
        probs = 0.5 * (first + 1.0 - second)
        lengths = [len(tok(y, add_special_tokens=False)["input_ids"]) for y in flat_y]
        # intervals bootstrapped over prompts: the k answers of a prompt are not independent;
        # the LC win rate from answer lengths in characters, as AlpacaEval counts them
        held = [i for i, rs in enumerate(ys) for _ in rs]
        stats = win_rate_summary(
            probs,
            held,
            np.array([len(y) for y in flat_y]),
            np.array([len(y) for y in flat_r]),
            samples=1000,
            seed=0,
        )
        # the estimate is unbiased but can fall below 0: its interval says how far it is from
        # 0 on this many prompts (bootstrapped over prompts, as the win rates)
        log_ratio = (lp_pol - lp_ref).double().cpu().numpy()
        kl_ci = cluster_bootstrap(lambda i: log_ratio[i].mean(), len(log_ratio), held, seed=0)
        return {
            "win_rate_vs_ref": stats["win_rate"],
            "win_rate_ci": stats["win_rate_ci"],
            "lc_win_rate_vs_ref": stats["lc_win_rate"],
            "lc_win_rate_ci": stats["lc_win_rate_ci"],
            "kl_to_ref": float(torch.mean(lp_pol - lp_ref)),
            "kl_to_ref_ci": list(kl_ci),
            "mean_length": sum(lengths) / len(lengths),
            "eval_prompts": len(prompts),
        }

    def evaluate_shard(self, policy: Path, ref: Path, work: Path, rank: int, world: int) -> None:
        super().evaluate_shard(policy, ref, work, rank, world)
        if rank == 0:  # π_t's and π_ref's answers, paired: what `inpo eval` reads of a run
            with open(work / "answers.jsonl", "w") as fh:
                for row in getattr(self, "_judged", []):
                    fh.write(json.dumps(row) + "\n")


class DefaultWorkload(Workload):
    """The embedded default world: prompts, a cached SFT reference, the annotator panel (or its
    Bradley–Terry fit, ``annotate.oracle=task_bt``) and exact evaluation on held-out prompts."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.task = DefaultTask(DefaultTaskConfig(seed=0, tau=cfg.tau_value, eta=cfg.eta))
        self._ref_tables: dict[Any, Any] = {}

    def describe(self) -> dict[str, Any]:
        return {"task": "default", "config": config_to_dict(self.task.config)}

    def train_prompts(self) -> list[str]:
        return list(self.task.prompts_train)

    def reference_model(self, run_dir: Path) -> Path:
        return self.task.build_reference()

    def reference_plan(self) -> str | None:
        key = self.task.reference_key()
        folder = default_cache_dir() / f"default-{key}"
        if cache_problem(folder, key) is None:
            return None
        return f"building π_ref (a tiny Llama fine-tuned on the task; once, cached in {folder})"

    def oracle(self, acfg: AnnotateConfig, *, cache: Path, rank=0, world=1, device=None):
        base = self.task.bt_reward_oracle() if acfg.oracle == "task_bt" else self.task.panel()
        return build_oracle(
            acfg, cache, task_oracle=base, seed=self.cfg.seed, rank=rank, world=world
        )

    def _ref_table(self, ref: Path, prompts: list[str]):
        key = (str(ref), tuple(prompts))
        if key not in self._ref_tables:
            model, tok = self.task.load_reference(ref)
            self._ref_tables[key] = self.task.policy_table(model, tok, prompts)
        return self._ref_tables[key]

    def evaluate_shard(self, policy: Path, ref: Path, work: Path, rank: int, world: int) -> None:
        """The exact tables ``log π_t(y|x)`` and ``log π_ref(y|x)`` of this rank's share of the
        held-out prompts (every response enumerated), saved for :meth:`evaluate_merge`."""
        import numpy as np

        prompts = self.task.prompts_eval
        mine = shard(prompts, rank, world)
        if not mine:
            return
        sub = [prompts[i] for i in mine]
        ref_table = self._ref_table(ref, sub)
        if Path(policy).resolve() == Path(ref).resolve():  # π_0 = π_ref: the same table
            table = ref_table
        else:
            model, tok = self.task.load_reference(policy)
            table = self.task.policy_table(model, tok, sub)
        np.savez(
            work / f"eval.rank{rank:03d}.npz",
            indices=np.asarray(mine),
            logps=table.logps,
            ref_logps=ref_table.logps,
        )

    def evaluate_merge(self, work: Path, world: int) -> dict[str, Any]:
        """Exact metrics on the held-out prompts (:func:`inpo.tasks.evaluate.evaluate_tables`)."""
        import numpy as np

        prompts = self.task.prompts_eval
        n = len(self.task.responses())
        logps, ref_logps = np.full((len(prompts), n), np.nan), np.full((len(prompts), n), np.nan)
        files = sorted(work.glob("eval.rank*.npz"))
        for f in files:
            with np.load(f) as part:
                logps[part["indices"]] = part["logps"]
                ref_logps[part["indices"]] = part["ref_logps"]
        if np.isnan(logps).any() or np.isnan(ref_logps).any():
            raise DataError(f"{work}: the evaluation shards do not cover every held-out prompt")
        for f in files:
            f.unlink()
        responses = self.task.responses()
        return evaluate_tables(
            self.task.preference_matrix(prompts),
            PolicyTable(list(prompts), responses, logps),
            PolicyTable(list(prompts), responses, ref_logps),
            tau=self.task.config.tau,
            lengths=self.task.lengths,
        )


def real_model_dir() -> Path:
    """Where ``make real-model`` puts SmolLM2-135M-Instruct: ``$INPO_CACHE_DIR/models/…`` or
    ``~/.cache/inpo/models/…`` (``inpo`` never downloads it)."""

    return default_cache_dir().parent / "models" / "SmolLM2-135M-Instruct"


#: Run settings of ``task=panel`` (a 135M chat model on CPU): short answers, a handful of
#: prompts an iteration, a learning rate a real model moves with in a few steps.
PANEL_DEFAULTS: dict[str, Any] = {
    "iterations": 3,
    "max_prompts": 32,
    "generate": {"k": 4, "temperature": 0.8, "max_new_tokens": 48, "batch_size": 16},
    "train": {
        "optim": {
            "learning_rate": 5e-6,
            "global_batch_size": 8,
            "per_device_batch_size": 4,
            "epochs": 2,
        },
        "data": {"max_prompt_length": 128, "max_completion_length": 64},
    },
    "evaluate": {"num_prompts": 24, "k": 2},
}


class PanelWorkload(PromptFileWorkload):
    """``task=panel``: SmolLM2 (or ``reference=`` a chat model) on the 240 everyday prompts of
    :mod:`inpo.tasks.panel`, labelled by its three-group text panel (``annotate.oracle=task``,
    the default; any other oracle may label instead), evaluated by the win rate against π_ref
    from the panel's probabilities and by the pool-restricted duality gap of π_t against π_ref.
    Iteration ``t`` trains on fresh prompts: the training split rotated by ``t·max_prompts``."""

    def __init__(self, cfg: RunConfig):
        if not cfg.reference and not cfg.policy:
            folder = real_model_dir()
            if not (folder / "config.json").is_file():
                raise ConfigError(
                    f"task=panel runs SmolLM2-135M-Instruct from {folder}, which is not there: "
                    "build it once with `make real-model` (or set reference=MODEL_DIR, a chat model)"
                )
            cfg.reference = str(folder)
        self.cfg = cfg
        self.sources = ["panel"]
        self.splits = [None]
        self.skipped = 0
        self.held_out: set[str] = set()
        self._loaded = {0: self._fit_model(panel_prompts("train"), "the panel's training prompts")}
        self._eval = self._fit_model(panel_prompts("test"), "the panel's held-out prompts")
        self._oracle = None
        self._ref_samples = {}
        self._logps = {}
        self.panel = PanelOracle()

    def describe(self) -> dict[str, Any]:
        return {"task": "panel", "oracle_id": self.panel.oracle_id}

    def describe_iteration(self, iteration: int) -> dict[str, Any]:
        return {**self.describe(), "offset": self._offset(iteration)}

    def _offset(self, iteration: int) -> int:
        n = len(self._loaded[0])
        return (iteration * (self.cfg.max_prompts or n)) % n

    def train_prompts_for(self, iteration: int) -> list[Any]:
        prompts = self._loaded[0]
        at = self._offset(iteration)
        return prompts[at:] + prompts[:at]

    def data_plan(self) -> str:
        n = self.cfg.max_prompts or len(self._loaded[0])
        return (
            f"[data] task=panel: {n} of its {len(self._loaded[0])} training prompts an iteration "
            f"(fresh each iteration, cycling), {len(self.eval_prompts())} of its "
            f"{len(self._eval)} held-out prompts for evaluation"
        )

    def oracle(self, acfg: AnnotateConfig, *, cache: Path, rank=0, world=1, device=None):
        self._oracle = build_oracle(
            acfg, cache, task_oracle=self.panel, seed=self.cfg.seed, rank=rank, world=world,
            device=device,
        )  # fmt: skip
        return self._oracle

    def evaluate(self, policy: Path, ref: Path) -> dict[str, Any]:
        """The prompts task's metrics (win rate from probabilities in both orders, KL, length)
        and, on each held-out prompt's pool of π_t's and π_ref's answers, the pool-restricted
        duality gap and exploitability of both (:func:`inpo.tasks.panel.pool_game`), and the
        share of the pool's triples on which the panel's majority is cyclic."""

        metrics = super().evaluate(policy, ref)
        pools = answer_pools(self._judged)
        models = {"policy": policy, "reference": ref}
        scores = pool_metrics(
            pools, models, "reference", self.panel, self.cfg.tau_value, known=self._logps
        )
        share, _ = cyclic_share(self.panel, [x for x, _, _ in pools], [ys for _, ys, _ in pools])
        return {
            **metrics,
            "pool_duality_gap": scores["policy"]["pool_duality_gap"],
            "pool_duality_gap_ci": scores["policy"]["pool_duality_gap_ci"],
            "pool_exploitability": scores["policy"]["pool_exploitability"],
            "ref_pool_duality_gap": scores["reference"]["pool_duality_gap"],
            "cyclic_triples": share,
        }


def answer_pools(rows: list[dict[str, Any]]) -> list[tuple[Any, list[str], list[bool]]]:
    """Each prompt's pool: its distinct answers across ``rows`` (``answers.jsonl`` rows of one
    or more evaluations: ``answer``, ``reference_answer`` and their ``truncated`` flags), with
    whether each ended — ``(prompt, answers, ended)`` in order of first appearance."""
    pools: dict[str, tuple[Any, list[str], list[bool]]] = {}
    for row in rows:
        key = json.dumps(row["prompt"], sort_keys=True)
        _, pool, ended = pools.setdefault(key, (row["prompt"], [], []))
        for y, cut in (
            (row["answer"], row.get("truncated", False)),
            (row["reference_answer"], row.get("reference_truncated", False)),
        ):
            if y not in pool:
                pool.append(y)
                ended.append(not cut)
    return list(pools.values())


def _logp_keys(path: Path, prompts, answers, ended) -> list[tuple[str, str, str, bool]]:
    model = str(Path(path).resolve())
    return [
        (model, json.dumps(x, sort_keys=True), y, bool(e))
        for x, y, e in zip(prompts, answers, ended)
    ]


def remember_logps(known: dict, path: Path, prompts, answers, ended, logps) -> None:
    """Put the model in ``path``'s log-probs of ``answers`` in ``known`` (a model's folder is
    not rewritten while a run uses it, so its scores stay valid)."""
    known.update(zip(_logp_keys(path, prompts, answers, ended), logps.tolist()))


def pool_metrics(
    pools: list[tuple[Any, list[str], list[bool]]],
    models: dict[str, Path],
    ref: str,
    panel: Any,
    tau: float,
    *,
    known: dict | None = None,
) -> dict[str, dict[str, Any]]:
    """Per model, the mean over prompts of the pool-restricted duality gap (with a 95% bootstrap
    interval over prompts) and exploitability: every model scores every pool answer exactly, as
    it was sampled (a cut answer without an end token), then :func:`inpo.tasks.panel.pool_game`
    on each prompt's pool with ``models[ref]`` as the regularising reference."""
    import numpy as np

    flat_p = [x for x, ys, _ in pools for _ in ys]
    flat_y = [y for _, ys, _ in pools for y in ys]
    flat_e = [e for _, _, es in pools for e in es]
    known = {} if known is None else known
    logps = {}
    for name, path in models.items():
        keys = _logp_keys(path, flat_p, flat_y, flat_e)
        miss = [i for i, k in enumerate(keys) if k not in known]
        if miss:  # only what no earlier step scored
            model, tok = load_model(path, _device())
            pick = [flat_p[i] for i in miss], [flat_y[i] for i in miss], [flat_e[i] for i in miss]
            lp = completion_logps(model, tok, pick[0], pick[1], ended=pick[2])
            remember_logps(known, path, *pick, lp.double())
            del model
        logps[name] = np.array([known[k] for k in keys], dtype=np.float64)
    gaps: dict[str, list[float]] = {n: [] for n in models}
    expl: dict[str, list[float]] = {n: [] for n in models}
    at = 0
    for x, ys, _ in pools:
        span = slice(at, at + len(ys))
        at += len(ys)
        lps = {n: lp[span] for n, lp in logps.items()}
        for n, g in pool_game(panel.preference_matrix(x, ys), lps, ref, tau).items():
            gaps[n].append(g["pool_duality_gap"])
            expl[n].append(g["pool_exploitability"])
    out = {}
    for n in models:
        gap = np.array(gaps[n])
        ci = cluster_bootstrap(
            lambda i, g=gap: g[i].mean(), len(gap), list(range(len(gap))), seed=0
        )
        out[n] = {
            "pool_duality_gap": float(gap.mean()),
            "pool_duality_gap_ci": [round(float(c), 6) for c in ci],
            "pool_exploitability": float(np.mean(expl[n])),
        }
    return out


def get_workload(cfg: RunConfig):
    """The workload named by ``cfg.task``."""
    if cfg.task == "default":
        return DefaultWorkload(cfg)
    if cfg.task == "prompts":
        return PromptFileWorkload(cfg)
    if cfg.task == "panel":
        return PanelWorkload(cfg)
    raise ConfigError(f"task must be 'default', 'prompts' or 'panel', got '{cfg.task}'")


def workload_defaults(task: str) -> dict[str, Any]:
    """The run-config values a workload prefers over the paper's (applied before the YAML)."""
    return {"default": RUN_DEFAULTS, "panel": PANEL_DEFAULTS}.get(task, {})
