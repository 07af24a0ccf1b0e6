"""The "deepspeed" learner: ZeRO-2/3 data parallelism over N ranks, each a Ray actor, driven from the trainer.

The trainer holds a DeepSpeedLearner, a facade with the Learner interface; each rank is a DeepSpeedRank
actor (cispo/learner/deepspeed_rank.py) owning one DeepSpeed engine:

    learner = build_learner("deepspeed", model=load_fn, cfg=cfg.learner, algorithm=cfg.algorithm,
                            total_steps=cfg.experiment.total_steps, temperature=cfg.rollout.temperature)
    result = learner.train_step(minibatch)             # StepResult: one optimizer step over all ranks
    results = learner.train_steps(minibatches)         # K steps, one request per rank, one StepResult each
    learner.weight_source() / learner.save_hf(...)     # weights leave from rank 0, never via the driver
    learner.close()

Placement: one Ray placement group with a bundle per rank ({"CPU": cpus_per_rank}, plus {"GPU": 1} on GPU
clusters), laid out by `placement_strategy` (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD), so ranks land on
as many nodes as the strategy and the cluster give. Rank 0 names its node's address and a free port; every
rank then joins torch.distributed there (NCCL on GPU, gloo on CPU) and initialises DeepSpeed. One code
path for one node and for many. `placement` lists (rank, node) after start-up.

One train_step: the driver computes the normalisation weights over the whole minibatch (so the per-token
weights are global), splits the rows over ranks balancing tokens, cuts each rank's rows into token-budget
micro-batches (learner.micro_batch_tokens), pads every rank to the same number of micro-batches with
zero-weight dummies (ZeRO reduce-scatters inside every backward, so ranks must run the same number), and
sends each rank its list through Ray. Each rank backpropagates world_size * (its share of the global loss),
since ZeRO averages gradients over ranks, and the gradients summed over micro-batches and ranks are the
full-minibatch gradient; engine.step() clips by the global norm and applies AdamW. A non-finite global
gradient norm makes DeepSpeed discard the step on every rank (gradients cleared, weights, optimizer and
scheduler untouched); it is reported as `skipped_frac` 1, as the torch learner does, and the driver's
NonFiniteGuard stops the run after learner.max_nonfinite_steps such steps in a row. train_steps (the
driver's K updates per rollout batch) sends each rank the micro-batches of all K minibatches in one Ray
call and the rank runs the K steps in order, so K updates cost one round trip, not K.

Sequence parallelism (learner.sequence_parallel_size = SP > 1; cispo/learner/sequence_parallel.py): the
ranks form num_ranks / SP data-parallel groups of SP consecutive ranks. Rows are split over the groups
(balancing tokens) and cut into micro-batches of up to SP x micro_batch_tokens (a per-rank budget); every
rank of a group gets the same micro-batches, each rank only its columns (shard_part: padded to a multiple
of SP, targets shifted globally), and dummies pad every rank to the same count. ZeRO still partitions and
reduces over all ranks; attention exchanges over the group (Ulysses all-to-all). Each rank's loss is the
sum over the tokens it scores, so the backward and step are unchanged; log-probs come back as column
shards and are stitched to [B, L] here (unshard_logprobs). With packing (cispo/learner/sp_packing.py) a
micro-batch's rows are packed into one stream and each rank of the group takes its slice of the stream
(shard_packed); it scatters its log-probs into the micro-batch's [B, L] layout, so they are summed here.

Optimizer: torch.optim.AdamW(betas, eps=1e-15, fused) handed to deepspeed.initialize (DeepSpeed's
FusedAdam is CUDA-only and its CPUAdam JIT-compiles; torch's runs on the flat ZeRO partitions as they are).
Precision: fp32, or bf16 with fp32 master weights when the model's parameters are bf16.

Model: a picklable zero-argument callable that builds or loads the policy on each rank (the driver passes
one that loads the run's safetensors directory, so it never builds the model itself), or a module (small
models in tests; it travels pickled through the object store once). Built normally, then partitioned by
deepspeed.initialize; with zero_init and ZeRO-3 the callable's from_pretrained runs inside
deepspeed.zero.Init and each rank loads only its shards. A randomly initialised MiniMax built inside
zero.Init leaves its router and expert weights unset (NaN loss): tests/learner/test_deepspeed_learner.py
shows it; loading every weight from a checkpoint does not have that problem.

Weights out: the facade is its own WeightSource (cispo/core/weight_channel.py, driven by the rollout side's
BroadcastWeightSync; `weight_source()` returns it): rank 0 joins a weight
group with the engines and broadcasts bucket by bucket, ranks gathering each ZeRO-3 bucket together.
state_dict_for_sync() / iter_weights_for_sync() bring a full copy to the caller (tests, the torch-style
object-store path); they refuse in a driver that set CISPO_DRIVER_REFUSES_WEIGHTS=1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cispo.algo.losses import normalization_weights
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.placement import PlacementEntry, in_bundle, make_placement_group
from cispo.core.stage import StageSettings
from cispo.core.supervisor import RayTransport, SlotPolicy, Supervisor
from cispo.core.types import StepResult, TrainBatch
from cispo.core.weight_channel import TensorMeta, WeightSource, refuse_weights_here
from cispo.learner import register_learner
from cispo.learner.common import StepParts, wants_packing
from cispo.learner.deepspeed_rank import DeepSpeedRank
from cispo.learner.hf_export import SHARD_BYTES
from cispo.learner.micro_batches import Plan, plan_micro_batches
from cispo.learner.sequence_parallel import shard_part, unshard_logprobs
from cispo.learner.sp_packing import shard_packed, stitch_packed


def _dummy(batch: TrainBatch) -> TrainBatch:
    """One real row with nothing trained: runs the forward/backward collectives, adds zero gradient."""
    part = batch.select([0])
    part.response_mask = torch.zeros_like(part.response_mask)
    return part


@register_learner("deepspeed")
class DeepSpeedLearner:
    ray_ranks = True  # runs on Ray actors of its own: the driver passes a loader and the placement

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        cfg: LearnerConfig,
        algorithm: AlgorithmConfig,
        *,
        total_steps: int = 1000,
        temperature: float = 1.0,
        ds_config: dict[str, Any] | None = None,
        threads_per_rank: int = 1,
        start_timeout_s: float = 600.0,
        placement_strategy: str = "PACK",
        cpus_per_rank: float = 1.0,
        gpus_per_rank: float = 0.0,
        zero_init: bool = False,
    ) -> None:
        import ray

        self.check_config(cfg)
        self.cfg, self.algorithm, self.world = cfg, algorithm, cfg.num_ranks
        # Sequence parallelism: ranks g*sp .. g*sp+sp-1 form data-parallel group g and split its rows'
        # tokens (cispo/learner/sequence_parallel.py); sp 1 is plain data parallelism.
        self.sp = cfg.sequence_parallel_size
        self.groups = self.world // self.sp
        self.version = 0
        self.packing = packing = (
            wants_packing(model, cfg)
            if isinstance(model, nn.Module)
            else bool(getattr(cfg, "packing", False))
        )
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Alone (tests, scripts): a local instance just big enough for the ranks, shut down by close().
            ray.init(
                num_cpus=max(2, int(self.world * cpus_per_rank + 0.999)),
                include_dashboard=False,
                _temp_dir=f"/tmp/ray_cispo_{os.getpid()}",
            )
        self._sup, self._pg = self._place(
            placement_strategy, cpus_per_rank, gpus_per_rank, threads_per_rank, start_timeout_s
        )
        host, port = self._call(lambda _i, r: r.free_port.remote(), "free_port", start_timeout_s, [0])[0]
        init = ray.put(
            {
                "model": model,
                "cfg": cfg,
                "algorithm": algorithm,
                "total_steps": total_steps,
                "temperature": temperature,
                "packing": packing,
                "ds_config": ds_config,
                "zero_init": zero_init,
            }
        )
        self._all("setup", (host, port, init), timeout_s=start_timeout_s)
        self.placement: list[PlacementEntry] = [
            {"role": "learner", "rank": rank, **where}
            for rank, where in enumerate(self._all("node", timeout_s=start_timeout_s))
        ]

    @staticmethod
    def check_config(cfg: LearnerConfig) -> None:
        """What only this backend requires of learner.* (run at start-up, before any model is built)."""
        if cfg.zero_stage not in (2, 3):
            raise ValueError(f"learner.zero_stage must be 2 or 3 (deepspeed learner), got {cfg.zero_stage}")
        if cfg.num_ranks < 1:
            raise ValueError(f"learner.num_ranks must be >= 1, got {cfg.num_ranks}")
        sp = cfg.sequence_parallel_size
        if sp < 1 or cfg.num_ranks % sp:
            raise ValueError(
                f"learner.sequence_parallel_size ({sp}) must be >= 1 and divide learner.num_ranks "
                f"({cfg.num_ranks})"
            )
        if sp > 1 and getattr(cfg, "packing", False) and cfg.router_aux_loss_coef > 0:
            # The aux loss is computed over a part's tokens; a packed shard's router rows are its stream
            # slice, which micro_batch_loss's [B, L] attention mask does not describe.
            raise ValueError(
                "learner.router_aux_loss_coef > 0 with learner.packing and "
                "learner.sequence_parallel_size > 1 is not supported"
            )

    def _place(
        self, strategy: str, cpus: float, gpus: float, threads: int, timeout_s: float
    ) -> tuple[Supervisor[Any, None], Any]:
        """A placement group of one bundle per rank, then one DeepSpeedRank actor in each bundle, as slots
        of a supervisor: up within `timeout_s`, and never restarted (a rank cannot rejoin its collective:
        the first failure closes the learner)."""
        group = make_placement_group("learner", self.world, cpus, gpus, strategy, timeout_s)
        env = {"OMP_NUM_THREADS": str(threads)}
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions")
        )
        transport = RayTransport(
            DeepSpeedRank,
            lambda rank: (rank, self.world, threads),
            {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}},
            lambda rank: {"scheduling_strategy": in_bundle(group, rank)},
        )
        policy = SlotPolicy("learner rank", timeout_s, max_restarts=0, keys="learner")
        supervisor: Supervisor[Any, None] = Supervisor(transport, policy, self.world)
        try:
            supervisor.start()
        except RuntimeError:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
            raise
        return supervisor, group

    @property
    def ranks(self) -> list[Any]:
        sup = getattr(self, "_sup", None)
        return sup.handles if sup is not None else []

    def _call(
        self,
        call: Callable[[int, Any], Any],
        what: str,
        timeout_s: float | None = None,
        ranks: Sequence[int] | None = None,
    ) -> list[Any]:
        """Every rank's (or `ranks`') reply. One rank failing leaves the others blocked in a collective, so
        the first failure (death, error, no answer within `timeout_s`) closes the learner and raises."""
        try:
            return self._sup.call_each(call, timeout_s, what, ranks)
        except RuntimeError as err:
            self.close(force=True)
            raise RuntimeError(f"deepspeed learner: {err}; the learner is closed") from err

    def _all(self, method: str, args: tuple = (), timeout_s: float | None = None) -> list[Any]:
        return self._call(lambda _i, rank: getattr(rank, method).remote(*args), method, timeout_s)

    def _each(self, method: str, per_rank: list[tuple]) -> list[Any]:
        return self._call(lambda i, rank: getattr(rank, method).remote(*per_rank[i]), method)

    def train_step(self, batch: TrainBatch, return_logprobs: bool = False) -> StepResult:
        """One optimizer step on one minibatch over all ranks (see the module docstring)."""
        return self.train_steps([batch], [return_logprobs])[0]

    def train_steps(
        self, minibatches: list[TrainBatch], return_logprobs: Sequence[bool] | None = None
    ) -> list[StepResult]:
        """K optimizer steps, one per minibatch in order, in one request per rank: each rank gets every
        minibatch's micro-batches at once and steps through them (the same updates as K train_step
        calls, without K driver round trips)."""
        flags = list(return_logprobs or [False] * len(minibatches))
        if len(flags) != len(minibatches):
            raise ValueError(f"{len(minibatches)} minibatches but {len(flags)} return_logprobs flags")
        plans = [self._plan(batch) for batch in minibatches]
        parts = [self._parts(batch, plan) for batch, plan in zip(minibatches, plans)]  # [K][rank]
        per_rank = self._each("train_many", [([p[rank] for p in parts], flags) for rank in range(self.world)])
        return [
            self._step_result(batch, plan, flag, [replies[k] for replies in per_rank])
            for k, (batch, plan, flag) in enumerate(zip(minibatches, plans, flags))
        ]

    def _plan(self, batch: TrainBatch) -> Plan:
        """Per data-parallel group (per rank without SP), its micro-batches' rows. micro_batch_tokens is
        a per-rank budget: a group's micro-batch spreads its tokens over its sp ranks."""
        return plan_micro_batches(batch, self.groups, self.cfg.micro_batch_tokens * self.sp)

    def _parts(self, batch: TrainBatch, plan: Plan) -> list[list[tuple]]:
        """Per rank, its micro-batches of one minibatch: (part, token weights, token share, dummy); under
        SP each rank of a group gets its columns of the group's micro-batches (shard_part)."""
        weights = normalization_weights(batch.response_mask, self.algorithm.normalizer, batch.group_ids)
        tokens = max(batch.num_response_tokens(), 1)
        out = []
        for rank in range(self.world):
            parts = []
            for rows in plan[rank // self.sp]:
                dummy = rows is None
                part = _dummy(batch) if dummy else batch.select(rows)
                part_weights = (
                    torch.zeros_like(part.old_logprobs) if dummy else weights[rows, : part.input_ids.shape[1]]
                )
                if self.sp > 1:
                    shard = shard_packed if self.packing else shard_part
                    part, part_weights = shard(part, part_weights, rank % self.sp, self.sp)
                    scored = part.batch.num_response_tokens()
                else:
                    scored = part.num_response_tokens()
                parts.append((part, part_weights, 0.0 if dummy else scored / tokens, dummy))
            out.append(parts)
        return out

    def _step_result(self, batch: TrainBatch, plan: Plan, return_logprobs: bool, replies: list) -> StepResult:
        """One minibatch's StepResult from every rank's reply for it."""
        step = StepParts()
        for rank_parts, *_ in replies:
            step.merge(rank_parts)
        # Every rank saw the same global norm, lr and overflow decision.
        _, grad_norm, lr, _, applied = replies[0]
        if applied:
            self.version += 1
        if return_logprobs:
            logprobs = self._scatter(batch, plan, self._by_group(batch, plan, [r[3] for r in replies]))
        else:
            logprobs = None
        metrics = step.result(grad_norm, lr)
        metrics["skipped_frac"] = 0.0 if applied else 1.0
        return StepResult(metrics, logprobs)

    def _by_group(
        self, batch: TrainBatch, plan: Plan, outputs: list[list[torch.Tensor | None]]
    ) -> list[list[torch.Tensor | None]]:
        """Per-rank outputs -> per-group [B, L] outputs: the SP ranks' column shards stitched back
        (unshard_logprobs); without SP, as they are."""
        if self.sp == 1:
            return outputs
        grouped = []
        for group, group_plan in enumerate(plan):
            ranks = outputs[group * self.sp : (group + 1) * self.sp]
            stitched: list[torch.Tensor | None] = []
            for rows, shards in zip(group_plan, zip(*ranks)):
                if rows is None or shards[0] is None:
                    stitched.append(None)
                    continue
                if self.packing:
                    stitched.append(stitch_packed(list(shards)))
                    continue
                length = int(batch.attention_mask[rows].sum(dim=1).max())
                stitched.append(unshard_logprobs(list(shards), length))
            grouped.append(stitched)
        return grouped

    @staticmethod
    def _scatter(batch: TrainBatch, plan: Plan, outputs: list[list[torch.Tensor | None]]) -> torch.Tensor:
        out = torch.zeros_like(batch.old_logprobs)
        for rank_plan, rank_out in zip(plan, outputs):
            for rows, values in zip(rank_plan, rank_out):
                if rows is not None and values is not None:
                    out[rows, : values.shape[1]] = values
        return out

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        plan = self._plan(batch)
        requests = [([part for part, *_ in parts],) for parts in self._parts(batch, plan)]
        return self._scatter(batch, plan, self._by_group(batch, plan, self._each("logprobs", requests)))

    # Weights out. This facade is the WeightSource of the rollout side's BroadcastWeightSync: calls that run
    # on the ranks return refs, so the sync waits on the learner and the engines together.
    def weight_source(self) -> WeightSource:
        return self

    def weight_metas(self) -> list[TensorMeta]:
        return self._call(lambda _i, rank: rank.weight_metas.remote(), "weight_metas", None, [0])[0]

    def weight_group_address(self) -> tuple[str, int]:
        return self._call(lambda _i, rank: rank.free_port.remote(), "free_port", None, [0])[0]

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> list[Any]:
        return [self.ranks[0].join_weight_group.remote(host, port, world_size, backend)]

    def send_weights(self, bucket_bytes: int) -> list[Any]:
        return [rank.send_weights.remote(bucket_bytes) for rank in self.ranks]

    def weights_ref(self) -> Any:
        """An ObjectRef to a full copy rank 0 put in the object store (for a restarted engine)."""
        return self._all("weights_ref")[0][0]

    def iter_weights_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) pairs in state_dict order: a full copy in this process."""
        refuse_weights_here("DeepSpeedLearner.state_dict_for_sync")
        yield from self._all("full_state")[0].items()

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        return dict(self.iter_weights_for_sync())

    def save_hf(
        self,
        template_dir: str | Path,
        out_dir: str | Path,
        files: Mapping[str, str] | None = None,
        shard_bytes: int = SHARD_BYTES,
    ) -> None:
        """Rank 0 writes the weights in Hugging Face format, with `files` (see RankWeights.save_hf)."""
        self._all("save_hf", (str(template_dir), str(out_dir), shard_bytes, dict(files or {})))

    def apply_settings(self, settings: StageSettings) -> None:
        """A curriculum stage's settings on every rank, from the next train_step on (the normaliser here:
        this facade computes the token weights)."""
        if settings.normalizer is not None:
            self.algorithm = dataclasses.replace(self.algorithm, normalizer=settings.normalizer)
        if settings.loss_kwargs is not None:
            self.algorithm = dataclasses.replace(self.algorithm, loss_kwargs=dict(settings.loss_kwargs))
        self._all("apply_settings", (settings,))

    def weights_finite(self) -> bool:
        return all(self._all("weights_finite"))

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._all("save", (str(Path(directory).resolve()), self.version))

    def load(self, directory: str) -> None:
        self.version = int(self._all("load", (str(Path(directory).resolve()),))[0])

    def close(self, force: bool = False) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        sup = getattr(self, "_sup", None)
        if sup is not None:
            sup.shutdown()  # kills every rank
        if getattr(self, "_pg", None) is not None:
            remove_placement_group(self._pg)
            self._pg = None
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
