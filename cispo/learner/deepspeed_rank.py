"""One DeepSpeed rank of the "deepspeed" learner: a Ray actor that owns one DeepSpeed engine.

The DeepSpeedLearner facade (cispo/learner/deepspeed_learner.py) places one DeepSpeedRank per bundle of a
Ray placement group, asks rank 0 for its node's address and a free port, and calls setup() on every rank
at once: torch.distributed comes up among them (NCCL on GPU, gloo on CPU), then DeepSpeed. After that the
facade calls the same method on every rank for each request (the collectives inside ZeRO need every rank in
every forward/backward/step/gather). Ray carries the requests and replies; there is no other transport.

The policy arrives as a picklable zero-argument callable that builds or loads it on the rank (a directory
of safetensors, usually), or as a module (small test models). With `zero_init` and ZeRO-3, the callable runs
under transformers' HfDeepSpeedConfig, so from_pretrained builds the model inside deepspeed.zero.Init and
each rank loads only its own shards (the randomly initialised build inside zero.Init is broken for
MiniMax, see the facade; loading every weight from a checkpoint overwrites what the build left unset).

Weights leave a rank only through the weight channel (cispo/core/weight_channel.py): rank 0 joins a group
with the rollout engines and broadcasts bucket by bucket; under ZeRO-3 every rank gathers each bucket's
parameters together (GatheredParameters), so no rank ever holds more than one extra bucket.

Sequence parallelism (learner.sequence_parallel_size > 1): setup() creates the SP groups, switches the
policy to Ulysses attention (cispo/learner/sequence_parallel.py) and its lightning layers to the exchange;
parts then arrive as SequenceShards (this rank's columns, targets shifted), and the forward and backward
run inside sequence_layout so that every attention layer, recomputed ones included, exchanges. With
packing too, parts arrive as PackedShards (cispo/learner/sp_packing.py: this rank's slice of the packed
stream, the layout's global cu_seqlens); their log-probs are scattered into the micro-batch's [B, L]
layout before the usual loss, with the response mask restricted to the tokens this rank scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cispo.algo.losses import get_policy_loss
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.stage import StageSettings
from cispo.core.types import TrainBatch
from cispo.learner.common import (
    StepParts,
    build_optimizer,
    current_lr,
    lr_lambda,
    micro_batch_loss,
    moe_context,
    policy_logprobs,
    prepare_policy,
    set_base_lr,
)
from cispo.learner.rank_weights import RankWeights
from cispo.learner.reference import RankReference
from cispo.learner.sequence_parallel import (
    SequenceShard,
    UlyssesExchange,
    enable_sequence_parallel,
    sequence_groups,
    sequence_layout,
    shard_logprobs,
)
from cispo.learner.sp_packing import PackedShard

# What a rank runs: a whole micro-batch, or (sequence parallelism) its columns of one, or (with packing)
# its slice of one packed into a stream.
Part = TrainBatch | SequenceShard | PackedShard


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            deep_merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def build_ds_config(
    cfg: LearnerConfig, world: int, bf16: bool, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """DeepSpeed config for one optimizer step per train_step with caller-owned accumulation."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        # Batch-size fields only feed DeepSpeed's throughput counters: micro-batches vary in size here.
        "train_batch_size": world,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # Every engine.step() is the accumulation boundary, whatever number of backward calls preceded it.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # The client optimizer is torch's AdamW: DeepSpeed's own (Fused/CPU) Adam JIT-compiles a C++ op.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }
    return deep_merge(config, overrides or {})


class LogprobModule(nn.Module):
    """The engine's module: trunk + FP32 chunked head in one forward, so that under ZeRO-3 the head
    weight (read directly, not through lm_head's forward) is gathered as this module's external
    parameter for the forward and again for the backward."""

    def __init__(self, policy: nn.Module, cfg: LearnerConfig, temperature: float, packing: bool) -> None:
        super().__init__()
        self.policy, self.cfg, self.temperature, self.packing = policy, cfg, temperature, packing

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        with_entropy: bool,
        targets: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if targets is not None:  # a sequence shard: response_mask and targets already shifted
            inputs = (input_ids, attention_mask, response_mask, targets, position_ids)
            return shard_logprobs(
                self.policy,
                inputs,
                chunk_size=self.cfg.logprob_chunk_size,
                temperature=self.temperature,
                with_entropy=with_entropy,
            )
        rows = input_ids.shape[0]
        part = TrainBatch(
            input_ids,
            attention_mask,
            response_mask,
            torch.zeros_like(response_mask),
            torch.zeros(rows),
            torch.zeros(rows, dtype=torch.long),
        )
        return policy_logprobs(self.policy, part, self.cfg, self.temperature, with_entropy, self.packing)


class DeepSpeedRank:
    """The actor body (wrapped with ray.remote by the facade). Methods run one at a time, in call order."""

    def __init__(self, rank: int, world: int, threads: int) -> None:
        self.rank, self.world = rank, world
        torch.set_num_threads(max(1, threads))
        self.engine: Any = None
        self.exchange: UlyssesExchange | None = None

    def ready(self) -> int:
        return os.getpid()

    def node(self) -> dict[str, Any]:
        """Where this rank runs (for placement.json)."""
        import ray

        gpus = ray.get_gpu_ids() if torch.cuda.is_available() else []
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in gpus],
            "built_partitioned": bool(getattr(self, "built_partitioned", False)),
        }

    def free_port(self) -> tuple[str, int]:
        """This node's address and a port free on it (rank 0's: the rendezvous of the default group and of
        the weight channel)."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), int(sock.getsockname()[1])

    def setup(self, master_addr: str, master_port: int, init: dict[str, Any]) -> None:
        _distributed_env(self.rank, self.world, master_addr, master_port)
        import deepspeed

        self.cfg: LearnerConfig = init["cfg"]
        self.algorithm: AlgorithmConfig = init["algorithm"]
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        policy = _materialise(init["model"], self.cfg, init.get("ds_config"), init.get("zero_init", False))
        # Built inside zero.Init, every parameter is already a partition (ds_id) before initialize().
        self.built_partitioned = all(hasattr(p, "ds_id") for p in policy.parameters())
        prepare_policy(policy, self.cfg)
        size = self.cfg.sequence_parallel_size
        if size > 1:
            # Every rank creates every SP group, in the same order, before DeepSpeed makes its own.
            group = sequence_groups(self.rank, self.world, size)
            self.exchange = UlyssesExchange(group, size, self.rank % size)
            enable_sequence_parallel(policy, size)
        self.bf16 = any(p.dtype == torch.bfloat16 for p in policy.parameters())
        self.module = LogprobModule(policy, self.cfg, init["temperature"], init["packing"])
        self.loss_fn = get_policy_loss(self.algorithm.loss)
        self.reference = self._build_reference(policy, init) if self.algorithm.kl_coef > 0 else None
        optimizer = build_optimizer(policy, self.cfg)
        steps = init["total_steps"] * self.algorithm.updates_per_batch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.cfg.schedule, self.cfg.warmup_steps, steps)
        )
        config = build_ds_config(self.cfg, self.world, self.bf16, init.get("ds_config"))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        if self.cfg.zero_stage == 3:
            deepspeed.zero.register_external_parameter(self.module, policy.get_output_embeddings().weight)
        self.policy = policy
        self.device = self.engine.device
        self.weights = RankWeights(policy, self.rank)

    def _build_reference(self, policy: nn.Module, init: dict[str, Any]) -> RankReference:
        """The KL's frozen reference (cispo/learner/reference.py), before the policy's engine exists."""
        return RankReference.build(
            policy,
            lambda model: LogprobModule(model, self.cfg, init["temperature"], init["packing"]),
            lambda: _materialise(
                init["model"], self.cfg, init.get("ds_config"), init.get("zero_init", False)
            ),
            rank=self.rank,
            sp_size=self.cfg.sequence_parallel_size,
            ds_config=build_ds_config(self.cfg, self.world, self.bf16, init.get("ds_config")),
        )

    def _reference_logprobs(self, part: Part) -> Tensor | None:
        """The frozen reference's log-probs of the part, by the policy's path (None: no KL)."""
        if self.reference is None:
            return None
        self.reference.module.temperature = self.module.temperature  # a stage may have changed it
        with torch.no_grad(), self._context(part, self.reference.policy):
            return self._run(part, False, self.reference.forward)[0]

    @contextlib.contextmanager
    def _context(self, part: Part, policy: nn.Module | None = None) -> Any:
        """Routing replay / router-logit capture (over the model's inputs), and the SP exchange (with the
        packed rows' global bounds), around a forward (and its backward: gradient checkpointing re-runs
        the forward there). policy: the model the forward runs (the reference's; default the policy)."""
        if self.exchange is None:
            layout: Any = contextlib.nullcontext()
        else:
            bounds = part.cu_seqlens if isinstance(part, PackedShard) else None
            layout = sequence_layout(self.exchange, bounds)
        packed = self._packs_whole(part)
        model = self.policy if policy is None else policy
        with moe_context(model, _inputs(part), self.cfg, packed) as router_logits, layout:
            yield router_logits

    def _packs_whole(self, part: Part) -> bool:
        """A whole micro-batch that the module packs into one stream (packing without SP; with SP a part
        arrives as its own slice of the stream, a PackedShard)."""
        return self.module.packing and not isinstance(part, (PackedShard, SequenceShard))

    def _run(
        self, part: Part, with_entropy: bool, engine: Callable[..., Any] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """[B, L] log-probs (and entropy) in the part's loss layout (a SequenceShard's: its shifted
        columns). engine: what runs the forward (the reference's; default the policy's engine)."""
        batch = _inputs(part)
        engine = self.engine if engine is None else engine
        if isinstance(part, PackedShard):
            lp, ent = engine(
                batch.input_ids, batch.attention_mask, batch.response_mask, with_entropy, part.targets,
                part.position_ids,
            )  # fmt: skip
            return part.scatter(lp), (None if ent is None else part.scatter(ent))
        extra = (part.targets, part.position_ids()) if isinstance(part, SequenceShard) else ()
        return engine(batch.input_ids, batch.attention_mask, batch.response_mask, with_entropy, *extra)

    def _forward(self, part: Part, with_entropy: bool) -> tuple[Tensor, Tensor | None, list | None]:
        part = _to(part, self.device)
        with self._context(part) as router_logits:
            logprobs, entropy = self._run(part, with_entropy)
        return logprobs, entropy, router_logits

    def train(self, parts: list[tuple[Part, Tensor, float, bool]], return_logprobs: bool) -> tuple:
        """Backward over this rank's micro-batches, then one engine.step(): (StepParts, grad norm, lr,
        logprobs per part, applied). A non-finite global gradient norm makes DeepSpeed discard the step
        on every rank (gradients cleared, optimizer and scheduler untouched): reported as not applied."""
        self.engine.train()
        step = StepParts()
        seen = []
        lr = current_lr(self.scheduler)
        for part, weights, share, dummy in parts:
            part = _to(part, self.device)
            # The backward inside the replay too: gradient checkpointing recomputes the forward there, and
            # must route it the same way (else it saves other tensors and torch raises CheckpointError).
            batch = _batch(part)
            ref_logprobs = self._reference_logprobs(part)
            with self._context(part) as router_logits:
                logprobs, entropy = self._run(part, True)
                loss, metrics = micro_batch_loss(
                    self.policy,
                    logprobs,
                    entropy,
                    batch,
                    weights.to(self.device),
                    router_logits,
                    loss_fn=self.loss_fn,
                    cfg=self.cfg,
                    algorithm=self.algorithm,
                    token_share=share,
                    packing=self._packs_whole(part),
                    ref_logprobs=ref_logprobs,
                )
                # ZeRO averages gradients over ranks; each rank's loss is already its share of the sum.
                self.engine.backward(loss * self.world)
            if not dummy:
                step.add(metrics, loss, share)
            seen.append(logprobs.detach().cpu() if return_logprobs else None)
        finite = torch.tensor([1.0 if math.isfinite(step.loss) else 0.0])
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        self.engine.step()
        applied = not getattr(self.engine.optimizer, "overflow", False)
        if applied and finite.item() < 1:
            # A non-finite loss whose gradients came out finite (nothing DeepSpeed could see): the update
            # is already in the weights, so stop rather than train on from an unknown state.
            raise FloatingPointError("non-finite loss with a finite gradient norm; the step was applied")
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None or not applied else float(grad_norm)
        return step, grad_norm, lr, seen, applied

    def train_many(self, minibatches: list[list[tuple]], return_logprobs: list[bool]) -> list[tuple]:
        """train() on each minibatch's micro-batches in order: K optimizer steps in one request."""
        return [self.train(parts, flag) for parts, flag in zip(minibatches, return_logprobs, strict=True)]

    def apply_settings(self, settings: StageSettings) -> None:
        """A curriculum stage's settings (see TorchLearner.apply_settings), on this rank."""
        if settings.lr is not None:
            set_base_lr(self.scheduler, settings.lr)
        if settings.grad_clip is not None:
            self.cfg = dataclasses.replace(self.cfg, grad_clip=settings.grad_clip)
            # DeepSpeed reads the clip from its config in the engine and keeps a copy in the ZeRO optimizer.
            self.engine._config.gradient_clipping = settings.grad_clip
            if hasattr(self.engine.optimizer, "clip_grad"):
                self.engine.optimizer.clip_grad = settings.grad_clip
        if settings.loss_kwargs is not None:
            self.algorithm = dataclasses.replace(self.algorithm, loss_kwargs=dict(settings.loss_kwargs))
        if settings.temperature is not None:
            self.module.temperature = settings.temperature

    def weights_finite(self) -> bool:
        """This rank's share of the weights (its ZeRO-3 partition, or the full ZeRO-2 copy) is finite."""
        tensors = [getattr(p, "ds_tensor", p.data) for p in self.policy.parameters()]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())

    @torch.no_grad()
    def logprobs(self, parts: list[Part]) -> list[Tensor]:
        self.engine.eval()
        return [self._forward(part, with_entropy=False)[0].cpu() for part in parts]

    def save(self, directory: str, version: int) -> None:
        self.engine.save_checkpoint(directory, tag="learner", client_state={"version": version})
        if self.reference is not None:  # the step-0 policy, for an exact resume
            self.reference.save(directory)

    def load(self, directory: str) -> int:
        from cispo.learner.ds_checkpoint import safe_engine_loads

        with safe_engine_loads(self.engine):  # weights_only=True: a checkpoint file never runs code
            _, client_state = self.engine.load_checkpoint(directory, tag="learner")
        if self.reference is not None:
            self.reference.load(directory)
        return int((client_state or {}).get("version", 0))

    # The weight channel and the other ways weights leave (see RankWeights).
    def weight_metas(self) -> list:
        return self.weights.metas()

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        self.weights.join(host, port, world_size, backend)

    def send_weights(self, bucket_bytes: int) -> None:
        self.weights.send(bucket_bytes, self.device)

    def weights_ref(self) -> list:
        return self.weights.put_in_object_store()

    def full_state(self) -> dict[str, Tensor] | None:
        return self.weights.full_state()

    def save_hf(self, template_dir: str, out_dir: str, shard_bytes: int, files: dict[str, str]) -> None:
        self.weights.save_hf(template_dir, out_dir, shard_bytes, files)


def _distributed_env(rank: int, world: int, master_addr: str, master_port: int) -> None:
    """What torch.distributed and DeepSpeed read, set before deepspeed is imported."""
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed.ops

        # DeepSpeed's CPU shared-memory all-reduce serves only inference_all_reduce, yet comm init
        # JIT-compiles it (20-300 s on a busy 2-core box); training collectives go through gloo anyway.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Ray gives each rank its own GPU (CUDA_VISIBLE_DEVICES), so within the actor it is device 0.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(0)


def _materialise(
    model: nn.Module | Callable[[], nn.Module],
    cfg: LearnerConfig,
    ds_overrides: dict[str, Any] | None,
    zero_init: bool,
) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if not (zero_init and cfg.zero_stage == 3):
        return model()
    from transformers.integrations import HfDeepSpeedConfig

    # Kept alive while from_pretrained runs: transformers then builds inside deepspeed.zero.Init and
    # loads each rank's shards of the checkpoint (it consults a weak global reference to this object).
    world = int(os.environ["WORLD_SIZE"])
    hf_config = HfDeepSpeedConfig(build_ds_config(cfg, world, False, ds_overrides))
    built = model()
    del hf_config
    return built


def _batch(part: Part) -> TrainBatch:
    """The part in its loss layout."""
    return part if isinstance(part, TrainBatch) else part.batch


def _inputs(part: Part) -> TrainBatch:
    """The part as the model sees it (a PackedShard's stream slice; routing replay aligns with it)."""
    return part.stream if isinstance(part, PackedShard) else _batch(part)


def _to(part: Part, device: torch.device) -> Part:
    if isinstance(part, (SequenceShard, PackedShard)):
        return part if part.targets.device == device else part.to(device)
    if part.input_ids.device == device:
        return part
    moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(part).items()}
    return TrainBatch(**moved)
