"""Typed configuration: one dataclass per Hydra config group, validated in __post_init__.

The dataclasses are registered in Hydra's ConfigStore as the schema of configs/config.yaml, so Hydra
rejects unknown keys and wrong types while composing, naming the key; ``__post_init__`` then checks
values (ranges, registry names) when the composed config becomes these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from cispo.core.checks import check_finite, check_finite_fields
from cispo.core.checks import require as _require
from cispo.core.eval_config import EvalConfig
from cispo.core.model_config import ModelConfig, WarmstartConfig
from cispo.core.reward_config import CodeRewardConfig
from cispo.core.rollout_config import RolloutConfig

# Re-exported: the one non-finite check, by config users; the model group, from its own module.
__all__ = ["ModelConfig", "WarmstartConfig", "check_finite", "check_finite_fields"]

WANDB_MODES = ("auto", "online", "offline", "disabled")
# How a loss normalises its token sum (cispo.algo.losses.normalization_weights implements them).
NORMALIZERS = ("token", "group", "sample", "sample_token")


@dataclass
class DataConfig:
    """source: "addition" (built-in procedural), "reasoning_gym" (generator = dataset name),
    "jsonl" / "parquet" (path: one file), or "hub" (path: a dataset id, or a local directory laid out as
    the hub lays datasets out, or one written by Dataset.save_to_disk). README.md, "Data", has examples."""

    source: str = "addition"
    path: str = ""
    generator: str = ""
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # hub: the dataset's config (GSM8K's "main"); a local directory: its subdirectory
    split: str = "train"  # hub: the split training draws from
    # hub: the held-out split; empty: the last num_eval rows of `split` (at most a fifth) are held out
    # instead, as for a jsonl/parquet file. (Each of eval_split and eval_path is ignored by the other
    # sources, so that an evaluation set can change data.source alone.)
    eval_split: str = ""
    # jsonl/parquet: a second file holding the held-out rows (its first num_eval); empty: the last rows
    # of `path` are held out.
    eval_path: str = ""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    # The reference from the answer column: none (as it is), gsm8k ("#### N"), boxed (MATH's \boxed{}),
    # or package.module:function (cispo/core/answers.py).
    answer_extractor: str = "none"
    prompt_template: str = "{prompt}"
    # auto: the tokenizer's chat template when it has one (instruct models), the raw prompt otherwise
    # (base models); true: always (an error if there is none); false: never. YAML booleans work too.
    chat_template: str = "auto"
    # A Jinja chat template (text, or the path of a file holding one) used instead of the tokenizer's.
    custom_chat_template: str = ""
    # The system message of a chat-templated prompt; without a chat template it goes before the prompt,
    # followed by a blank line.
    system_prompt: str = ""
    # A prompt that leaves no room for the generation budget in the model's context is refused at load
    # (naming its row); true: keep its last tokens instead (the number truncated is printed).
    truncate_prompts: bool = False
    num_train: int = 50000
    num_eval: int = 256
    prompts_per_step: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_finite_fields(self, "data")
        sources = ("addition", "reasoning_gym", "jsonl", "parquet", "hub")
        _require(self.source in sources, "data.source", f"one of {list(sources)}, got {self.source!r}")
        _require(
            self.source not in ("jsonl", "parquet", "hub") or bool(self.path),
            "data.path",
            f"needed for source {self.source!r}",
        )
        _require(self.prompts_per_step > 0, "data.prompts_per_step", "must be > 0")
        _require(self.num_eval >= 0 and self.num_train > 0, "data.num_train/num_eval", "must be positive")
        _require("{prompt}" in self.prompt_template, "data.prompt_template", "must contain {prompt}")
        # OmegaConf stores a YAML boolean given to this str field as "True"/"False"; Python may pass a bool.
        self.chat_template = str(self.chat_template).lower()
        modes = ("auto", "true", "false")
        _require(self.chat_template in modes, "data.chat_template", f"one of {list(modes)}")
        from cispo.core.answers import ANSWER_EXTRACTORS  # imports only the registry

        try:
            ANSWER_EXTRACTORS.check(self.answer_extractor)
        except (ValueError, ImportError, AttributeError) as err:
            raise ValueError(f"config error at data.answer_extractor: {err}") from None


@dataclass
class RewardItem:
    name: str = MISSING
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The range the reward's scores fall in, when it is not the one the reward declares (default [0, 1]);
    # a score outside it stops being a score and counts as an error (rewards/base.py: the contract).
    low: float | None = None
    high: float | None = None


@dataclass
class RewardConfig:
    rewards: list[RewardItem] = field(default_factory=lambda: [RewardItem(name="exact_match")])
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)
    timeout_s: float = 10.0
    strict: bool = False
    max_workers: int = 2
    # Stop the run (with the plugin's traceback and the sample) once this fraction of a step's samples
    # hit a reward that raised or timed out; 1.0 stops only when every sample failed. reward/errors and
    # reward/timeouts are always logged.
    stop_error_fraction: float = 1.0
    # "process": rewards run in worker processes, and a timed-out one is killed; "thread": in this process.
    isolation: str = "process"
    # Ray reward actors, each with its own scorer (max_workers workers, its own sandboxes); 0: in the driver.
    num_actors: int = 0
    cpus_per_actor: float = 1.0  # Ray CPUs each reward actor reserves (its threads: this, at least 1)

    def __post_init__(self) -> None:
        check_finite_fields(self, "reward")
        _require(len(self.rewards) > 0, "reward.rewards", "needs at least one reward")
        _require(self.timeout_s > 0, "reward.timeout_s", "must be > 0")
        _require(self.max_workers >= 1, "reward.max_workers", "must be >= 1 (0 would score nothing, forever)")
        _require(0 < self.stop_error_fraction <= 1, "reward.stop_error_fraction", "must be in (0, 1]")
        _require(self.isolation in ("process", "thread"), "reward.isolation", "one of ['process', 'thread']")
        _require(self.num_actors >= 0, "reward.num_actors", "must be >= 0 (0: score in the driver)")
        _require(self.cpus_per_actor > 0, "reward.cpus_per_actor", "must be > 0")


@dataclass
class AlgorithmConfig:
    loss: str = "cispo"
    # Empty here on purpose: each algorithm's YAML (configs/algorithm/*.yaml) gives its loss's kwargs
    # whole, so choosing algorithm=grpo never inherits CISPO's eps_low/eps_high. Checked against the
    # loss's signature at start-up (cispo.driver.validate).
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    normalizer: str = "token"
    advantage: str = "group"
    advantage_kwargs: dict[str, Any] = field(default_factory=dict)
    group_size: int = 8
    updates_per_batch: int = 4  # K off-policy minibatch updates per rollout batch (the report: 16)
    filter_zero_variance: bool = True
    dynamic_sampling_rounds: int = 0  # extra rollout rounds to refill groups dropped as zero-variance
    # Bounded staleness, in policy versions: the rollout of step t runs on version t - 1 - max_staleness
    # while the learner trains the steps before it (0: the synchronous loop). rollout.staleness_strategy.
    max_staleness: int = 0
    # This many steps in a row in which every group's rewards are all equal (nothing to learn from) stop
    # the run naming the likely causes, or only warn (zero_variance_action=warn); 0: never.
    max_zero_variance_steps: int = 20
    zero_variance_action: str = "stop"
    # Reference-model KL (k3 estimator, Schulman) added to the loss: kl_coef * sum_t c_t * k3_t, against a
    # frozen copy of the policy as RL started, held by the learner ranks. 0: off, no reference is built.
    kl_coef: float = 0.0
    # DAPO's soft overlong punishment, its window tied to the current budget (rollout.max_new_tokens, the
    # curriculum stage's): L_max = budget, L_cache = overlong_buffer * budget; penalty in
    # [-overlong_penalty, 0] added to the reward before advantages. 0: off.
    overlong_buffer: float = 0.0
    overlong_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_finite_fields(self, "algorithm")
        # Names resolved through registries (loss, advantage) are checked by cispo.driver.validate.
        _require(self.normalizer in NORMALIZERS, "algorithm.normalizer", f"one of {list(NORMALIZERS)}")
        _require(self.group_size >= 2, "algorithm.group_size", "must be >= 2 for group advantages")
        _require(self.updates_per_batch >= 1, "algorithm.updates_per_batch", "must be >= 1")
        _require(self.dynamic_sampling_rounds >= 0, "algorithm.dynamic_sampling_rounds", "must be >= 0")
        _require(self.max_staleness >= 0, "algorithm.max_staleness", "must be >= 0 (0: synchronous)")
        _require(self.max_zero_variance_steps >= 0, "algorithm.max_zero_variance_steps", ">= 0 (0: off)")
        _require(self.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0 (0: no reference-model KL)")
        _require(0.0 <= self.overlong_buffer < 1.0, "algorithm.overlong_buffer", "a fraction in [0, 1)")
        _require(self.overlong_penalty >= 0, "algorithm.overlong_penalty", "must be >= 0")
        _require(
            self.zero_variance_action in ("stop", "warn"),
            "algorithm.zero_variance_action",
            f"stop or warn, got {self.zero_variance_action!r}",
        )


@dataclass
class LearnerConfig:
    backend: str = "torch"
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 10
    schedule: str = "constant"  # or "cosine"
    micro_batch_tokens: int = 16384
    logprob_chunk_size: int = 1024
    num_threads: int = 2
    # Updates with a non-finite loss or gradient norm are skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 3
    router_aux_loss_coef: float = 0.0
    routing_replay: bool = False
    packing: bool = False  # one [1, T] stream per micro-batch; hybrid MiniMax too (lightning state resets)
    # Per-layer activation checkpointing (transformers' gradient checkpointing): activations of one layer
    # at a time are kept, the rest recomputed in backward. What long budgets need (see cispo-plan).
    gradient_checkpointing: bool = False
    # deepspeed backend
    zero_stage: int = 2
    offload_optimizer: bool = False
    num_ranks: int = 2
    # ZeRO-3: each rank builds the policy inside deepspeed.zero.Init and loads only its own shards of the
    # checkpoint (no rank ever holds the whole model); false: build whole, then partition.
    zero_init: bool = True
    # Ulysses sequence parallelism: each sample's tokens split over this many ranks (ZeRO still runs over
    # all num_ranks = data-parallel groups x this); deepspeed backend only (learner/sequence_parallel.py).
    sequence_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_finite_fields(self, "learner")
        _require(self.lr > 0, "learner.lr", "must be > 0")
        _require(
            self.grad_clip >= 0, "learner.grad_clip", "must be >= 0 (0: no clipping); < 0 flips every update"
        )
        _require(self.adam_eps > 0, "learner.adam_eps", "must be > 0")
        _require(all(0 <= b < 1 for b in self.betas), "learner.betas", "each in [0, 1)")
        _require(self.weight_decay >= 0, "learner.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
        _require(self.logprob_chunk_size > 0, "learner.logprob_chunk_size", "must be > 0")
        _require(self.num_threads >= 0, "learner.num_threads", "must be >= 0 (0: torch's default)")
        _require(self.num_ranks >= 1, "learner.num_ranks", "must be >= 1")
        _require(self.max_nonfinite_steps >= 1, "learner.max_nonfinite_steps", "must be >= 1")
        _require(self.router_aux_loss_coef >= 0, "learner.router_aux_loss_coef", "must be >= 0")
        _require(self.schedule in ("constant", "cosine"), "learner.schedule", "constant or cosine")
        _require(self.micro_batch_tokens > 0, "learner.micro_batch_tokens", "must be > 0")
        _require(self.zero_stage in (0, 1, 2, 3), "learner.zero_stage", "0, 1, 2 or 3")
        _require(len(self.betas) == 2, "learner.betas", "two values")
        _require(self.sequence_parallel_size >= 1, "learner.sequence_parallel_size", "must be >= 1")
        _require(
            self.num_ranks % self.sequence_parallel_size == 0,
            "learner.sequence_parallel_size",
            f"must divide learner.num_ranks ({self.num_ranks})",
        )
        _require(
            self.sequence_parallel_size == 1 or self.backend == "deepspeed",
            "learner.sequence_parallel_size",
            f"> 1 needs learner.backend deepspeed (got {self.backend!r})",
        )


@dataclass
class StageConfig:
    """One curriculum stage: its generation budget and the settings it changes from the next rollout or
    update on (unset: the run's own). loss_kwargs are merged over algorithm.loss_kwargs."""

    budget: int = MISSING
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    grad_clip: float | None = None
    repetition_stop_tokens: int | None = None
    temperature: float | None = None
    normalizer: str | None = None  # e.g. the report's sample_token (sample- and token-level) later on

    def check(self, key: str) -> None:
        check_finite_fields(self, key)
        _require(
            self.normalizer is None or self.normalizer in NORMALIZERS, f"{key}.normalizer", str(NORMALIZERS)
        )
        _require(self.budget >= 1, f"{key}.budget", "must be >= 1")
        _require(self.lr is None or self.lr > 0, f"{key}.lr", "must be > 0")
        _require(self.grad_clip is None or self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0")
        _require(self.temperature is None or self.temperature > 0, f"{key}.temperature", "must be > 0")
        _require(
            self.repetition_stop_tokens is None or self.repetition_stop_tokens >= 0,
            f"{key}.repetition_stop_tokens",
            "must be >= 0",
        )


def _report_stages() -> list[StageConfig]:
    return [StageConfig(budget=b) for b in (40960, 49152, 57344, 65536, 73728, 81920)]


@dataclass
class CurriculumConfig:
    """The report's staged thinking budget. The next stage starts when both conditions hold (either can
    be switched off): the p99 response length has been at least `advance_fraction` of the window for
    `patience` steps in a row, and the generation perplexity has converged (the mean of the last
    `perplexity_window` steps within `perplexity_tolerance`, relative, of the mean of the window before)."""

    enabled: bool = False
    stages: list[StageConfig] = field(default_factory=_report_stages)
    advance_fraction: float = 0.95
    patience: int = 3
    length_condition: bool = True
    perplexity_condition: bool = True
    perplexity_window: int = 5
    perplexity_tolerance: float = 0.02

    def __post_init__(self) -> None:
        check_finite_fields(self, "curriculum")
        if self.enabled:
            _require(len(self.stages) > 0, "curriculum.stages", "needs at least one stage")
            budgets = [s.budget for s in self.stages]
            _require(
                budgets == sorted(set(budgets)), "curriculum.stages", f"budgets must increase: {budgets}"
            )
            _require(
                self.length_condition or self.perplexity_condition,
                "curriculum",
                "switch on length_condition or perplexity_condition (with neither, no stage ever advances)",
            )
        for index, stage in enumerate(self.stages):
            stage.check(f"curriculum.stages[{index}]")
        _require(0 < self.advance_fraction <= 1, "curriculum.advance_fraction", "must be in (0, 1]")
        _require(self.patience >= 1, "curriculum.patience", "must be >= 1")
        _require(self.perplexity_window >= 1, "curriculum.perplexity_window", "must be >= 1")
        _require(self.perplexity_tolerance > 0, "curriculum.perplexity_tolerance", "must be > 0")


@dataclass
class LoggingConfig:
    # auto: WANDB_MODE / WANDB_DISABLED if set, else online with an API key and a reachable server,
    # offline otherwise (`wandb sync <run dir>/wandb/offline-run-*` uploads an offline run later)
    wandb: str = "auto"
    project: str = ""  # empty: $WANDB_PROJECT, else "cispo"
    entity: str = ""  # empty: $WANDB_ENTITY, else your default entity
    group: str = ""
    tags: list[str] = field(default_factory=list)
    run_name: str = ""  # empty: <experiment.name>-<run dir name>, unique per run directory
    log_every: int = 1  # a plain progress line every N steps when there is no progress bar
    table_every: int = 50
    table_samples: int = 8
    progress: bool = True
    plot: bool = True
    wandb_artifacts: bool = False  # each checkpoint and hf/ as W&B artifacts (offline: staged copies)
    wandb_view: bool = True  # an online run creates its project's workspace view when it has none

    def __post_init__(self) -> None:
        check_finite_fields(self, "logging")
        _require(self.wandb in WANDB_MODES, "logging.wandb", f"one of {list(WANDB_MODES)}")
        _require(self.log_every >= 1, "logging.log_every", "must be >= 1")
        _require(self.table_every >= 1, "logging.table_every", "must be >= 1")
        _require(self.table_samples >= 0, "logging.table_samples", "must be >= 0")


@dataclass
class ExperimentConfig:
    name: str = "addition_tiny_minimax"
    total_steps: int = 500
    max_time_s: float = 0.0  # 0 = no wall-clock limit
    eval_every: int = 50
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    keep_best: bool = False  # also keep the checkpoint with the best held-out accuracy (eval at its step)
    seed: int = 0
    # Evaluate model.name on the held-out split and stop: no warm start, no training (`cispo-eval`).
    eval_only: bool = False

    def __post_init__(self) -> None:
        check_finite_fields(self, "experiment")
        _require(self.total_steps >= 0, "experiment.total_steps", "must be >= 0")
        _require(self.eval_every >= 0, "experiment.eval_every", "must be >= 0 (0: no evaluation)")
        _require(self.checkpoint_every >= 0, "experiment.checkpoint_every", "must be >= 0 (0: none)")
        _require(self.keep_checkpoints >= 0, "experiment.keep_checkpoints", "must be >= 0 (0: keep all)")
        _require(self.max_time_s >= 0, "experiment.max_time_s", "must be >= 0 (0: no limit)")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ClusterConfig:
    """Where the processes run. Learner ranks and rollout workers each get a Ray placement group: one
    bundle per learner rank ({GPU: 1, CPU: learner_cpus_per_rank}, or CPUs only on a CPU cluster) and one
    per rollout worker ({GPU: rollout.num_gpus_per_worker, CPU: rollout.num_cpus_per_worker}), laid out
    over the nodes by `placement_strategy`. `learner_gpus` and `rollout_gpus` state the GPU split
    explicitly: they must equal learner.num_ranks (deepspeed) and rollout.num_workers x
    rollout.num_gpus_per_worker, and add up to at most num_nodes x gpus_per_node."""

    num_cpus: int = 2  # CPUs of the local Ray instance (unused with ray_address)
    ray_address: str = ""  # empty: start a local Ray instance
    num_nodes: int = 1  # with ray_address: the live nodes the cluster must have at start-up
    gpus_per_node: int = 0  # GPUs each of those nodes must have; the local instance gets this many
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray placement groups)
    learner_cpus_per_rank: float = 1.0  # CPUs reserved for each learner rank's bundle
    learner_gpus: int = 0  # GPUs serving the learner (one per rank); 0 on a CPU cluster
    rollout_gpus: int = 0  # GPUs serving rollout (num_workers x num_gpus_per_worker); 0 on CPU
    weight_sync: str = "auto"  # auto | broadcast | object_store (auto: broadcast for ranked learners)

    def __post_init__(self) -> None:
        check_finite_fields(self, "cluster")
        _require(self.num_cpus >= 1, "cluster.num_cpus", "must be >= 1")
        _require(self.num_nodes >= 1, "cluster.num_nodes", "must be >= 1")
        _require(self.gpus_per_node >= 0, "cluster.gpus_per_node", "must be >= 0")
        _require(
            bool(self.ray_address) or self.num_nodes == 1,
            "cluster.num_nodes",
            f"{self.num_nodes} nodes need cluster.ray_address (a local Ray instance is one node)",
        )
        _require(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "cluster.placement_strategy",
            f"one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}",
        )
        _require(self.learner_cpus_per_rank > 0, "cluster.learner_cpus_per_rank", "must be > 0")
        _require(min(self.learner_gpus, self.rollout_gpus) >= 0, "cluster.learner_gpus", "must be >= 0")
        _require(
            self.learner_gpus + self.rollout_gpus <= self.num_nodes * self.gpus_per_node,
            "cluster.learner_gpus",
            f"learner_gpus + rollout_gpus = {self.learner_gpus + self.rollout_gpus} exceed the allocation "
            f"of num_nodes x gpus_per_node = {self.num_nodes * self.gpus_per_node}",
        )
        _require(
            self.weight_sync in ("auto", "broadcast", "object_store"),
            "cluster.weight_sync",
            f"auto, broadcast or object_store, got {self.weight_sync!r}",
        )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the evaluation sets (cispo.core.eval_config)
    resume: str = "auto"  # auto | never | <checkpoint dir>


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
