"""Sequence parallelism with packing (learner.sequence_parallel_size > 1 and learner.packing): one SP rank's
slice of a micro-batch packed into a single stream.

Layout. A micro-batch's rows are packed end to end (cispo.learner.packing.pack_rows) into one [1, T]
stream, padded at the end to T' = a multiple of SP; rank r holds stream positions [r c, (r + 1) c),
c = T' / SP: input ids, the per-row restarting position ids (rotary), the routed experts of those tokens
(routing replay; -1 on the padding). The trunk runs under sequence_parallel.sequence_layout with the
GLOBAL cu_seqlens of the padded stream (the padding is one more segment): softmax attention is
block-diagonal causal over the full stream after the all-to-all, and the lightning layers restart their
state at every row start, so each row sees exactly what it sees alone.

Log-probs. The hidden state at stream position p predicts the token at p + 1, scored when p + 1 is a
trained response token of the same row (pack_rows' `predicted` never marks a row start, so no score
crosses a row boundary; a row boundary inside a rank's slice or at the split point changes nothing).
Rank r therefore scores the targets at stream positions (r c, (r + 1) c]: every trained token of the
micro-batch on exactly one rank. The log-probs are scattered into the micro-batch's [B, L] padded
layout; the loss is the usual loss function on [B, L] with the response mask restricted to the tokens
this rank scores (and the global per-token weights), so the ranks' losses sum to the micro-batch's
term of the minibatch loss and backward(loss * world) is exact as without packing
(sequence_parallel.py's docstring). log-probs returned for the driver are the ranks' disjoint [B, L]
scatters, summed by the facade (stitch_packed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cispo.core.types import TrainBatch
from cispo.learner.packing import pack_rows
from cispo.learner.sequence_parallel import padded_length


@dataclass
class PackedShard:
    """One SP rank's slice of one packed micro-batch.

    stream: the model's inputs, [1, c]: input_ids, attention_mask (0 on the end padding), response_mask =
      whether local position p scores its target (the token at stream position p + 1), routed_experts
      [1, c, n_moe_layers, top_k] or None; old_logprobs / advantages / group_ids are placeholders.
    batch: the micro-batch in its [B, L] padded layout for the loss, response_mask restricted to the
      tokens this rank scores.
    """

    stream: TrainBatch
    batch: TrainBatch
    targets: Tensor  # [1, c] the token at stream position p + 1
    position_ids: Tensor  # [1, c] position of each local token within its row
    rows: Tensor  # [n] row and column in `batch` of each scored target, in stream order
    cols: Tensor
    cu_seqlens: Tensor  # global starts of the packed rows in the padded stream, 0 .. T'
    start: int  # stream position of local position 0

    def to(self, device: torch.device) -> PackedShard:
        def move(batch: TrainBatch) -> TrainBatch:
            moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(batch).items()}
            return TrainBatch(**moved)

        return PackedShard(
            move(self.stream),
            move(self.batch),
            self.targets.to(device),
            self.position_ids.to(device),
            self.rows.to(device),
            self.cols.to(device),
            self.cu_seqlens,  # read on the host (segment bounds)
            self.start,
        )

    def scatter(self, values: Tensor) -> Tensor:
        """[1, c] values at the local positions (0 where nothing is scored) -> [B, L], differentiably."""
        picked = values[0][self.stream.response_mask[0].bool()]
        dense = torch.zeros(self.batch.input_ids.shape, dtype=values.dtype, device=values.device)
        return dense.index_put((self.rows, self.cols), picked)


def _padded(x: Tensor, length: int, value: float | bool) -> Tensor:
    """[T, ...] -> [length, ...], filled at the end."""
    filler = torch.full((length - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, filler])


def shard_packed(part: TrainBatch, weights: Tensor, sp_rank: int, size: int) -> tuple[PackedShard, Tensor]:
    """Rank sp_rank's PackedShard of one micro-batch and its token weights [B, L] (the global weights on
    the tokens it scores, 0 elsewhere)."""
    packed = pack_rows(part)
    total = packed.num_tokens
    full = padded_length(max(total, 1), size)
    c = full // size
    lo, hi = sp_rank * c, (sp_rank + 1) * c
    ids = _padded(packed.input_ids[0], full, 0)
    predicted = _padded(packed.predicted, full, False)
    # Local position p scores stream position p + 1 (the last stream position scores nothing).
    scores = torch.cat([predicted[1:], predicted.new_zeros(1)])[lo:hi]
    targets = torch.cat([ids[1:], ids.new_zeros(1)])[lo:hi]
    scored_at = scores.nonzero(as_tuple=True)[0] + lo + 1  # stream positions of this rank's targets
    rows, cols = packed.rows[scored_at], packed.cols[scored_at]
    mine = torch.zeros_like(part.response_mask)
    mine[rows, cols] = 1
    real = torch.zeros(full, dtype=part.attention_mask.dtype)
    real[:total] = 1
    routed = part.routed_experts
    if routed is not None:  # the stream's tokens' recorded experts; -1 (the router chooses) on the padding
        routed = _padded(routed[packed.rows, packed.cols], full, -1)[lo:hi][None]
    stream = TrainBatch(
        input_ids=ids[lo:hi][None],
        attention_mask=real[lo:hi][None],
        response_mask=scores[None].to(part.response_mask.dtype),
        old_logprobs=torch.zeros(1, c),
        advantages=torch.zeros(1),
        group_ids=torch.zeros(1, dtype=torch.long),
        routed_experts=routed,
    )
    batch = TrainBatch(
        input_ids=part.input_ids,
        attention_mask=part.attention_mask,
        response_mask=mine,
        old_logprobs=part.old_logprobs,
        advantages=part.advantages,
        group_ids=part.group_ids,
    )
    starts = packed.cu_seqlens + ([full] if full > total else [])
    shard = PackedShard(
        stream=stream,
        batch=batch,
        targets=targets[None],
        position_ids=_padded(packed.position_ids[0], full, 0)[lo:hi][None],
        rows=rows,
        cols=cols,
        cu_seqlens=torch.tensor(starts, dtype=torch.long),
        start=lo,
    )
    return shard, weights * mine


def stitch_packed(shards: list[Tensor]) -> Tensor:
    """The SP ranks' [B, L] outputs of one packed micro-batch (disjoint scatters) -> [B, L]."""
    return torch.stack(shards).sum(dim=0)
