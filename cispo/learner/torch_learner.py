"""Single-process PyTorch learner: any registered policy loss, AdamW, token-budget micro-batches."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cispo.algo.losses import get_policy_loss, normalization_weights
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.placement import PlacementEntry
from cispo.core.stage import StageSettings
from cispo.core.types import StepResult, TrainBatch
from cispo.core.weight_channel import WeightSource
from cispo.learner import register_learner
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
    wants_packing,
)
from cispo.learner.hf_export import unique_tensors, write_hf
from cispo.learner.micro_batches import token_budget_chunks
from cispo.learner.reference import frozen_copy, load_reference, save_reference_state

__all__ = ["TorchLearner", "build_optimizer", "lr_lambda", "unique_tensors"]

WEIGHTS, OPTIMIZER = "model.safetensors", "optimizer.pt"


@register_learner("torch")
class TorchLearner:
    ray_ranks = False  # runs in the driver: it takes the model itself and reserves nothing on Ray

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: LearnerConfig,
        algorithm: AlgorithmConfig,
        *,
        total_steps: int = 1000,
        temperature: float = 1.0,
    ) -> None:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.model, self.cfg, self.algorithm, self.temperature = model, cfg, algorithm, temperature
        prepare_policy(model, cfg)
        # The reference-KL's frozen policy as RL starts (cispo/learner/reference.py); only with kl_coef > 0.
        self.reference = frozen_copy(model) if algorithm.kl_coef > 0 else None
        self.loss_fn = get_policy_loss(algorithm.loss)
        self.optimizer = build_optimizer(model, cfg)
        steps = total_steps * algorithm.updates_per_batch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, steps)
        )
        self.version = 0
        self.packing = wants_packing(model, cfg)
        self.placement: list[PlacementEntry] = [
            {"role": "learner", "rank": 0, "in": "driver", "pid": os.getpid()}
        ]

    def _logprobs(self, batch: TrainBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return policy_logprobs(self.model, batch, self.cfg, self.temperature, with_entropy, self.packing)

    @torch.no_grad()
    def _reference_logprobs(self, part: TrainBatch) -> torch.Tensor | None:
        """The frozen reference's [B, L] log-probs of the part, by the policy's path (None: no KL)."""
        if self.reference is None:
            return None
        with moe_context(self.reference, part, self.cfg, self.packing):
            return policy_logprobs(self.reference, part, self.cfg, self.temperature, False, self.packing)[0]

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        out = torch.zeros_like(batch.old_logprobs)
        for rows in token_budget_chunks(batch, self.cfg.micro_batch_tokens):
            part = batch.select(rows)
            with moe_context(self.model, part, self.cfg, self.packing):
                out[rows, : part.input_ids.shape[1]] = self._logprobs(part, with_entropy=False)[0]
        return out

    def train_steps(
        self, minibatches: list[TrainBatch], return_logprobs: Sequence[bool] | None = None
    ) -> list[StepResult]:
        """K optimizer steps, one per minibatch in order: the same updates as K train_step calls."""
        flags = return_logprobs or [False] * len(minibatches)
        return [self.train_step(batch, flag) for batch, flag in zip(minibatches, flags, strict=True)]

    def train_step(self, batch: TrainBatch, return_logprobs: bool = False) -> StepResult:
        """One optimizer step on one minibatch; the loss is normalised over the whole minibatch.

        With return_logprobs, the result carries the current policy's [B, L] log-probs of the batch, taken
        in the same forward, so before this step's update.
        """
        self.model.train()
        weights = normalization_weights(batch.response_mask, self.algorithm.normalizer, batch.group_ids)
        parts = StepParts()
        tokens = max(batch.num_response_tokens(), 1)
        seen_logprobs = torch.zeros_like(batch.old_logprobs) if return_logprobs else None
        for rows in token_budget_chunks(batch, self.cfg.micro_batch_tokens):
            part = batch.select(rows)
            share = part.num_response_tokens() / tokens
            ref_logprobs = self._reference_logprobs(part)
            # The backward inside the replay too: gradient checkpointing recomputes the forward there, and
            # must route it the same way (else it saves other tensors and torch raises CheckpointError).
            with moe_context(self.model, part, self.cfg, self.packing) as router_logits:
                logprobs, entropy = self._logprobs(part, with_entropy=True)
                loss, metrics = micro_batch_loss(
                    self.model,
                    logprobs,
                    entropy,
                    part,
                    weights[rows, : part.input_ids.shape[1]],
                    router_logits,
                    loss_fn=self.loss_fn,
                    cfg=self.cfg,
                    algorithm=self.algorithm,
                    token_share=share,
                    packing=self.packing,
                    ref_logprobs=ref_logprobs,
                )
                loss.backward()
            parts.add(metrics, loss, share)
            if seen_logprobs is not None:
                seen_logprobs[rows, : part.input_ids.shape[1]] = logprobs.detach()
        grad_norm = float(
            # foreach: one norm kernel per dtype instead of one per parameter (the per-tensor loop is
            # torch's default off CUDA).
            torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.cfg.grad_clip or float("inf"), foreach=True
            )
        )
        lr = current_lr(self.scheduler)
        # A non-finite loss or gradient norm would write NaN into the weights: skip the update instead
        # (the driver counts skips and stops the run after learner.max_nonfinite_steps in a row).
        finite = math.isfinite(parts.loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.version += 1
        self.optimizer.zero_grad(set_to_none=True)
        metrics = parts.result(grad_norm, lr)
        metrics["skipped_frac"] = 0.0 if finite else 1.0
        return StepResult(metrics, seen_logprobs)

    def apply_settings(self, settings: StageSettings) -> None:
        """A curriculum stage's settings (those it sets; None keeps the current), from the next step on."""
        if settings.normalizer is not None:
            self.algorithm = dataclasses.replace(self.algorithm, normalizer=settings.normalizer)
        if settings.lr is not None:
            set_base_lr(self.scheduler, settings.lr)
        if settings.grad_clip is not None:
            self.cfg = dataclasses.replace(self.cfg, grad_clip=settings.grad_clip)
        if settings.loss_kwargs is not None:
            self.algorithm = dataclasses.replace(self.algorithm, loss_kwargs=dict(settings.loss_kwargs))
        if settings.temperature is not None:
            self.temperature = settings.temperature

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def weight_source(self) -> WeightSource | None:
        """None: the weights leave only through state_dict_for_sync, in this process."""
        return None

    def save_hf(
        self, template_dir: str | Path, out_dir: str | Path, files: Mapping[str, str] | None = None
    ) -> None:
        """The policy in Hugging Face format under `out_dir` (cispo/learner/hf_export.py), with `files`."""
        write_hf(self.model.state_dict(), template_dir, out_dir, files)

    def save(self, directory: str) -> None:
        """Weights as safetensors (`model.safetensors`, each shared tensor once); optimizer, scheduler and
        version as plain tensors and values (`optimizer.pt`, read back with weights_only=True)."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file(unique_tensors(self.model.state_dict()), str(path / WEIGHTS), metadata={"format": "pt"})
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "version": self.version,
            },
            path / OPTIMIZER,
        )
        if self.reference is not None:  # the step-0 policy, for an exact resume (cispo/learner/reference.py)
            save_reference_state(self.reference.state_dict(), path)

    def load(self, directory: str) -> None:
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / WEIGHTS).exists() and (path / "learner.pt").exists():
            raise RuntimeError(
                f"{path} is a checkpoint from before safetensors (learner.pt), which resume no longer "
                "unpickles: `cispo-export` still reads it; train on from the export with model.name=<its dir>"
            )
        weights = load_file(str(path / WEIGHTS))
        tied = set(self.model.state_dict()) - set(unique_tensors(self.model.state_dict()))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"{path / WEIGHTS} does not fit the policy: missing {sorted(set(missing) - tied)}, "
                f"unexpected {sorted(unexpected)}"
            )
        state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        if self.reference is not None:
            load_reference(self.reference, path)

    def close(self) -> None:
        pass
