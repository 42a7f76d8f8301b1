"""The embedded default task of ``inpo run``: runs anywhere in minutes, no download, no GPU.

A prompt grammar (:mod:`inpo.tasks.grammar`, 54 prompts such as ``"describe a red circle"``,
split into train and held-out prompts), an enumerable response space (1–3 words over 7 words:
399 responses), a cyclic annotator panel with label noise as the oracle, a tiny Llama turned into
``π_ref`` by a short supervised fine-tune (:mod:`inpo.tasks.sft`, cached on disk), a
Bradley–Terry reward oracle fitted to the panel (:mod:`inpo.tasks.bt`), and EXACT evaluation of
any LM (:mod:`inpo.tasks.evaluate`)::

    task = DefaultTask(DefaultTaskConfig(seed=0))
    ref_path = task.build_reference("~/.cache/inpo/tasks")       # ~10 s on 2 CPU cores, once
    model, tok = task.load_reference()
    samples = task.sample(model, tok, task.prompts_train, k=8, seed=1)
    oracle = task.panel()                                          # or task.bt_reward_oracle()
    ...train π_{t+1} with INPO...
    task.evaluate(model_t, tok)   # duality_gap, exploitability, win_rate_vs_ref, kl_to_ref, ...

Defaults ``τ = 0.05``, ``η = 0.15`` (``τ = η/3`` as in the INPO paper). The paper's LLM value
``η = 0.005`` would ask for log-ratio differences of ``1/(2η) = 100`` nats; on this task the exact
INPO iteration at ``η = 0.15`` cuts ``π_ref``'s duality gap by about 60% per iteration
(:meth:`DefaultTask.tabular_inpo`), a reachable target for the LM pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inpo.config import config_hash, config_to_dict
from inpo.data import encode_completion, encode_prompt
from inpo.errors import ConfigError
from inpo.tasks.bt import BTRewardOracle, fit_bt_rewards
from inpo.tasks.evaluate import PolicyTable, evaluate_tables, policy_table, sample_responses
from inpo.tasks.grammar import GRAMMAR_VERSION, Grammar, enumerate_responses, panel_matrices
from inpo.tasks.sft import cached_build, task_tokenizer, train_sft
from inpo.tiny import tiny_causal_lm

__all__ = ["DefaultTask", "DefaultTaskConfig", "default_cache_dir"]

TASK_VERSION = "2"


def default_cache_dir() -> Path:
    """``$INPO_CACHE_DIR/tasks`` or ``~/.cache/inpo/tasks``."""
    root = os.environ.get("INPO_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "inpo") / "tasks"


@dataclass
class DefaultTaskConfig:
    """Everything that defines the default task (``key=value`` overridable via ``inpo.config``).

    Grammar: ``colors`` × ``shapes`` × 6 templates; responses of 1..``max_len`` words over
    ``colors + shapes + fillers`` (the keyword of a prompt is its colour or its shape). The
    prompts are shuffled with ``seed``; the first ``n_eval_prompts`` are held out, the next
    ``n_train_prompts`` (``None``: all the rest) are for training.

    Oracle: the panel (brevity, prompt keyword, reverse alphabetical order) with
    ``panel_weights`` in that order and label noise ``noise`` (``ε``).

    Game: KL strength ``tau`` (``τ``) and INPO's ``eta`` (``η``), shared by every algorithm.

    Reference: a tiny Llama (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``)
    fine-tuned ``sft_steps`` AdamW steps of ``sft_batch_size`` pairs at ``sft_learning_rate`` on
    responses with word counts drawn from ``sft_length_probs`` (``None``: uniform over
    ``1..max_len``) and words uniformly.
    """

    seed: int = 0
    colors: list[str] = field(default_factory=lambda: ["red", "blue", "green"])
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "star"])
    fillers: list[str] = field(default_factory=lambda: ["very"])
    max_len: int = 3
    n_eval_prompts: int = 12
    n_train_prompts: int | None = None
    noise: float = 0.1
    panel_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    tau: float = 0.05
    eta: float = 0.15
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    sft_length_probs: list[float] | None = None
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4

    def validate(self) -> None:
        """Raise :class:`~inpo.errors.ConfigError` naming the first bad key."""
        if not 1 <= self.max_len <= 3:
            raise ConfigError(
                f"max_len={self.max_len}; must be in 1..3 (a few hundred enumerable responses)"
            )
        if self.n_eval_prompts < 1:
            raise ConfigError(f"n_eval_prompts={self.n_eval_prompts}; must be >= 1")
        if self.n_train_prompts is not None and self.n_train_prompts < 1:
            raise ConfigError(f"n_train_prompts={self.n_train_prompts}; must be >= 1 or None")
        if not 0.0 < self.noise <= 0.5:
            raise ConfigError(f"noise={self.noise}; must be in (0, 0.5] (the BT fit needs > 0)")
        if len(self.panel_weights) != 3 or any(not w > 0 for w in self.panel_weights):
            raise ConfigError(
                f"panel_weights={self.panel_weights}; need 3 positive weights "
                "(brevity, keyword, order)"
            )
        if not (self.eta > 0 and 0 < self.tau <= self.eta):
            raise ConfigError(f"tau={self.tau}, eta={self.eta}; need 0 < tau <= eta")
        for key in ("sft_steps", "sft_batch_size", "hidden_size", "num_hidden_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}; must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not self.sft_learning_rate > 0:
            raise ConfigError(f"sft_learning_rate={self.sft_learning_rate}; must be > 0")
        probs = self.sft_length_probs
        if probs is not None and (
            len(probs) != self.max_len or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6
        ):
            raise ConfigError(
                f"sft_length_probs={probs}; need {self.max_len} non-negative numbers summing to 1"
            )


class DefaultTask:
    """The default task built from a :class:`DefaultTaskConfig` (see the module docstring)."""

    def __init__(self, config: DefaultTaskConfig | None = None) -> None:
        config = config if config is not None else DefaultTaskConfig()
        config.validate()
        self.config = config
        self.grammar = Grammar(config.colors, config.shapes, config.fillers)
        prompts = self.grammar.prompts
        n_eval = config.n_eval_prompts
        n_train = config.n_train_prompts
        if n_train is None:
            n_train = len(prompts) - n_eval
        if n_eval + n_train > len(prompts) or n_train < 1:
            raise ConfigError(
                f"n_eval_prompts={n_eval} + n_train_prompts={config.n_train_prompts} exceeds the "
                f"grammar's {len(prompts)} prompts (or leaves none for training)"
            )
        order = np.random.default_rng(config.seed).permutation(len(prompts))
        eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval : n_eval + n_train])
        self.prompts_eval: list[str] = [prompts[i] for i in eval_idx]
        self.prompts_train: list[str] = [prompts[i] for i in train_idx]
        self._responses = enumerate_responses(self.grammar.vocab, config.max_len)
        self.lengths = np.array([len(r.split()) for r in self._responses])
        self.reference_path: Path | None = None
        self.reference_built = False  # True when the last build_reference call trained
        self._panel = None
        self._bt: BTRewardOracle | None = None
        self._ref_tables: dict[tuple[str, ...], PolicyTable] = {}
        self._nash: dict[int, tuple[PolicyTable, np.ndarray]] = {}

    # -----------------------------------------------------------------------------------------
    # The game
    # -----------------------------------------------------------------------------------------

    @property
    def prompts(self) -> list[str]:
        """Every prompt of the task: training prompts, then held-out ones."""
        return [*self.prompts_train, *self.prompts_eval]

    def responses(self, prompt: str | None = None) -> list[str]:
        """The enumerable responses (the same ``N`` for every prompt; ``prompt`` is checked)."""
        if prompt is not None:
            self.grammar.keyword_of(prompt)
        return list(self._responses)

    def panel(self):
        """The :class:`~inpo.oracles.synthetic.AnnotatorPanel` oracle (seeded with the task's)."""
        if self._panel is None:
            c = self.config
            self._panel = self.grammar.panel(c.panel_weights, c.noise, seed=c.seed)
        return self._panel

    def preference_matrix(self, prompts: list[str] | None = None) -> np.ndarray:
        """Exact panel matrices ``[M, N, N]`` (default: the held-out prompts)."""
        prompts = self.prompts_eval if prompts is None else prompts
        return panel_matrices(self.grammar, self.panel(), prompts, self._responses)

    def bt_reward_oracle(self) -> BTRewardOracle:
        """The Bradley–Terry reward oracle fitted to the panel on every prompt (cached)."""
        if self._bt is None:
            prompts = self.grammar.prompts
            rewards = fit_bt_rewards(self.preference_matrix(prompts))
            self._bt = BTRewardOracle(
                rewards, prompts, self._responses, source_id=self.panel().oracle_id
            )
        return self._bt

    # -----------------------------------------------------------------------------------------
    # The reference policy
    # -----------------------------------------------------------------------------------------

    def sft_distribution(self) -> np.ndarray:
        """``μ [N]``, the SFT data distribution: a word count ``l`` with probability
        ``sft_length_probs[l − 1]`` (default uniform), then ``l`` words uniformly."""
        c = self.config
        length_probs = np.asarray(c.sft_length_probs or [1.0 / c.max_len] * c.max_len)
        v = len(self.grammar.vocab)
        return length_probs[self.lengths - 1] / float(v) ** self.lengths

    def reference_key(self) -> str:
        """Hash of everything the reference model depends on (not the panel, τ or η)."""
        c = config_to_dict(self.config)
        for unused in ("noise", "panel_weights", "tau", "eta"):
            c.pop(unused)
        return config_hash({"task": "default", "v": TASK_VERSION, "g": GRAMMAR_VERSION, **c})

    def tokenizer(self):
        """A fresh task tokenizer (see :func:`inpo.tasks.sft.task_tokenizer`)."""

        return task_tokenizer(self.grammar.words())

    def build_reference(self, cache_dir: str | Path | None = None) -> Path:
        """Build ``π_ref`` (tiny Llama + SFT) into ``cache_dir/default-<key>``, or reuse it.

        The folder holds the model (safetensors), the tokenizer and ``task_manifest.json``
        (the key, the config, SFT losses and seconds, ``π_ref``'s mass outside the set); it
        loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
        Sets :attr:`reference_path` and :attr:`reference_built` (whether this call trained).
        """

        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        key = self.reference_key()
        path, built = cached_build(root / f"default-{key}", key, self._train_reference)
        self.reference_path, self.reference_built = path, built
        self._ref_tables.clear()
        return path

    def _train_reference(self, out: Path) -> dict[str, Any]:
        import time

        import torch

        c = self.config
        t0 = time.perf_counter()
        tok = self.tokenizer()
        model = tiny_causal_lm(
            "llama",
            tok,
            seed=c.seed,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            max_position_embeddings=64,
        )
        torch.manual_seed(c.seed)
        stats = train_sft(
            model,
            [encode_prompt(tok, x) for x in self.prompts_train],
            [encode_completion(tok, "", y) for y in self._responses],
            self.sft_distribution(),
            steps=c.sft_steps,
            batch_size=c.sft_batch_size,
            learning_rate=c.sft_learning_rate,
            seed=c.seed,
            pad_token_id=tok.pad_token_id,
            desc="π_ref (SFT)",
        )
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(out)
        tok.save_pretrained(out)
        outside = {
            split: float(policy_table(model, tok, prompts, self._responses).mass_outside.mean())
            for split, prompts in (("train", self.prompts_train), ("eval", self.prompts_eval))
        }
        return {
            "task": "default",
            "config": config_to_dict(c),
            "sft": stats,
            "mass_outside": outside,
            "build_seconds": time.perf_counter() - t0,
        }

    def load_reference(self, path: str | Path | None = None):
        """``(model, tokenizer)`` of the reference (default: :attr:`reference_path`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path) if path is not None else self._require_reference()
        model = AutoModelForCausalLM.from_pretrained(path)
        model.eval()
        return model, AutoTokenizer.from_pretrained(path)

    def _require_reference(self) -> Path:
        if self.reference_path is None:
            raise ConfigError("the reference is not built yet: call build_reference(cache_dir)")
        return self.reference_path

    # -----------------------------------------------------------------------------------------
    # Exact evaluation and sampling
    # -----------------------------------------------------------------------------------------

    def policy_table(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[str] | None = None,
        *,
        batch_size: int = 512,
    ) -> PolicyTable:
        """Exact ``log π(y + EOS | x)`` table ``[M, N]`` (default: the held-out prompts);
        ``batch_size`` sequences per forward pass (lower it for a larger model)."""
        prompts = self.prompts_eval if prompts is None else prompts
        return policy_table(model, tokenizer, prompts, self._responses, batch_size=batch_size)

    def reference_table(self, prompts: list[str] | None = None) -> PolicyTable:
        """The built reference's table (computed once per prompt list)."""
        prompts = self.prompts_eval if prompts is None else prompts
        key = tuple(prompts)
        if key not in self._ref_tables:
            model, tok = self.load_reference()
            self._ref_tables[key] = self.policy_table(model, tok, prompts)
        return self._ref_tables[key]

    def regularized_nash(self, ref_table: PolicyTable) -> np.ndarray:
        """The ``τ``-regularised Nash ``π* [M, N]`` of the task's game with reference
        ``ref_table`` (:func:`inpo.game.exact.regularized_nash`; ~1 s a prompt, cached)."""
        from inpo.game.exact import regularized_nash  # deferred: loads scipy

        cached = self._nash.get(id(ref_table))
        if cached is None or cached[0] is not ref_table:
            p = self.preference_matrix(ref_table.prompts)
            cached = (ref_table, regularized_nash(p, ref_table.policy, self.config.tau))
            self._nash[id(ref_table)] = cached
        return cached[1]

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        ref_table: PolicyTable | None = None,
        prompts: list[str] | None = None,
        *,
        nash: bool = False,
    ) -> dict[str, float]:
        """Exact metrics of ``model`` (see :func:`inpo.tasks.evaluate.evaluate_tables`).

        ``ref_table`` defaults to the built reference's table on the same prompts (default:
        the held-out prompts). Returns ``duality_gap`` (``τ`` = ``config.tau``),
        ``exploitability``, ``win_rate_vs_ref``, ``kl_to_ref``, ``mass_outside``,
        ``mean_length`` — means over prompts — and, with ``nash=True``, ``kl_nash``
        ``= KL(π* ‖ π)``, the distance to the regularised Nash that INPO's last-iterate theory
        bounds (solving ``π*`` costs ~1 s a prompt, once per reference table).
        """
        from inpo.game.exact import kl  # deferred: loads scipy

        prompts = self.prompts_eval if prompts is None else prompts
        ref = ref_table if ref_table is not None else self.reference_table(prompts)
        table = self.policy_table(model, tokenizer, prompts)
        p = self.preference_matrix(prompts)
        out = evaluate_tables(p, table, ref, tau=self.config.tau, lengths=self.lengths)
        if nash:
            out["kl_nash"] = float(kl(self.regularized_nash(ref), table.policy).mean())
        return out

    def sample(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[str],
        k: int,
        *,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[str]]:
        """:func:`~inpo.tasks.evaluate.sample_responses` with ``max_new_tokens = max_len + 1``."""
        return sample_responses(
            model,
            tokenizer,
            prompts,
            k,
            temperature=temperature,
            max_new_tokens=self.config.max_len + 1,
            seed=seed,
        )

    def tabular_inpo(
        self,
        ref_table: PolicyTable,
        *,
        iterations: int = 3,
        algorithm: str = "inpo",
        ref_update_every: int | None = None,
    ) -> dict[str, Any]:
        """The exact (planning) iteration of ``algorithm`` from ``π_ref``'s table on the task's
        matrices (SPEC "INPO", exact update), with the task's ``η`` and ``τ``: the target an LM
        pipeline can aim for. Returns ``{"gap": [g_0, g_1, ...], "exploitability": [...]}``
        (means over ``ref_table``'s prompts, index 0 = ``π_ref``)."""
        from inpo.game.algorithms import run_algorithm  # deferred: loads scipy

        p = self.preference_matrix(ref_table.prompts)
        traj = run_algorithm(
            algorithm,
            p,
            ref_table.policy,
            eta=self.config.eta,
            tau=self.config.tau,
            iterations=iterations,
            ref_update_every=ref_update_every,
        )
        return {
            "gap": [traj.initial_gap, *traj.gap],
            "exploitability": [traj.initial_exploitability, *traj.exploitability],
        }
