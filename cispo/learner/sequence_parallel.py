"""Sequence parallelism (learner.sequence_parallel_size = SP) for the DeepSpeed learner, Ulysses style.

Layout. The world's ranks form groups of SP consecutive ranks (rank = group * SP + sp_rank); ZeRO data
parallelism still runs over the whole world. Every rank of a group gets the same micro-batch rows, padded
on the right to Lp = a multiple of SP, and keeps the columns [sp_rank * c, (sp_rank + 1) * c), c = Lp / SP.
Embeddings, MLP/MoE layers, norms and the FP32 head are per token, so they run on the local shard
unchanged (routing replay: the routed experts sliced to the shard). position_ids are the global columns,
so rotary embeddings rotate each token by its true position.

Softmax attention. q, k, v [B, H, c, d] go through an all-to-all (UlyssesExchange.scatter_heads) to
[B, H/SP, Lp, d]: the whole sequence for this rank's H/SP heads (GQA: the matching KV heads; fewer KV heads
than SP are replicated first). Attention is computed per head, so each rank computes exactly the unsplit
model's attention for its heads; the reverse all-to-all (gather_heads) returns [B, H, c, d] for the
local columns. The mask is rebuilt for the full sequence: causal (or block-diagonal causal from global
cu_seqlens when packed, computed segment by segment); the mask transformers derives from the local
length is ignored. Rows are padded
on the right, so under a causal mask no real token sees a pad: a real token's output is the same as in
the padded single-process forward, where pads are masked out as keys.

Lightning (linear) attention layers of the hybrid MiniMax take the same exchange through
cispo.models.lightning.sequence_layout (their recurrence runs over the full sequence for this rank's
heads, exact for the same reason: heads are independent until the output norm, which runs after the
reverse exchange with all heads of the local tokens present); this module only supplies the exchange, and
passes the layout to the trunk as a keyword too, so that a layer recomputed by gradient checkpointing
inside backward (on GPU on autograd's thread, where a contextvar is unset) still exchanges.

Why not DeepSpeed's UlyssesSPAttentionHF (0.19.8): it wraps one transformers attention implementation per
process with a fixed batch size / sequence-length mode and its own data-loader adapter, and exchanges
[T, B, H, d] tensors only inside softmax attention; the lightning layers need the same exchange as a
[B, H, T, d] HeadExchange, so one small autograd all-to-all (below) serves both.

Log-probs. The hidden state at column p predicts token p + 1, which at a shard edge lies on the next rank,
so targets are shifted before sharding: rank r computes, at its columns p, the log-prob of input_ids[p+1]
under response_mask[p+1], with old_logprobs and token weights shifted the same way (shard_part). Every
token of the minibatch is thus scored on exactly one rank, by the same hidden state as without SP.

Loss and gradient. The driver's token weights are global (cispo.algo.losses.normalization_weights over
the minibatch), so the loss is a sum over tokens and each rank's loss is the sum over ITS tokens: the
ranks' losses sum to the unsplit loss. A rank's loss depends on parameters through other ranks'
activations (keys and values, via the all-to-all), and the all-to-all's backward is the reverse
all-to-all, which carries those gradients back to the rank that computed the activations. So the
parameter gradients summed over all ranks are d(sum of losses)/d(theta), the full gradient; ZeRO averages
over the world, hence backward(loss * world) exactly as without SP. Nothing is approximated; only fp32
summation order changes. Metrics carry token shares (a rank's scored tokens / the minibatch's) and are
merged by the facade as for data parallelism. The router aux loss (off by default) is computed per shard,
weighted by the shard's token share, like the per-micro-batch aux loss (first order only).

With learner.packing the rank takes a slice of the micro-batch's packed stream instead of its columns
(cispo/learner/sp_packing.py); the attention below then runs block-diagonal over the global cu_seqlens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cispo.algo.logprobs import masked_head_logprobs
from cispo.core.types import TrainBatch

ATTENTION_NAME = "cispo_ulysses"


# --- the all-to-all exchange -------------------------------------------------------------------------


def _all_to_all(send: Tensor, group: Any) -> Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _scatter_heads(x: Tensor, group: Any, size: int) -> Tensor:
    """[B, H, c, d] (local columns, all heads) -> [B, H/size, size*c, d] (all columns, this rank's heads)."""
    b, h, c, d = x.shape
    send = x.reshape(b, size, h // size, c, d).transpose(0, 1).contiguous()  # chunk j: heads of rank j
    recv = _all_to_all(send, group)  # recv[i]: rank i's columns of this rank's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * c, d)


def _gather_heads(x: Tensor, group: Any, size: int) -> Tensor:
    """The inverse: [B, H/size, T, d] -> [B, H, T/size, d]."""
    b, h, t, d = x.shape
    c = t // size
    send = x.reshape(b, h, size, c, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j: rank j's columns
    recv = _all_to_all(send, group)  # recv[i]: rank i's heads at this rank's columns
    return recv.transpose(0, 1).reshape(b, size * h, c, d)


class _Exchange(torch.autograd.Function):
    """scatter_heads / gather_heads with autograd: the backward of one is the other on the gradient."""

    @staticmethod
    def forward(ctx, x, group, size, scatter):  # type: ignore[override]
        ctx.group, ctx.size, ctx.scatter = group, size, scatter
        return (_scatter_heads if scatter else _gather_heads)(x, group, size)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inverse = _gather_heads if ctx.scatter else _scatter_heads
        return inverse(grad.contiguous(), ctx.group, ctx.size), None, None, None


class UlyssesExchange:
    """The all-to-all HeadExchange of one SP group (cispo.models.lightning's protocol)."""

    def __init__(self, group: Any, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def scatter_heads(self, x: Tensor) -> Tensor:
        self._check(x.shape[1], "heads")
        return _Exchange.apply(x, self.group, self.size, True)

    def gather_heads(self, x: Tensor) -> Tensor:
        self._check(x.shape[2], "columns")
        return _Exchange.apply(x, self.group, self.size, False)

    def head_range(self, num_heads: int) -> tuple[int, int]:
        self._check(num_heads, "heads")
        per = num_heads // self.size
        return self.rank * per, (self.rank + 1) * per

    def _check(self, n: int, what: str) -> None:
        if n % self.size:
            raise ValueError(f"{n} {what} do not split over learner.sequence_parallel_size={self.size}")


def sequence_groups(rank: int, world: int, size: int) -> Any:
    """Creates every SP group (ranks g*size .. g*size+size-1; every rank must call this, in the same
    order) and returns this rank's. Consecutive ranks: on GPU clusters they share a node, where the
    all-to-all is fastest."""
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


# --- the active layout (read by the attention function) ------------------------------------------------


@dataclass
class _Layout:
    exchange: UlyssesExchange | None = None
    cu_seqlens: Tensor | list[int] | None = None  # global (full-sequence) starts of packed rows
    lightning: Any = None  # cispo.models.lightning's SequenceLayout, passed to the trunk as a keyword


# A plain module global, not a contextvar: gradient checkpointing re-runs the forward inside backward,
# which on GPU runs on autograd's device threads, where a contextvar set here would not be visible.
_ACTIVE = _Layout()


@contextlib.contextmanager
def sequence_layout(
    exchange: UlyssesExchange | None, cu_seqlens: Tensor | list[int] | None = None
) -> Iterator[None]:
    """Within the block, softmax attention (this module) and lightning attention (cispo.models.lightning)
    exchange through `exchange`. Hold it around the backward too (checkpointed layers re-run forwards)."""
    global _ACTIVE
    previous = _ACTIVE
    try:
        with contextlib.ExitStack() as stack:
            lightning = _lightning()
            layout = None
            if lightning is not None:
                layout = stack.enter_context(
                    lightning.sequence_layout(cu_seqlens=cu_seqlens, exchange=exchange)
                )
            _ACTIVE = _Layout(exchange, cu_seqlens, layout)
            yield
    finally:
        _ACTIVE = previous


def _lightning() -> Any:
    try:
        from cispo.models import lightning
    except ImportError:
        return None
    return lightning


# --- softmax attention --------------------------------------------------------------------------------


def segment_attention(
    query: Tensor, key: Tensor, value: Tensor, scaling: float, cu_seqlens: Tensor | list[int] | None
) -> Tensor:
    """Causal attention over the full sequence, or block-diagonal causal over the packed rows of
    `cu_seqlens` (global starts, 0 .. T; a tail past the last start is one more segment). Per segment with
    is_causal, not one [T, T] mask: SDPA then takes its flash kernel (no T x T scores in memory, which
    for a 8K-token stream would be 256 MiB per head on CPU) and skips the cross-segment blocks."""
    length = query.shape[2]
    if cu_seqlens is None:
        return causal_attention(query, key, value, scaling, None)
    starts = [int(s) for s in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    if starts[-1] < length:
        starts.append(length)
    parts = [
        causal_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling, None)
        for a, b in zip(starts, starts[1:])
        if b > a
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def causal_attention(
    query: Tensor, key: Tensor, value: Tensor, scaling: float, mask: Tensor | None
) -> Tensor:
    """[B, Hq, T, d] x [B, Hkv, T, d] -> [B, Hq, T, d]: causal (or `mask`) softmax attention, GQA."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling
    )


def ulysses_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **_kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention implementation `cispo_ulysses`: [B, H, c, d] in, [B, c, H, d] out.

    attention_mask is ignored: transformers built it for the local length (it builds none for this
    implementation); the right one for the full sequence is causal, or block-diagonal when packed."""
    if dropout:
        raise ValueError("sequence parallelism needs attention_dropout 0")
    if sliding_window is not None:
        raise ValueError("sequence parallelism does not support sliding-window attention")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    exchange = _ACTIVE.exchange
    if exchange is None:  # no SP group active: plain causal attention over what is here
        out = causal_attention(query, key, value, scaling, None)
        return out.transpose(1, 2).contiguous(), None
    kv_heads = key.shape[1]
    if kv_heads % exchange.size:  # replicate so that every rank gets the KV heads of its query heads
        factor = exchange.size // kv_heads if exchange.size % kv_heads == 0 else query.shape[1] // kv_heads
        key, value = key.repeat_interleave(factor, dim=1), value.repeat_interleave(factor, dim=1)
    q, k, v = (exchange.scatter_heads(t.contiguous()) for t in (query, key, value))
    out = exchange.gather_heads(segment_attention(q, k, v, scaling, _ACTIVE.cu_seqlens))
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    # Not registered as a mask function on purpose: transformers then builds no mask for it.
    AttentionInterface.register(ATTENTION_NAME, ulysses_attention)


def _has_lightning(model: nn.Module) -> bool:
    layer_types = set(getattr(model.config, "layer_types", None) or [])
    return bool(layer_types & {"linear_attention", "lightning_attention"})


def enable_sequence_parallel(model: nn.Module, size: int) -> int:
    """Switches `model` to Ulysses attention (and its lightning layers to the exchange); checks that every
    head count splits over `size`. Returns the number of lightning layers patched."""
    config = model.config
    heads = int(config.num_attention_heads)
    if heads % size:
        raise ValueError(
            f"learner.sequence_parallel_size={size} must divide the model's {heads} attention heads"
        )
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError("learner.sequence_parallel_size > 1 needs the model's attention_dropout 0")
    _register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    patched = 0
    if _has_lightning(model):
        lightning = _lightning()
        if lightning is None:
            raise ValueError(
                "learner.sequence_parallel_size > 1 with lightning-attention layers needs "
                "cispo.models.lightning (install_lightning), which is not available"
            )
        patched = lightning.install_lightning(model)
    return patched


# --- sharding the micro-batches ----------------------------------------------------------------------


@dataclass
class SequenceShard:
    """One rank's columns of one micro-batch. batch.input_ids / attention_mask / routed_experts are the
    model's inputs at the local columns; batch.response_mask and old_logprobs are SHIFTED: local column p
    is about token p+1 (targets[:, p] = input_ids[:, p+1]), which the hidden state at p predicts."""

    batch: TrainBatch
    targets: Tensor
    start: int  # global column of local column 0
    length: int  # the micro-batch's unpadded length L

    def position_ids(self) -> Tensor:
        rows, cols = self.targets.shape
        return torch.arange(self.start, self.start + cols, device=self.targets.device).expand(rows, cols)

    def to(self, device: torch.device) -> SequenceShard:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self.batch).items()}
        return SequenceShard(TrainBatch(**moved), self.targets.to(device), self.start, self.length)


def padded_length(length: int, size: int) -> int:
    return math.ceil(length / size) * size


def _pad_columns(x: Tensor, length: int, value: float) -> Tensor:
    missing = length - x.shape[1]
    if missing == 0:
        return x
    filler = torch.full((x.shape[0], missing, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, filler], dim=1)


def shift_left(x: Tensor) -> Tensor:
    """out[:, p] = x[:, p+1]; the last column 0 (nothing follows it)."""
    out = torch.zeros_like(x)
    out[:, :-1] = x[:, 1:]
    return out


def shard_part(part: TrainBatch, weights: Tensor, sp_rank: int, size: int) -> tuple[SequenceShard, Tensor]:
    """Rank sp_rank's shard of one micro-batch and its shifted token weights [B, c]."""
    length = part.input_ids.shape[1]
    full = padded_length(length, size)
    c = full // size
    cols = slice(sp_rank * c, (sp_rank + 1) * c)

    def local(x: Tensor, shift: bool, value: float = 0) -> Tensor:
        x = _pad_columns(x, full, value)
        return (shift_left(x) if shift else x)[:, cols].contiguous()

    routed = part.routed_experts
    batch = TrainBatch(
        input_ids=local(part.input_ids, False),
        attention_mask=local(part.attention_mask, False),
        response_mask=local(part.response_mask, True),
        old_logprobs=local(part.old_logprobs, True),
        advantages=part.advantages,
        group_ids=part.group_ids,
        routed_experts=None if routed is None else local(routed, False, -1),  # -1: the router chooses
    )
    shard = SequenceShard(batch, local(part.input_ids, True), sp_rank * c, length)
    return shard, local(weights, True)


def unshard_logprobs(shards: list[Tensor], length: int) -> Tensor:
    """The SP ranks' shifted [B, c] outputs of one micro-batch -> [B, length] in TrainBatch layout."""
    shifted = torch.cat(shards, dim=1)
    out = torch.zeros(shifted.shape[0], length, dtype=shifted.dtype)
    out[:, 1:] = shifted[:, : length - 1]
    return out


def shard_logprobs(
    model: nn.Module,
    shard_inputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    *,
    chunk_size: int,
    temperature: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """[B, c] log-probs (and entropy) of the shifted targets at the local columns: the trunk runs on the
    local shard with global positions (attention exchanging inside), the FP32 head on the scored rows."""
    input_ids, attention_mask, target_mask, targets, position_ids = shard_inputs
    trunk = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    kwargs = {}
    if _ACTIVE.lightning is not None and _has_lightning(model):
        # A keyword too, so that a checkpointed layer's recompute in backward gets the layout (see there).
        kwargs[_lightning().LAYOUT_KWARG] = _ACTIVE.lightning
    out = trunk(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    )
    return masked_head_logprobs(
        model,
        out.last_hidden_state,
        targets,
        target_mask.bool(),
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )
