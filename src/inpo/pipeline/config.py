"""The typed config of ``inpo run`` / ``inpo compare``: one dataclass per stage.

Defaults are the INPO paper's (``eta = 0.005``, ``tau = eta/3``, ``K = 8``, lr ``5e-7``, cosine,
warm-up 0.03, global batch 128) unless the task's own defaults say otherwise (the embedded
default task uses a tiny model, so it sets its own learning rate, batch and ``eta``/``tau``).
Precedence: dataclass defaults < the task's defaults < the YAML file < ``key=value`` overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inpo.errors import ConfigError, did_you_mean
from inpo.training.config import LoraSettings

__all__ = [
    "ALGORITHMS",
    "DNO_MARGIN",
    "EXTRAGRADIENT",
    "MOVING_REFERENCE",
    "PREVIOUS_ITERATE_REFERENCE",
    "TIE_LOSSES",
    "AnnotateConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "RunConfig",
    "TrainStageConfig",
]

#: What each algorithm trains with, what it precomputes and how it selects pairs.
#: ``loss``: a key of ``inpo.losses.LOSSES``; ``selection``: the default pair-selection rule.
ALGORITHMS: dict[str, dict[str, str]] = {
    "inpo": {"loss": "inpo", "selection": "tournament", "doc": "INPO (eta, tau)"},
    "online_ipo": {
        "loss": "inpo",
        "selection": "tournament",
        "doc": "INPO with tau = eta: IPO against pi_ref with beta = eta on fresh samples",
    },
    "inpo_no_kl": {
        "loss": "inpo",
        "selection": "tournament",
        "doc": "INPO with tau = 0: IPO against the previous iterate",
    },
    "dpo": {"loss": "dpo", "selection": "tournament", "doc": "iterative DPO (beta)"},
    "ipo": {"loss": "ipo", "selection": "tournament", "doc": "iterative IPO (beta)"},
    "sppo": {"loss": "sppo", "selection": "all_pairs", "doc": "SPPO (eta), all-pairs win rates"},
    "nash_md": {
        "loss": "inpo",
        "selection": "tournament",
        "doc": "Nash-MD (Munos et al. 2023) as IPO-MD: samples from the token-level geometric "
        "mixture pi_t^(1-beta) pi_ref^beta, beta = tau/eta, trained with INPO's loss",
    },
    "comal": {
        "loss": "inpo",
        "selection": "tournament",
        "doc": "COMAL (Liu et al. 2024): INPO iterations against an anchor, replaced by the "
        "last policy every ref_update_every iterations (a prox-point outer loop)",
    },
    "mpo": {
        "loss": "inpo",
        "selection": "tournament",
        "doc": "magnetic mirror descent (MPO, Wang et al. 2025): INPO's loss at eta + tau, tau; "
        "the magnet (reference) moved to the policy every ref_update_every iterations",
    },
    "egpo": {
        "loss": "inpo",
        "selection": "tournament",
        "doc": "extragradient (EGPO, Zhou et al. 2025): a half step from pi_t on pi_t's samples, "
        "then the full step from pi_t on the half-step policy's samples, each MPO's loss (INPO's "
        "at eta + tau, tau)",
    },
    "mirror_prox": {
        "loss": "inpo",
        "selection": "tournament",
        "doc": "Nash mirror-prox (Tiapkin et al. 2025): the same two steps as egpo",
    },
    "dno": {
        "loss": "dpo",
        "selection": "all_pairs",
        "doc": "DNO-Prct (Rosset et al. 2024): the best and worst of the K samples (and the "
        "teacher's response) by win rate, kept when their win rates differ by at least margin, "
        "trained with DPO against pi_t (its beta is DNO's eta)",
    },
    "todo": {
        "loss": "todo",
        "selection": "tournament",
        "doc": "TODO: tie-aware DPO (beta, alpha); with annotate.tie_policy=tie, tied finals "
        "train as ties",
    },
}

#: The paper (and equation) each algorithm's LM form follows; shown by ``inpo run --help``.
PAPERS: dict[str, str] = {
    "inpo": (
        "Zhang et al. 2024, Iterative Nash Policy Optimization (arXiv 2407.00617): the "
        "OMD step Eq. (4) pi_{t+1} ∝ pi_ref^(tau/eta) pi_t^(1-tau/eta) exp(P(y ≻ "
        "pi_t)/eta), learnt by minimising the squared loss L_t of Eq. (8) (Algorithm 1)"
    ),
    "online_ipo": (
        "Calandriello et al. 2024, Human Alignment of LLMs through Online Preference "
        "Optimisation (arXiv 2403.08635): IPO's loss (Azar et al. 2023, arXiv "
        "2310.12036) on fresh pairs of pi_t, whose optimum is pi_ref exp(P(y ≻ "
        "pi_t)/tau)"
    ),
    "inpo_no_kl": (
        "Zhang et al. 2024 (arXiv 2407.00617), the ablation 'INPO w/o KL': Eq. (8) with "
        "tau = 0, i.e. pi_{t+1} ∝ pi_t exp(P(y ≻ pi_t)/eta)"
    ),
    "dpo": (
        "Rafailov et al. 2023 (arXiv 2305.18290), the DPO loss Eq. (7), iterated on "
        "pi_t's tournament pairs (Xiong et al. 2024, arXiv 2312.11456)"
    ),
    "ipo": (
        "Azar et al. 2023 (arXiv 2310.12036), IPO's squared loss (h - 1/(2 beta))^2, "
        "iterated on pi_t's tournament pairs"
    ),
    "sppo": (
        "Wu et al. 2024, Self-Play Preference Optimization (arXiv 2405.00675): the "
        "squared loss (log pi/pi_t - eta_s (P̂(y ≻ pi_t) - 1/2))^2 with SPPO's eta_s = "
        "1/eta, whose optimum is the multiplicative-weights step pi_t exp(P(y ≻ pi_t)/eta)"
    ),
    "nash_md": (
        "Munos et al. 2023, Nash Learning from Human Feedback (arXiv 2312.00886): the "
        "Nash-MD step on the regularised policy pi_t^(1-beta) pi_ref^beta, in its "
        "squared-loss form IPO-MD (Calandriello et al. 2024, arXiv 2403.08635)"
    ),
    "comal": (
        "Liu et al. 2024, COMAL (arXiv 2410.23223): the conceptual prox-point outer "
        "loop over INPO inner iterations, the anchor replaced by the last iterate"
    ),
    "mpo": (
        "Wang et al. 2025, Magnetic Preference Optimization (ICLR 2025, arXiv "
        "2410.16714): the magnetic mirror descent step pi_{t+1} ∝ (pi_t "
        "pi_ref^(tau/eta) exp(P(y ≻ pi_t)/eta))^(1/(1+tau/eta)), the magnet moved every "
        "few iterations"
    ),
    "egpo": (
        "Zhou, Fazel and Du 2025, Extragradient Preference Optimization (arXiv "
        "2503.08942): the extragradient (half step, full step) pair of online-IPO "
        "updates"
    ),
    "mirror_prox": (
        "Tiapkin et al. 2025, Accelerating Nash Learning from Human Feedback via Mirror "
        "Prox: the same extragradient pair as egpo"
    ),
    "dno": (
        "Rosset et al. 2024, Direct Nash Optimization (arXiv 2404.03715), Algorithm 2 "
        "(DNO-Prct): best vs worst by win rate above a margin, DPO against pi_t"
    ),
    "todo": (
        "Guo et al. 2024, TODO: Enhancing LLM Alignment with Ternary Preferences: DPO's "
        "loss with a tie term (alpha)"
    ),
}

#: Losses that train on tie labels (``annotate.tie_policy=tie``); the others would read a tie
#: as a strict preference.
TIE_LOSSES = ("inpo", "ipo", "todo")

#: Algorithms whose reference (anchor, magnet) moves to the policy every ``ref_update_every``
#: iterations; each maps to an exact update of :mod:`inpo.game.algorithms` run with the same
#: ``ref_update_every`` (``inpo`` for COMAL's inner iterations, ``mmd`` for MPO).
MOVING_REFERENCE = {"comal": "inpo", "mpo": "mmd"}

#: Algorithms that take two policy steps an iteration (a half step, then the full step against
#: the half-step policy's samples): the exact ``extragradient`` update.
EXTRAGRADIENT = ("egpo", "mirror_prox")

#: Algorithms whose loss's reference is the previous iterate ``π_t`` (DNO-Prct's DPO).
PREVIOUS_ITERATE_REFERENCE = ("dno",)

#: DNO's default margin: the least win-rate gap between a kept pair's chosen and rejected.
DNO_MARGIN = 0.25


@dataclass
class GenerateConfig:
    """Stage 1: ``k`` samples a prompt from ``π_t``."""

    #: Samples a prompt (K; the tournament asks 3K/2 − 1 queries).
    k: int = 8
    #: Sampling temperature (> 0: greedy decoding would give K identical samples).
    temperature: float = 1.0
    #: Nucleus sampling: keep the smallest set of tokens with this much probability.
    top_p: float = 1.0
    #: Longest response in tokens (longer samples are cut and counted as truncated).
    max_new_tokens: int = 512
    #: Prompts a generation batch (samples do not depend on it: seeds are per sample).
    batch_size: int = 16
    #: ``transformers`` (generate with a KV cache) or ``vllm`` (``pip install 'inpo[vllm]'``;
    #: an engine in its own process, one a rank; prompts passed as token ids).
    backend: Literal["transformers", "vllm"] = "transformers"
    #: vLLM: GPUs an engine shards the model over (each rank's engine under torchrun).
    tensor_parallel_size: int = 1
    #: vLLM: the fraction of each GPU's memory the engine may take.
    gpu_memory_utilization: float = 0.85

    def validate(self) -> None:
        if self.k < 2:
            raise ConfigError(f"generate.k must be >= 2 (pairs need two samples), got {self.k}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(
                f"generate.temperature must be > 0, got {self.temperature} (greedy decoding "
                "would give K identical samples: no pair to learn from)"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}")
        for key in ("max_new_tokens", "batch_size", "tensor_parallel_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"generate.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"generate.gpu_memory_utilization must be in (0, 1], got "
                f"{self.gpu_memory_utilization}"
            )


@dataclass
class AnnotateConfig:
    """Stage 2: the oracle and the selection rule.

    ``oracle``: ``task`` (the task's own preference oracle; for the default task, its annotator
    panel), ``task_bt`` (the task's Bradley–Terry reward oracle), ``reward_model`` /
    ``pairwise`` / ``gpm`` (a local model folder in ``model``; ``inpo train-oracle`` writes all
    three), ``http`` (an OpenAI-compatible judge at
    ``url``; the key from the environment variable ``api_key_env``).
    """

    #: Who labels the pairs: the task's own, its Bradley–Terry fit, a local model, an HTTP judge.
    oracle: Literal["task", "task_bt", "reward_model", "pairwise", "gpm", "http"] = "task"
    #: The reward, pairwise or GPM model (a folder or a cached hub id) for those oracles.
    model: str = ""
    #: How a pairwise model reads a comparison (``oracle=pairwise``): ``rlhflow`` (RLHFlow's exact
    #: rendering, for RLHFlow's pairwise models) or ``chat`` (a general judging question through
    #: the model's own chat template: any chat model as a judge).
    pairwise_format: Literal["rlhflow", "chat"] = "rlhflow"
    #: The OpenAI-compatible judge's base URL (``oracle=http``).
    url: str = ""
    #: The model name the HTTP judge is asked for.
    judge_model: str = ""
    #: The environment variable holding the judge's API key (never stored in a config).
    api_key_env: str = "OPENAI_API_KEY"
    #: How pairs are chosen from K samples (auto: the algorithm's rule; INPO's tournament).
    selection: Literal["auto", "tournament", "best_worst", "all_pairs"] = "auto"
    #: A tied final (y_w vs y_l): drop the pair (the paper's and the INPO authors' rule), keep it
    #: for the first-listed, a coin flip, or keep it as a tie label. Bracket ties go to the first.
    tie_policy: Literal["drop", "first", "random", "tie"] = "drop"
    #: The label an oracle query gives: ``sample`` (a Bernoulli draw with mean P, what the
    #: theory assumes), ``threshold`` (1 if P > ½, 0 if P < ½, ½ at ½: the INPO authors' code),
    #: ``soft`` (P itself).
    labels: Literal["sample", "threshold", "soft"] = "sample"
    #: Deprecated: ``true`` is ``labels=sample``, ``false`` is ``labels=soft`` (null: use labels).
    hard_labels: bool | None = None
    #: Prompts an oracle batch.
    batch_size: int = 64
    #: What a sample cut at ``generate.max_new_tokens`` (no end token) gets: ``keep`` (judged like
    #: any other, scored as sampled, without an end token; TRL's and the INPO authors' default),
    #: ``drop`` (left out of selection), ``lose`` (loses to every sample that ended, without asking
    #: the oracle: TRL's ``missing_eos_penalty`` taken to its limit).
    truncated: Literal["keep", "drop", "lose"] = "keep"

    def __post_init__(self) -> None:
        if self.hard_labels is not None:  # the old key, mapped once onto the new one
            self.labels = "sample" if self.hard_labels else "soft"
            self.hard_labels = None

    def validate(self) -> None:
        if self.labels not in ("sample", "threshold", "soft"):
            raise ConfigError(
                f"annotate.labels must be sample, threshold or soft, got '{self.labels}'"
            )
        if self.oracle in ("reward_model", "pairwise", "gpm") and not self.model:
            raise ConfigError(f"annotate.model is required for annotate.oracle={self.oracle}")
        if self.oracle == "http" and not (self.url and self.judge_model):
            raise ConfigError("annotate.url and annotate.judge_model are required for http")
        if self.oracle == "http" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"annotate.url '{self.url}' must start with http:// or https://")
        if self.oracle == "gpm" and self.model and Path(self.model).is_dir():
            from inpo.oracles.gpm import GPM_CONFIG, is_gpm_folder

            if not is_gpm_folder(self.model):
                raise ConfigError(
                    f"annotate.model '{self.model}' is not a GPM (no {GPM_CONFIG}); train one "
                    "with `inpo train-oracle kind=gpm`"
                )
        if self.batch_size < 1:
            raise ConfigError(f"annotate.batch_size must be >= 1, got {self.batch_size}")
        if self.truncated not in ("keep", "drop", "lose"):
            raise ConfigError(
                f"annotate.truncated must be keep, drop or lose, got '{self.truncated}'"
            )


@dataclass
class TrainStageConfig:
    """Stage 4: the training loop's settings (``inpo.training``) for each iteration."""

    #: Peak learning rate (the paper's 5e-7 for 8B models).
    learning_rate: float = 5e-7
    #: Decay after warm-up.
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    #: Fraction of the steps spent warming the learning rate up from 0.
    warmup_ratio: float = 0.03
    #: Pairs an optimizer step, over all processes (gradient accumulation fills the rest).
    global_batch_size: int = 128
    #: Pairs a forward pass on each process.
    per_device_batch_size: int = 8
    #: Passes over each iteration's pairs.
    epochs: int = 1
    #: Clip the gradient's global norm to this (null: no clipping).
    max_grad_norm: float | None = 1.0
    #: AdamW (the paper's) or plain SGD.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    #: Prompt tokens kept (the end is kept).
    max_prompt_length: int = 512
    #: Response tokens kept (the start is kept).
    max_completion_length: int = 512
    #: Recompute activations in the backward pass (less memory, more time).
    gradient_checkpointing: bool = False
    #: Run each pair as one sequence prompt + chosen + rejected (the prompt computed once).
    share_prompt: bool = False
    #: Run each micro-batch as padding-free rows (position ids restart per sequence); with
    #: share_prompt, the rows prompt + chosen + rejected are packed; the logps stage scores
    #: by the same rule. null: batches of rows from 64 tokens, on CPU where variable-length
    #: attention is exact for the model, and on a CUDA GPU (train stage: unshared pairs) where
    #: its attention keeps packed sequences apart (data.packing in inpo train).
    packing: bool | None = None
    #: Checkpoint every this many optimizer steps, so a killed stage resumes (null: only at the end).
    save_steps: int | None = 50
    #: The weights' dtype. Mixed precision is ``bf16`` (autocast over fp32 weights).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: bf16 autocast over fp32 master weights (``auto``: where CUDA supports bf16).
    bf16: Literal["auto", True, False] = "auto"
    #: ``sdpa``, ``eager``, ``flash_attention_2``… (null: the model's default).
    attn_implementation: str | None = None
    #: A LoRA adapter (``train.lora.r=16`` …; null: full fine-tuning), merged when saved.
    lora: LoraSettings | None = None
    #: FSDP2 sharding across processes (``none`` = DDP; see ``inpo train``'s ``fsdp``).
    fsdp: Literal["none", "full_shard", "shard_grad_op"] = "none"
    #: FSDP: keep the sharded parameters and optimizer state in CPU memory.
    fsdp_cpu_offload: bool = False
    #: FSDP: recompute each decoder layer's activations in the backward pass.
    fsdp_activation_checkpointing: bool = False

    def validate(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        for key in ("global_batch_size", "per_device_batch_size", "epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"train.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ConfigError(f"train.save_steps must be >= 1 or null, got {self.save_steps}")
        for key in ("max_prompt_length", "max_completion_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.fsdp == "none" and (self.fsdp_cpu_offload or self.fsdp_activation_checkpointing):
            raise ConfigError(
                "train.fsdp_cpu_offload / train.fsdp_activation_checkpointing need "
                "train.fsdp=full_shard or train.fsdp=shard_grad_op"
            )
        if self.fsdp != "none" and self.share_prompt:
            raise ConfigError(
                "train.fsdp runs the LM head inside the model's forward; "
                "train.share_prompt=true is not supported with it"
            )
        if self.fsdp != "none" and self.packing:
            raise ConfigError(
                "train.fsdp runs the LM head inside the model's forward (padded rows); "
                "train.packing=true is not supported with it"
            )
        if self.fsdp != "none" and self.gradient_checkpointing:
            raise ConfigError(
                "with train.fsdp, use train.fsdp_activation_checkpointing=true instead of "
                "train.gradient_checkpointing"
            )


@dataclass
class EvaluateConfig:
    """Stage 5: exact metrics where the task allows them, else oracle win rates."""

    #: Held-out prompts evaluated (tasks with exact metrics use all of theirs).
    num_prompts: int = 64
    #: Responses sampled a held-out prompt for the win rate.
    k: int = 1

    def validate(self) -> None:
        for key in ("num_prompts", "k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"evaluate.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class RunConfig:
    """Top level of ``inpo run`` (see the README)."""

    #: The run's folder: one sub-folder per iteration and stage; re-run to continue.
    run_dir: str = "inpo-run"
    #: ``default`` (the embedded exact task) or ``prompts`` (your prompts and models).
    task: str = "default"
    #: inpo | online_ipo | inpo_no_kl | dpo | ipo | sppo | todo | nash_md | comal | mpo | egpo |
    #: mirror_prox | dno: the loss, the selection rule, the sampler (nash_md: a mixture), a
    #: moving reference (comal, mpo), two steps an iteration (egpo, mirror_prox).
    algorithm: str = "inpo"
    #: Rounds of generate → annotate → logps → train → evaluate.
    iterations: int = 3
    #: Seeds sampling, labels and training (each stage derives its own).
    seed: int = 0
    #: INPO's η: the step is 1/η; the loss's target margin is 1/(2η).
    eta: float = 0.005
    #: INPO's τ: the KL strength towards π_ref (null: η/3, the paper's).
    tau: float | None = None
    #: β of DPO, IPO and TODO.
    beta: float = 0.1
    #: TODO's tie threshold α > 0 (Rao–Kupper: P(tie) grows with it).
    alpha: float = 0.5
    #: comal / mpo: replace the reference (anchor, magnet) by the current policy every this
    #: many iterations (required for them; evaluation keeps the original π_ref).
    ref_update_every: int | None = None
    #: dno: keep a prompt's best-vs-worst pair only when their win rates (against the K samples
    #: and the teacher) differ by at least this (null: 0.25).
    margin: float | None = None
    #: dno: a file of one response per training prompt (TRL's prompt-completion format:
    #: ``prompt``, ``completion``), DNO's teacher (gold) response, ranked with the K samples.
    teacher: str = ""
    #: The starting policy π_0: a model folder or cached hub id (empty: the reference).
    policy: str = ""
    #: The reference π_ref: a model folder or cached hub id (empty: the task's own; the
    #: default task builds one by a short SFT, cached).
    reference: str = ""
    #: Training prompts (task=prompts): JSONL/Parquet/`datasets` folder in TRL's prompt-only
    #: format (a ``prompt`` column of text or messages); a list (or commas) gives one source an
    #: iteration, cycling, as the INPO paper trains each iteration on fresh prompts.
    prompts: str | list[str] = ""
    #: Held-out evaluation prompts, in the same format as ``prompts``; never trained on (an
    #: error if they overlap). Empty: the last evaluate.num_prompts of the first source (at most
    #: half of it), held out of training.
    eval_prompts: str = ""
    #: The split of ``prompts`` when it is a hub dataset or a folder of data files (null: train);
    #: a list gives one split a source.
    prompts_split: str | list[str] | None = None
    #: The split of ``eval_prompts`` when it is a hub dataset or a folder of data files.
    eval_prompts_split: str | None = None
    #: The configuration of a hub dataset given as ``prompts``/``eval_prompts``.
    dataset_config: str | None = None
    #: Use only the first this many training prompts of each iteration (null: all).
    max_prompts: int | None = None
    #: Skip (and count) prompts that cannot be used — a conversation for a model without a chat
    #: template, a prompt longer than its context — instead of stopping at the first.
    skip_bad_rows: bool = False
    #: Times each prompt is sampled an iteration (K fresh samples and one selection each).
    prompt_repeats: int = 1
    #: Trackers for the whole run, via accelerate: tensorboard, wandb, mlflow, trackio, … (commas).
    #: One tracker run; trackio is the local-first choice (``pip install trackio``).
    report_to: str = "none"
    #: The trackers' project (null: ``$WANDB_PROJECT`` if set, else ``inpo``).
    project: str | None = None
    #: Where file-based trackers write (empty: ``run_dir/trackers``).
    tracker_dir: str = ""
    #: Upload the last iteration's model to ``hub_model_id`` when the run ends (the token from
    #: ``$HF_TOKEN`` or ``hf auth login``, never from a config).
    push_to_hub: bool = False
    #: The hub repository to push to (``owner/name``).
    hub_model_id: str | None = None
    #: Create the hub repository as private.
    hub_private_repo: bool = True
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @property
    def tau_value(self) -> float:
        return self.eta / 3.0 if self.tau is None else self.tau

    def loss_hparams(self) -> tuple[str, dict[str, float]]:
        """The loss name and hyper-parameters this algorithm trains with."""
        loss = ALGORITHMS[self.algorithm]["loss"]
        if self.algorithm in ("inpo", "comal", "nash_md"):
            return loss, {"eta": self.eta, "tau": self.tau_value}
        if self.algorithm in ("mpo", *EXTRAGRADIENT):  # MMD's step is INPO's at eta + tau
            return loss, {"eta": self.eta + self.tau_value, "tau": self.tau_value}
        if self.algorithm == "online_ipo":
            return loss, {"eta": self.eta, "tau": self.eta}
        if self.algorithm == "inpo_no_kl":
            return loss, {"eta": self.eta, "tau": 0.0}
        if self.algorithm == "sppo":
            return loss, {"eta": self.eta}
        if self.algorithm == "todo":
            return loss, {"beta": self.beta, "alpha": self.alpha}
        if self.algorithm == "dno":  # DNO's eta multiplies the log-ratios: DPO's beta
            return loss, {"beta": self.eta}
        return loss, {"beta": self.beta}

    @property
    def margin_value(self) -> float:
        return DNO_MARGIN if self.margin is None else self.margin

    def mixture_beta(self) -> float | None:
        """Nash-MD's β = τ/η: the weight of π_ref in the sampler (``None``: sample from π_t)."""
        return self.tau_value / self.eta if self.algorithm == "nash_md" else None

    def selection(self) -> str:
        if self.annotate.selection != "auto":
            return self.annotate.selection
        return ALGORITHMS[self.algorithm]["selection"]

    def validate(self) -> None:
        from inpo.training.config import LoggingConfig, require_tracker_packages

        try:
            trackers = LoggingConfig(report_to=self.report_to)
            trackers.validate()
        except ConfigError as err:
            raise ConfigError(str(err).replace("logging.report_to", "report_to")) from None
        require_tracker_packages(trackers.trackers, "report_to")
        if self.push_to_hub:
            from inpo.hub import check_push_to_hub

            check_push_to_hub(self.hub_model_id, "hub_model_id")
        if self.algorithm not in ALGORITHMS:
            hint = did_you_mean(self.algorithm, ALGORITHMS)
            raise ConfigError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}; got '{self.algorithm}'{hint}"
            )
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}")
        if self.algorithm == "nash_md" and self.generate.backend == "vllm":
            raise ConfigError(
                "algorithm=nash_md samples from a mixture of two models token by token, which "
                "the transformers backend does (two models, one generate loop); vLLM cannot: "
                "use generate.backend=transformers"
            )
        if self.generate.backend == "vllm":  # after the algorithm's own objection to it
            from inpo.vllm_backend import check_vllm

            check_vllm()
        if self.algorithm == "nash_md" and not self.tau_value > 0:
            raise ConfigError(
                "algorithm=nash_md mixes in π_ref with beta = tau/eta: tau must be > 0"
            )
        if self.algorithm in MOVING_REFERENCE and self.ref_update_every is None:
            raise ConfigError(
                f"algorithm={self.algorithm} moves its reference to the policy every few "
                "iterations: set ref_update_every (e.g. ref_update_every=2)"
            )
        if self.ref_update_every is not None:
            if self.algorithm not in MOVING_REFERENCE:
                raise ConfigError(
                    f"ref_update_every is for {' and '.join(MOVING_REFERENCE)}; "
                    f"algorithm={self.algorithm} keeps π_ref"
                )
            if self.ref_update_every < 1:
                raise ConfigError(f"ref_update_every must be >= 1, got {self.ref_update_every}")
        if self.prompt_repeats < 1:
            raise ConfigError(f"prompt_repeats must be >= 1, got {self.prompt_repeats}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts must be >= 1 or null, got {self.max_prompts}")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ConfigError(f"eta must be > 0, got {self.eta}")
        tau = self.tau_value
        if not (math.isfinite(tau) and 0 <= tau <= self.eta):
            raise ConfigError(f"tau must satisfy 0 <= tau <= eta (eta={self.eta}), got {tau}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        from pathlib import Path

        from inpo.hub import looks_like_hub_id, resolve_dataset
        from inpo.pipeline.workloads import prompt_sources

        if self.task == "default" and (self.prompts or self.eval_prompts):
            raise ConfigError(
                "task=default has its own training and held-out prompts (its evaluation is "
                "exact); prompts= and eval_prompts= are for task=prompts"
            )
        for key in ("prompts", "eval_prompts"):
            for value in prompt_sources(getattr(self, key)):
                if looks_like_hub_id(value):
                    resolve_dataset(value, key)  # in the local cache, or one line saying how
                elif not Path(value).exists():
                    raise ConfigError(f"{key}: path '{value}' does not exist")
        from inpo.hub import resolve_model

        for key in ("policy", "reference"):  # a folder, or a hub id in the local HF cache
            if getattr(self, key):
                resolve_model(getattr(self, key), key)
        from inpo.losses import get_loss
        from inpo.training.config import check_loss_hyperparameters

        name, hparams = self.loss_hparams()
        check_loss_hyperparameters(get_loss(name), hparams, prefix="")
        if (
            self.annotate.tie_policy == "tie"
            and ALGORITHMS[self.algorithm]["loss"] not in TIE_LOSSES
        ):
            raise ConfigError(
                f"annotate.tie_policy=tie keeps tied finals as tie labels, which algorithm="
                f"{self.algorithm} would train on as strict preferences; use an algorithm "
                "whose loss takes ties (inpo, online_ipo, inpo_no_kl, ipo, todo) or another "
                "tie_policy"
            )
        if self.selection() == "all_pairs" and self.algorithm not in ("sppo", "dno"):
            raise ConfigError("annotate.selection=all_pairs gives win rates: only for sppo, dno")
        if self.algorithm in ("sppo", "dno") and self.selection() != "all_pairs":
            raise ConfigError(
                f"{self.algorithm} needs annotate.selection=all_pairs (win-rate estimates)"
            )
        self._validate_dno()

    def _validate_dno(self) -> None:
        if self.algorithm != "dno":
            for key in ("margin", "teacher"):
                if getattr(self, key) not in (None, ""):
                    raise ConfigError(f"{key} is for algorithm=dno (DNO-Prct's pair filter)")
            return
        if not (math.isfinite(self.margin_value) and 0 <= self.margin_value < 1):
            raise ConfigError(f"margin must be in [0, 1) (a win-rate gap), got {self.margin}")
        if self.teacher:
            from inpo.pipeline.teacher import check_teacher

            check_teacher(self)
