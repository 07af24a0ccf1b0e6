"""What the torch and DeepSpeed learners share: the lr schedule, the optimizer, and one micro-batch's
forward + loss (routing replay, router aux loss, packing) with its metric bookkeeping.

Exactness of accumulation: token weights are computed once over the whole minibatch (all ranks), so the
sum of the micro-batch losses is the minibatch loss and their gradients sum to its gradient. The router
aux loss is the exception: it is a product of per-token means, so each micro-batch's aux loss is weighted
by its share of the minibatch's tokens, which equals the full-batch aux loss only to first order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from cispo.algo.kl import reference_kl
from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.metrics import combine_metrics
from cispo.core.moe import capture_router_logits, replay_routing, router_aux_loss
from cispo.core.types import TrainBatch
from cispo.learner.packing import check_packing, packed_routing, packed_sequence_logprobs


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to 10% (as a multiplier of the base lr)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def set_base_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """A new base lr under a LambdaLR schedule, from the next step on; the warm-up/decay factor is kept."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * factor(scheduler.last_epoch)


def current_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The lr the next optimizer step uses. Not get_last_lr(): that keeps the value from before a
    set_base_lr until the scheduler next steps, so a stage's new lr would be logged one step late."""
    return float(scheduler.optimizer.param_groups[0]["lr"])


FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg: LearnerConfig) -> torch.optim.Optimizer:
    """The report's AdamW: betas (0.9, 0.95) and eps 1e-15, since RL gradients are tiny and eps 1e-8
    would swamp the second-moment estimate.

    Fused (one kernel over every parameter) where torch has the kernel: torch's default on CPU is the
    per-tensor loop, which was the largest fixed cost of a minibatch update (benchmarks/learner_throughput.py:
    ~60 ms vs ~15 ms per step on the 11M-parameter benchmark model at 1 thread), and TRL's Trainer uses the
    fused one (its default optim is adamw_torch_fused)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def prepare_policy(model: nn.Module, cfg: LearnerConfig) -> nn.Module:
    """Learner-side switches on the policy module itself (both backends, before any optimizer exists)."""
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"config error at learner.gradient_checkpointing: {type(model).__name__} does not support it"
            )
        # Non-reentrant: works with inputs that need no grad and with the FP32-head hook outside the trunk.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wants_packing(model: nn.Module, cfg: LearnerConfig) -> bool:
    """learner.packing (when the config has it): validated against the model once, at construction."""
    packing = bool(getattr(cfg, "packing", False))
    if packing:
        check_packing(model)
    return packing


def policy_logprobs(
    model: nn.Module,
    part: TrainBatch,
    cfg: LearnerConfig,
    temperature: float,
    with_entropy: bool,
    packing: bool,
) -> tuple[Tensor, Tensor | None]:
    """[B, L] log-probs (and entropy) of one micro-batch, padded or packed."""
    kwargs = {"chunk_size": cfg.logprob_chunk_size, "temperature": temperature, "with_entropy": with_entropy}
    if packing:
        return packed_sequence_logprobs(model, part, **kwargs)
    return sequence_logprobs(model, part.input_ids, part.attention_mask, part.response_mask, **kwargs)


@contextlib.contextmanager
def moe_context(
    model: nn.Module, part: TrainBatch, cfg: LearnerConfig, packing: bool = False
) -> Iterator[list[Tensor] | None]:
    """Routing replay (learner.routing_replay and the batch carries routing) and router-logit capture
    (learner.router_aux_loss_coef > 0) around one forward; yields the captured logits or None. packing:
    the forward runs on part packed (pack_rows), so the replayed routing is packed the same way."""
    replay = (packed_routing(part) if packing else part.routed_experts) if cfg.routing_replay else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(replay_routing(model, replay))
        captured = stack.enter_context(capture_router_logits(model)) if cfg.router_aux_loss_coef > 0 else None
        yield captured


def micro_batch_loss(
    model: nn.Module,
    logprobs: Tensor,
    entropy: Tensor | None,
    part: TrainBatch,
    token_weights: Tensor,
    router_logits: list[Tensor] | None,
    *,
    loss_fn: Callable[..., tuple[Tensor, dict[str, Tensor]]],
    cfg: LearnerConfig,
    algorithm: AlgorithmConfig,
    token_share: float,
    packing: bool = False,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's term of the minibatch loss (policy loss + its share of the router aux loss +
    algorithm.kl_coef * the reference-KL penalty, with `ref_logprobs` the frozen reference's log-probs).
    packing: the router logits are those of the packed stream, every token of it real."""
    loss, metrics = loss_fn(
        logprobs,
        part.old_logprobs,
        part.advantages,
        part.response_mask,
        token_weights=token_weights,
        **algorithm.loss_kwargs,
    )
    if algorithm.kl_coef > 0:
        loss = add_reference_kl(loss, metrics, logprobs, ref_logprobs, part, token_weights, algorithm.kl_coef)
    if router_logits:
        mask = part.attention_mask
        if packing:
            mask = torch.ones(1, int(part.attention_mask.sum()), dtype=mask.dtype, device=mask.device)
        aux = router_aux_loss(router_logits, mask, model)
        loss = loss + cfg.router_aux_loss_coef * token_share * aux
        metrics["router_aux_loss"] = aux.detach()
    if entropy is not None:
        metrics["entropy"] = (entropy * part.response_mask).sum() / part.response_mask.sum().clamp(min=1)
    return loss, metrics


def add_reference_kl(
    loss: Tensor,
    metrics: dict[str, Tensor],
    logprobs: Tensor,
    ref_logprobs: Tensor | None,
    part: TrainBatch,
    token_weights: Tensor,
    coef: float,
) -> Tensor:
    """loss + coef * the k3 reference-KL penalty (cispo/algo/kl.py) with the policy loss's token weights,
    so micro-batch terms sum to the minibatch's; its metric (kl_ref) goes into `metrics`."""
    if ref_logprobs is None:
        raise ValueError("algorithm.kl_coef > 0 but the learner passed no reference log-probs")
    penalty, kl_metrics = reference_kl(logprobs, ref_logprobs, part.response_mask, token_weights)
    metrics.update(kl_metrics)
    return loss + coef * penalty


class StepParts:
    """The micro-batches of one optimizer step (on one rank, or merged over ranks): their metrics with
    their token shares of the minibatch, and the summed loss (each micro-batch's loss is its term of the
    minibatch loss). combine_metrics (cispo.core.metrics) owns how the metrics combine."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.shares: list[float] = []
        self.loss = 0.0

    def add(self, metrics: dict[str, Tensor], loss: Tensor, share: float) -> None:
        self.metrics.append({key: float(value) for key, value in metrics.items()})
        self.shares.append(share)
        self.loss += float(loss.detach())

    def merge(self, other: StepParts) -> StepParts:
        self.metrics += other.metrics
        self.shares += other.shares
        self.loss += other.loss
        return self

    def result(self, grad_norm: float, lr: float) -> dict[str, float]:
        out = combine_metrics(self.metrics, self.shares)
        out.update({"loss": self.loss, "grad_norm": grad_norm, "lr": lr})
        return out
