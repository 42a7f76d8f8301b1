"""The typed config of ``inpo run`` / ``inpo compare``: one dataclass per stage.

Defaults are the INPO paper's (``eta = 0.005``, ``tau = eta/3``, ``K = 8``, lr ``5e-7``, cosine,
warm-up 0.03, global batch 128) unless the task's own defaults say otherwise (the embedded
default task uses a tiny model, so it sets its own learning rate, batch and ``eta``/``tau``).
Precedence: dataclass defaults < the task's defaults < the YAML file < ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from inpo.algorithms import ALGORITHMS, DNO_MARGIN, Algorithm, default_tau, get_algorithm
from inpo.config import validate_config
from inpo.errors import ConfigError
from inpo.hub import check_push_to_hub
from inpo.losses import get_loss
from inpo.oracles.gpm import GPM_CONFIG, is_gpm_folder
from inpo.training.config import (
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_loss_hyperparameters,
    require_tracker_packages,
)
from inpo.vllm_backend import check_vllm

__all__ = [
    "AnnotateConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "RunConfig",
    "TrainStageConfig",
]


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
    #: vLLM: run the model uncompiled (vLLM's own ``enforce_eager``): a CPU engine then starts
    #: in ~23 s instead of ~82 s (SmolLM2, 2 cores) but samples ~0.76× the tokens/s.
    enforce_eager: bool = False
    #: vLLM: keep the engine between the stages that sample, loading each policy's weights
    #: into it (on a CPU; on a GPU it leaves after each stage so the next has the memory).
    #: Changes no sample (not in the stage's hash).
    reuse_engine: bool = True

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


#: ``train.`` keys of ``inpo run`` before its train section became ``inpo train``'s sections.
MOVED_TRAIN_KEYS = {
    **{k: f"optim.{k}" for k in (
        "learning_rate", "lr_scheduler", "warmup_ratio", "global_batch_size",
        "per_device_batch_size", "epochs", "max_grad_norm", "optimizer",
    )},
    **{k: f"data.{k}" for k in (
        "max_prompt_length", "max_completion_length", "share_prompt", "packing",
    )},
    **{k: f"model.{k}" for k in ("gradient_checkpointing", "dtype", "attn_implementation", "lora")},
}  # fmt: skip

#: What ``inpo run`` sets in each iteration's ``inpo train`` config itself.
_RUN_OWNED = {
    "model.path": "the policy (policy=, reference=)",
    "data.train_file": "the iteration's pairs",
    "data.dataset_name": "the iteration's pairs",
    "data.dataset_config": "the iteration's pairs",
    "data.split": "the iteration's pairs",
    "loss.name": "algorithm=",
    "loss.eta": "eta=",
    "loss.tau": "tau=",
    "loss.beta": "beta=",
    "loss.alpha": "alpha=",
}


@dataclass
class TrainStageConfig:
    """Stage 4: each iteration's ``inpo train``, with ``inpo train``'s own sections (``model``,
    ``data``, ``optim``, ``loss``) and engine settings. ``inpo run`` sets the policy, the pairs,
    the loss (from ``algorithm`` and ``eta``/``tau``/``beta``/``alpha``) and the seed; the rest
    is yours (``train.optim.weight_decay=0.01``, ``train.data.length_buckets=2``, …)."""

    MOVED: ClassVar[dict[str, str]] = MOVED_TRAIN_KEYS

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: ``train.loss.label_smoothing`` only: the rest of the loss is the algorithm's.
    loss: LossConfig = field(default_factory=LossConfig)
    #: bf16 autocast over fp32 master weights (``auto``: where CUDA supports bf16).
    bf16: Literal["auto", True, False] = "auto"
    #: FSDP2 sharding across processes (``none`` = DDP; see ``inpo train``'s ``fsdp``).
    fsdp: Literal["none", "full_shard", "shard_grad_op"] = "none"
    #: FSDP: keep the sharded parameters and optimizer state in CPU memory.
    fsdp_cpu_offload: bool = False
    #: FSDP: recompute each decoder layer's activations in the backward pass.
    fsdp_activation_checkpointing: bool = False
    #: Checkpoint every this many optimizer steps, so a killed stage resumes (null: only at
    #: the end). 50, not ``inpo train``'s 500: an iteration trains a few hundred steps.
    save_steps: int | None = 50

    def owned_settings(self) -> list[str]:
        """The keys set here that ``inpo run`` decides itself (refused by validation)."""
        blank = {"model": ModelConfig(), "data": DataConfig(), "loss": LossConfig()}
        return [
            key
            for key in _RUN_OWNED
            if getattr(getattr(self, key.split(".")[0]), key.split(".")[1])
            != getattr(blank[key.split(".")[0]], key.split(".")[1])
        ]

    def as_train_config(
        self,
        *,
        policy: str,
        pairs: str,
        loss: str,
        hparams: dict[str, float],
        seed: int,
        output_dir: str,
    ) -> TrainConfig:
        """This section as an iteration's ``inpo train`` config (not yet validated)."""
        model = dataclasses.replace(self.model, path=policy)
        data = dataclasses.replace(self.data, train_file=pairs)
        loss_cfg = LossConfig(name=loss, **hparams, label_smoothing=self.loss.label_smoothing)
        return TrainConfig(
            output_dir=output_dir,
            model=model,
            data=data,
            loss=loss_cfg,
            optim=dataclasses.replace(self.optim),
            logging=LoggingConfig(progress_bar=True),
            seed=seed,
            bf16=self.bf16,
            fsdp=self.fsdp,
            fsdp_cpu_offload=self.fsdp_cpu_offload,
            fsdp_activation_checkpointing=self.fsdp_activation_checkpointing,
            save_steps=self.save_steps,
            keep_checkpoints=1,
            final_checkpoint=False,  # the merge deletes checkpoints; the manifest marks the end
            resume="auto",
        )

    def validate_tree(self, loss: str = "dpo", hparams: dict[str, float] | None = None) -> None:
        """One validation, ``inpo train``'s: of the iteration config this section makes (with
        stand-ins for what each iteration sets; ``RunConfig`` passes its loss), its messages
        naming ``train.`` keys."""
        owned = self.owned_settings()
        if owned:
            key = owned[0]
            raise ConfigError(
                f"train.{key} is set by inpo run itself ({_RUN_OWNED[key]}); remove it"
            )
        tc = self.as_train_config(
            policy="(the iteration's policy)",
            pairs="(the iteration's pairs)",
            loss=loss,
            hparams=hparams or {},
            seed=0,
            output_dir="(the iteration's folder)",
        )
        try:
            validate_config(tc)
        except ConfigError as err:
            raise ConfigError(_TRAIN_KEY.sub(r"train.\1", str(err))) from err


#: A key of ``inpo train``'s config in a message, to be named as ``inpo run``'s ``train.`` key.
_TRAIN_KEY = re.compile(
    r"(?<![\w.=])((?:model|data|optim|loss)\.\w+|fsdp\w*|save_steps|keep_checkpoints|bf16)\b"
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
    #: ``default`` (the embedded exact task), ``prompts`` (your prompts and models) or
    #: ``panel`` (SmolLM2 from ``make real-model`` on 240 chat prompts, a cyclic text panel).
    task: Literal["default", "prompts", "panel"] = "default"
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
    #: many iterations (null: 2, the algorithm's default; evaluation keeps the original π_ref).
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
        return default_tau(self.eta) if self.tau is None else self.tau

    @property
    def spec(self) -> Algorithm:
        """Everything ``algorithm`` means (:mod:`inpo.algorithms`)."""
        return get_algorithm(self.algorithm)

    @property
    def ref_every(self) -> int | None:
        """A moving reference's schedule: ``ref_update_every``, else the algorithm's default
        (``None`` for a fixed or previous-iterate reference)."""
        if self.spec.reference != "moving":
            return None
        return self.ref_update_every or self.spec.ref_update_every

    def loss_hparams(self) -> tuple[str, dict[str, float]]:
        """The loss name and hyper-parameters this algorithm trains with."""
        spec = self.spec
        return spec.loss, spec.hparams(self.eta, self.tau_value, self.beta, self.alpha)

    @property
    def margin_value(self) -> float:
        return DNO_MARGIN if self.margin is None else self.margin

    def mixture_beta(self) -> float | None:
        """Nash-MD's β = τ/η: the weight of π_ref in the sampler (``None``: sample from π_t)."""
        return self.spec.mixture_beta(self.eta, self.tau_value)

    def selection(self) -> str:
        if self.annotate.selection != "auto":
            return self.annotate.selection
        return self.spec.selection

    def validate(self) -> None:
        try:
            trackers = LoggingConfig(report_to=self.report_to)
            trackers.validate()
        except ConfigError as err:
            raise ConfigError(str(err).replace("logging.report_to", "report_to")) from None
        require_tracker_packages(trackers.trackers, "report_to")
        if self.push_to_hub:
            check_push_to_hub(self.hub_model_id, "hub_model_id")
        spec = self.spec  # a ConfigError naming the choices for an unknown name
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}")
        if spec.sampler == "mixture" and self.generate.backend == "vllm":
            raise ConfigError(
                f"algorithm={self.algorithm} samples from a mixture of two models token by token, which "
                "the transformers backend does (two models, one generate loop); vLLM cannot: "
                "use generate.backend=transformers"
            )
        if self.generate.backend == "vllm":  # after the algorithm's own objection to it
            check_vllm()
        if spec.sampler == "mixture" and not self.tau_value > 0:
            raise ConfigError(
                f"algorithm={self.algorithm} mixes in π_ref with beta = tau/eta: tau must be > 0"
            )
        if self.ref_update_every is not None:
            if spec.reference != "moving":
                moving = [a.name for a in ALGORITHMS.values() if a.reference == "moving"]
                raise ConfigError(
                    f"ref_update_every is for {' and '.join(moving)}; "
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
        if self.task in ("default", "panel") and (self.prompts or self.eval_prompts):
            raise ConfigError(
                f"task={self.task} has its own training and held-out prompts; prompts= and "
                "eval_prompts= are for task=prompts"
            )

        name, hparams = self.loss_hparams()
        check_loss_hyperparameters(get_loss(name), hparams, prefix="")
        self.train.validate_tree(name, hparams)  # with the loss it will train
        if self.annotate.tie_policy == "tie" and not spec.takes_ties:
            raise ConfigError(
                f"annotate.tie_policy=tie keeps tied finals as tie labels, which algorithm="
                f"{self.algorithm} would train on as strict preferences; use an algorithm "
                f"whose loss takes ties ({', '.join(a.name for a in ALGORITHMS.values() if a.takes_ties)}) "
                "or another tie_policy"
            )
        win_rates = [a.name for a in ALGORITHMS.values() if a.win_rates]
        if self.selection() == "all_pairs" and not spec.win_rates:
            raise ConfigError(
                f"annotate.selection=all_pairs gives win rates: only for {', '.join(win_rates)}"
            )
        if spec.win_rates and self.selection() != "all_pairs":
            raise ConfigError(
                f"{self.algorithm} needs annotate.selection=all_pairs (win-rate estimates)"
            )
        self._validate_dno()

    def _validate_dno(self) -> None:
        if not self.spec.pair_filter:
            for key in ("margin", "teacher"):
                if getattr(self, key) not in (None, ""):
                    raise ConfigError(f"{key} is for algorithm=dno (DNO-Prct's pair filter)")
            return
        if not (math.isfinite(self.margin_value) and 0 <= self.margin_value < 1):
            raise ConfigError(f"margin must be in [0, 1) (a win-rate gap), got {self.margin}")
