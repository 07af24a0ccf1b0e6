"""Cutting a minibatch into micro-batches: token-budget chunks (one process) and per-rank plans (ZeRO)."""

from __future__ import annotations

import torch

from cispo.core.types import TrainBatch

# Per rank, the minibatch rows of each micro-batch it runs; None pads a rank to the common count.
Plan = list[list[torch.Tensor | None]]


def token_budget_chunks(batch: TrainBatch, max_tokens: int) -> list[torch.Tensor]:
    """Row groups whose padded size (rows x longest row) stays within max_tokens; rows sorted by length
    so that padding inside a micro-batch is small. A single row longer than the budget goes alone."""
    lengths = batch.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True)
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row in order.tolist():
        candidate = max(longest, int(lengths[row]))
        if current and candidate * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, candidate = [], int(lengths[row])
        current.append(row)
        longest = candidate
    if current:
        chunks.append(current)
    return [torch.tensor(c, dtype=torch.long) for c in chunks]


def shard_rows(batch: TrainBatch, world: int) -> list[torch.Tensor]:
    """Rows per rank, balancing tokens greedily (longest row to the lightest rank)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    loads = [0] * world
    shards: list[list[int]] = [[] for _ in range(world)]
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        target = min(range(world), key=lambda r: (loads[r], len(shards[r])))
        shards[target].append(row)
        loads[target] += lengths[row]
    return [torch.tensor(sorted(s), dtype=torch.long) for s in shards]


def plan_micro_batches(batch: TrainBatch, world: int, max_tokens: int) -> Plan:
    """Per rank, the minibatch rows of each micro-batch; None pads a rank to the common count."""
    plan: Plan = []
    for rows in shard_rows(batch, world):
        chunks = token_budget_chunks(batch.select(rows), max_tokens) if len(rows) else []
        plan.append([rows[chunk] for chunk in chunks])
    most = max(len(p) for p in plan)
    return [p + [None] * (most - len(p)) for p in plan]
