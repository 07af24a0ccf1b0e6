"""Samples + advantages -> TrainBatch tensors, and the split into K off-policy minibatches."""

from __future__ import annotations

import torch

from cispo.core.moe import NO_CHOICE
from cispo.core.types import Sample, TrainBatch


def build_train_batch(samples: list[Sample], advantages: torch.Tensor, pad_token_id: int) -> TrainBatch:
    """Right-padded [B, L] tensors: prompt then response; only response positions are trained."""
    if len(samples) != advantages.shape[0]:
        raise ValueError(f"{len(samples)} samples but {advantages.shape[0]} advantages")
    if not samples:
        raise ValueError("cannot build a TrainBatch from no samples")
    length = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    response_mask = torch.zeros(batch, length, dtype=torch.float32)
    old_logprobs = torch.zeros(batch, length, dtype=torch.float32)
    for row, sample in enumerate(samples):
        p, r = len(sample.prompt_ids), len(sample.response_ids)
        input_ids[row, : p + r] = torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.long)
        attention_mask[row, : p + r] = 1
        response_mask[row, p : p + r] = 1.0
        old_logprobs[row, p : p + r] = torch.tensor(sample.behaviour_logprobs, dtype=torch.float32)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        old_logprobs=old_logprobs,
        advantages=advantages.to(torch.float32),
        group_ids=torch.tensor([s.group_index for s in samples], dtype=torch.long),
        routed_experts=_routed_experts(samples, length),
    )


def _routed_experts(samples: list[Sample], length: int) -> torch.Tensor | None:
    """[B, L, n_moe_layers, top_k] int64 aligned with input_ids, NO_CHOICE (-1) on padding; None unless every
    sample carries routing (a partial replay would silently mix replayed and free routing in one batch)."""
    if not samples or any(s.routed_experts is None for s in samples):
        return None
    shape = samples[0].routed_experts.shape[1:]
    routed = torch.full((len(samples), length, *shape), NO_CHOICE, dtype=torch.long)
    for row, sample in enumerate(samples):
        if sample.routed_experts.shape[1:] != shape:
            raise ValueError(
                f"routed_experts of row {row} is {tuple(sample.routed_experts.shape)}; "
                f"row 0 has [*, {', '.join(map(str, shape))}]"
            )
        routed[row, : sample.routed_experts.shape[0]] = sample.routed_experts.to(torch.long)
    return routed


def split_minibatches(
    batch: TrainBatch, num_minibatches: int, generator: torch.Generator
) -> list[TrainBatch]:
    """K shuffled, near-equal minibatches; each one is one optimizer step (off-policy updates)."""
    k = min(num_minibatches, len(batch))
    order = torch.randperm(len(batch), generator=generator)
    return [batch.select(rows) for rows in torch.tensor_split(order, k)]
