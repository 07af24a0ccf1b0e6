"""``rollout``: the engines, their Ray workers and how they are supervised, sampling, and the stream's
staleness and partial-rollout settings (a group of TrainConfig in cispo.core.config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cispo.core.checks import check_finite_fields
from cispo.core.checks import require as _require


@dataclass
class RolloutConfig:
    engine: str = "hf"
    backend: str = "ray"  # "ray": RolloutWorker actors; "local": the engine in the driver process
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    dtype: str = "float32"
    max_batch_size: int = 64
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_stop_tokens: int = 0
    repetition_prob: float = 0.99
    eval_temperature: float = 0.0  # 0 = greedy
    # false: EOS is a token like any other and every training response runs to the budget (traces of a
    # fixed, real length for long-context experiments; the behaviour log-probs stay those of the model's
    # own distribution, since nothing is masked). Evaluation always stops at EOS.
    stop_on_eos: bool = True
    # Extra keyword arguments for the engine (vllm: tensor_parallel_size, gpu_memory_utilization,
    # max_model_len, trust_remote_code, ...), merged over what the framework passes.
    engine_kwargs: dict = field(default_factory=dict)
    # Ray workers: one that does not answer a generate shard (from submission) or a weight load within
    # worker_timeout_s, or a fresh one not up within worker_start_timeout_s, is killed and restarted with
    # the latest weights, its shard resubmitted. A slot may restart max_restarts times within any
    # restart_window_s seconds (0: within the whole run); one more stops the run.
    # worker_timeout_s 0 (auto): a shard gets worker_timeout_factor x the time its samples take at the full
    # budget and the slowest recently measured decode speed, at least worker_timeout_min_s (before any
    # measurement, and for weight loads, worker_start_timeout_s). > 0: that many seconds, fixed.
    worker_timeout_s: float = 0.0
    worker_timeout_factor: float = 4.0
    worker_timeout_min_s: float = 120.0
    worker_start_timeout_s: float = 1800.0
    max_restarts: int = 3
    restart_window_s: float = 3600.0
    # With algorithm.max_staleness > 0: "wait": a group is generated at exactly the policy version the
    # schedule gives its step (reproducible); "drop": groups start one step earlier on the newest weights,
    # and one staler than the bound when its step comes is dropped and generated again (counted).
    staleness_strategy: str = "wait"
    # Partial rollouts: a sequence in flight continues on new weights after a sync, in chunks of at most
    # partial_chunk_tokens new tokens (0: a quarter of the budget); each token keeps its own version.
    partial: bool = False
    partial_chunk_tokens: int = 0
    # Prompt groups per engine call (a task): fewer balance a long tail across workers, more batch better
    # on an engine without continuous batching (hf); 0: a step's groups split evenly over the workers.
    groups_per_task: int = 0

    def __post_init__(self) -> None:
        check_finite_fields(self, "rollout")
        _require(self.backend in ("ray", "local"), "rollout.backend", f"ray or local, got {self.backend!r}")
        _require(self.worker_timeout_s >= 0, "rollout.worker_timeout_s", "must be >= 0 (0: auto)")
        _require(self.worker_timeout_factor >= 1, "rollout.worker_timeout_factor", "must be >= 1")
        _require(self.worker_timeout_min_s > 0, "rollout.worker_timeout_min_s", "must be > 0")
        _require(self.worker_start_timeout_s > 0, "rollout.worker_start_timeout_s", "must be > 0")
        _require(self.max_restarts >= 0, "rollout.max_restarts", "must be >= 0 (0: the first failure stops)")
        _require(self.restart_window_s >= 0, "rollout.restart_window_s", "must be >= 0 (0: the whole run)")
        _require(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        _require(
            self.staleness_strategy in ("wait", "drop"),
            "rollout.staleness_strategy",
            f"wait or drop, got {self.staleness_strategy!r}",
        )
        _require(
            self.partial_chunk_tokens >= 0, "rollout.partial_chunk_tokens", "must be >= 0 (0: budget / 4)"
        )
        _require(self.num_cpus_per_worker > 0, "rollout.num_cpus_per_worker", "must be > 0")
        _require(self.num_gpus_per_worker >= 0, "rollout.num_gpus_per_worker", "must be >= 0")
        _require(self.threads_per_worker >= 1, "rollout.threads_per_worker", "must be >= 1")
        _require(self.max_batch_size >= 1, "rollout.max_batch_size", "must be >= 1")
        _require(self.top_k >= 0, "rollout.top_k", "must be >= 0 (0: no top-k)")
        _require(self.repetition_stop_tokens >= 0, "rollout.repetition_stop_tokens", "must be >= 0 (0: off)")
        _require(0 < self.repetition_prob < 1, "rollout.repetition_prob", "must be in (0, 1)")
        _require(
            self.dtype in ("float32", "bfloat16"), "rollout.dtype", f"float32 or bfloat16, got {self.dtype!r}"
        )
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", "must be > 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _require(self.eval_temperature >= 0, "rollout.eval_temperature", "must be >= 0")
