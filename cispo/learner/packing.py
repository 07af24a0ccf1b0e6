"""Sequence packing for the learner forward: the rows of a right-padded TrainBatch laid end to end in one
[1, T] stream, no padding computed.

Boundaries, softmax-attention layers: position_ids restart at 0 at every sequence start and no
attention_mask is passed; transformers then derives the sequence boundaries from the position_ids
(masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask for eager/SDPA, or
cu_seqlens for flash-attention varlen. Rotary embeddings use the restarted positions.

Boundaries, the hybrid MiniMax's lightning-attention layers: their recurrent K^T V state would run from
the first token of the stream to the last. `packed_sequence_logprobs` installs the boundary-aware
lightning forward (cispo.models.lightning.install_lightning) and runs the trunk under
`sequence_layout(cu_seqlens=...)` (also passed as its keyword, for gradient-checkpoint recomputes), so
the state restarts at zero at every sequence start; the softmax layers of the hybrid get their
block-diagonal mask from the position_ids as in a dense model. Either way a token's log-prob is the same
as in its own unpadded forward (up to kernel rounding; tests/learner/test_packing.py). Other recurrent
layers (mamba, gated delta nets, ...) have no boundary reset here and asking to pack them raises
PackingNotSupported (use token-budget micro-batches, cispo.learner.micro_batches.token_budget_chunks).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cispo.algo.logprobs import token_logprobs
from cispo.core.types import TrainBatch
from cispo.models.lightning import LAYOUT_KWARG, install_lightning, lightning_layers, sequence_layout

RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "recurrent", "lightning_attention")
# Module class names of layers that carry state along the sequence (MiniMax lightning layers excepted).
RECURRENT_MODULE_NAMES = ("Lightning", "Mamba", "DeltaNet", "Rwkv", "RWKV")


class PackingNotSupported(ValueError):
    pass


def packing_blocker(model: nn.Module) -> str | None:
    """Why `model` cannot be packed (a layer that carries state along the sequence and has no boundary
    reset), or None. MiniMax lightning layers have one (cispo.models.lightning) and pass."""
    lightning = lightning_layers(model)
    config = getattr(model, "config", None)
    layer_types = list(getattr(config, "layer_types", None) or [])
    recurrent = {t for t in layer_types if t in RECURRENT_LAYER_TYPES}
    if layer_types.count("linear_attention") == len(lightning):  # each one a MiniMax lightning layer
        recurrent.discard("linear_attention")
    if recurrent:
        return (
            f"{type(model).__name__} has {'/'.join(sorted(recurrent))} layers whose state would run across "
            "the whole packed stream (no reset at sequence boundaries), so packed log-probs would be wrong"
        )
    known = {id(m) for m in lightning}
    for module in model.modules():
        name = type(module).__name__
        if id(module) not in known and any(word in name for word in RECURRENT_MODULE_NAMES):
            return f"{type(model).__name__} contains {name}, a recurrent layer that cannot be packed"
    return None


def check_packing(model: nn.Module) -> None:
    reason = packing_blocker(model)
    if reason is not None:
        raise PackingNotSupported(
            f"sequence packing requested but {reason}; use token-budget micro-batches "
            "(learner.micro_batch_tokens) for this model instead"
        )


@dataclass
class PackedRows:
    """Rows of a TrainBatch end to end. All token tensors are [1, T] with T = sum of row lengths."""

    input_ids: Tensor
    position_ids: Tensor
    predicted: Tensor  # [T] bool: token t is a trained response token predicted from token t-1 of its row
    rows: Tensor  # [T] row of each packed token
    cols: Tensor  # [T] column of each packed token in the padded batch
    lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def cu_seqlens(self) -> list[int]:
        """Sequence starts in the stream, 0 first and T last (the flash-attention varlen convention)."""
        return [0, *itertools.accumulate(self.lengths)]


def pack_rows(batch: TrainBatch) -> PackedRows:
    """Packs the non-padding tokens of every row (rows are right-padded, so the first n_b tokens)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    keep = batch.attention_mask.bool()
    rows, cols = keep.nonzero(as_tuple=True)
    starts = torch.zeros_like(cols, dtype=torch.bool)
    starts[cols == 0] = True
    predicted = batch.response_mask.bool()[rows, cols] & ~starts
    return PackedRows(
        input_ids=batch.input_ids[rows, cols].unsqueeze(0),
        position_ids=cols.unsqueeze(0),
        predicted=predicted,
        rows=rows,
        cols=cols,
        lengths=[int(n) for n in lengths],
    )


def packed_routing(batch: TrainBatch) -> Tensor | None:
    """batch.routed_experts [B, L, layers, k] in pack_rows' stream order: [1, T, layers, k] (or None), so
    routing replay lines up with a packed forward."""
    if batch.routed_experts is None:
        return None
    rows, cols = batch.attention_mask.bool().nonzero(as_tuple=True)
    return batch.routed_experts[rows, cols].unsqueeze(0)


def packed_sequence_logprobs(
    model: nn.Module,
    batch: TrainBatch,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Like cispo.algo.logprobs.sequence_logprobs (same [B, L] output layout) but one packed forward."""
    check_packing(model)
    packed = pack_rows(batch)
    trunk = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    with contextlib.ExitStack() as stack:
        extra = {}
        if install_lightning(model):
            # The keyword as well as the contextvar: a checkpoint recompute runs after this block.
            extra[LAYOUT_KWARG] = stack.enter_context(sequence_layout(cu_seqlens=packed.cu_seqlens))
        out = trunk(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            attention_mask=None,
            use_cache=False,
            **extra,
        )
    hidden = out.last_hidden_state[0]
    # Token t is predicted by the hidden state at t-1, which belongs to the same row because row starts
    # are never in `predicted`.
    targets_at = packed.predicted.nonzero(as_tuple=True)[0]
    head = model.get_output_embeddings()
    lp_flat, ent_flat = token_logprobs(
        hidden[targets_at - 1],
        head.weight,
        packed.input_ids[0, targets_at],
        bias=getattr(head, "bias", None),
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )

    def scatter(values: Tensor) -> Tensor:
        dense = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=values.device)
        return dense.index_put((packed.rows[targets_at], packed.cols[targets_at]), values)

    return scatter(lp_flat), (None if ent_flat is None else scatter(ent_flat))


def padded_fraction(batch: TrainBatch) -> float:
    """Share of the padded [B, L] positions that are padding (what packing saves)."""
    return 1.0 - float(batch.attention_mask.sum()) / max(batch.attention_mask.numel(), 1)
