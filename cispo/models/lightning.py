"""Lightning (linear) attention of transformers' MiniMaxForCausalLM with sequence boundaries and head
exchange: what sequence packing and sequence parallelism need of the hybrid model.

The stock layer (transformers 5.25 `MiniMaxLightningAttention`, no-cache path) runs a block recurrence
over the whole [B, T] input: per head, within a block of `block_size` tokens an exactly decayed causal
(Q K^T * D) V, across blocks a K^T V state S decayed by exp(-slope * block) and read by Q * exp(-slope * i).
One packed stream would carry S from one sequence into the next. `lightning_core` runs the same maths
(same ops in the same order, so bit-for-bit the stock output when there are no boundaries) and restarts
S at zero, and the blocks at the segment start, at every boundary of `cu_seqlens`: each packed sequence
then gets exactly the recurrence it gets alone.

`install_lightning(model)` replaces the forward of every lightning layer of a model (by swapping the
instance's class to a subclass; transformers' class keeps its forward) with one that reads the active
`sequence_layout` (a contextvar):
  - `cu_seqlens`: GLOBAL sequence starts of the packed stream, 0 first and the full length last (the
    flash-attention varlen convention), in full-sequence positions;
  - `exchange`: a `HeadExchange` under sequence parallelism (each rank holds a [T/SP] slice of the stream).
With no layout it computes what the stock forward computes; with a cache (generation) it is the stock one.

Why the head-split sequence-parallel recurrence is exact. The recurrence of head h reads only head h's
q, k, v and slope (S_h is [d, d]; no op mixes heads before the output norm), so the heads are independent
problems. `scatter_heads` turns the sequence-sharded [B, H, T/SP, d] into the head-sharded [B, H/SP, T, d]:
each rank then holds the FULL sequence of its heads, runs the same block recurrence (with the slopes of
its heads, `slope_rate[h0:h1]`, and the global cu_seqlens) and computes the very state and outputs a
single process computes for those heads. `gather_heads` brings every head of the local tokens back;
the RMSNorm over all H * d channels of a token, the sigmoid output gate and out_proj then run on the
local tokens with all heads present, as in one process. (Blocks are counted from each sequence start
over the full sequence, not from shard starts, so the block partition, and the rounding, are those of
one process too.)

Gradient checkpointing: the recompute runs inside backward, which may be outside the `with
sequence_layout(...)` block, and on GPU runs on autograd's own threads, where the contextvar was never
set. Two ways keep the layout: the caller passes it to the trunk as the keyword `LAYOUT_KWARG`
(transformers hands a decoder layer's kwargs to its attention, and the checkpoint keeps them for the
recompute; packing does this), or holds the block around backward too (a thread that never saw the
contextvar reads the process's innermost active layout). A recompute that finds no layout although its
forward had one raises instead of silently computing other gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

LAYOUT_KWARG = "lightning_layout"
_USED_LAYOUT = "_cispo_lightning_layout_used"  # whether its last forward (outside backward) had a layout


@runtime_checkable
class HeadExchange(Protocol):
    """Head <-> sequence resharding across the sequence-parallel group (all-to-all), SP ranks."""

    def scatter_heads(self, x: Tensor) -> Tensor:
        """[B, H, T_local, d] sequence-sharded -> [B, H/SP, T, d]: this rank's heads, full sequence."""
        ...

    def gather_heads(self, x: Tensor) -> Tensor:
        """The inverse: [B, H/SP, T, d] -> [B, H, T_local, d]."""
        ...

    def head_range(self, num_heads: int) -> tuple[int, int]:
        """[h0, h1): the heads this rank holds after scatter_heads."""
        ...


@dataclass(frozen=True)
class SequenceLayout:
    cu_seqlens: tuple[int, ...] | None = None  # global sequence starts, 0 ... T
    exchange: HeadExchange | None = None

    @property
    def active(self) -> bool:
        return self.cu_seqlens is not None or self.exchange is not None


_NO_LAYOUT = SequenceLayout()
_LAYOUT: contextvars.ContextVar[SequenceLayout] = contextvars.ContextVar("cispo_lightning_layout")
# The innermost active layout of the process: what a thread without the contextvar (autograd's device
# threads, where a checkpointed layer's recompute runs on GPU) reads; see current_layout.
_PROCESS_LAYOUT = _NO_LAYOUT


def _as_starts(cu_seqlens: Tensor | Sequence[int] | None) -> tuple[int, ...] | None:
    if cu_seqlens is None:
        return None
    starts = tuple(int(s) for s in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens))
    if len(starts) < 2 or starts[0] != 0 or any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"cu_seqlens must rise from 0 to the sequence length, got {list(starts)[:8]}...")
    return starts


@contextlib.contextmanager
def sequence_layout(
    cu_seqlens: Tensor | Sequence[int] | None = None, exchange: HeadExchange | None = None
) -> Iterator[SequenceLayout]:
    """The layout patched lightning layers use inside the block (exactly the one given: nothing is
    inherited from an enclosing block). Yields it, for passing as `LAYOUT_KWARG` too (module docstring)."""
    global _PROCESS_LAYOUT
    layout = SequenceLayout(_as_starts(cu_seqlens), exchange)
    token = _LAYOUT.set(layout)
    previous, _PROCESS_LAYOUT = _PROCESS_LAYOUT, layout
    try:
        yield layout
    finally:
        _PROCESS_LAYOUT = previous
        _LAYOUT.reset(token)


def current_layout() -> SequenceLayout:
    """This context's layout; in a thread where no layout was ever set in context (autograd's backward
    threads), the process's innermost active one, so a block held around backward covers recomputes."""
    return _LAYOUT.get(_PROCESS_LAYOUT)


def _decays(slope_rate: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """transformers' MiniMaxLightningAttention.decay_factors, from the slopes given (any head subset)."""
    block_size_range = torch.arange(block_size, device=slope_rate.device) + 1
    query_decay = torch.exp(-slope_rate * block_size_range[:, None])
    key_decay = torch.exp(-slope_rate * (block_size - block_size_range[:, None]))
    diagonal_decay = block_size_range[:, None] - block_size_range[None, :]
    diagonal_decay = slope_rate * diagonal_decay[None, None, :, :]
    diagonal_decay = torch.exp(torch.where(diagonal_decay >= 0, -diagonal_decay, float("-inf")))
    return query_decay, key_decay, diagonal_decay


def _segment(q: Tensor, k: Tensor, v: Tensor, slope_rate: Tensor, block_size: int, decays: Any) -> Tensor:
    """The stock block recurrence over one sequence, from a zero state (same ops, same order)."""
    query_decay, key_decay, diagonal_decay = decays
    batch, heads, seq_len, head_dim = v.shape
    state = torch.zeros(batch, heads, head_dim, head_dim, device=v.device, dtype=v.dtype)
    out = []
    for start in range(0, seq_len, block_size):
        end = min(start + block_size, seq_len)
        n = end - start
        bq, bk, bv = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        block_decay = torch.exp(-slope_rate * n).to(v.dtype)
        intra = torch.matmul(torch.matmul(bq, bk.transpose(-1, -2)) * diagonal_decay[:, :, :n, :n], bv)
        inter = torch.matmul(bq * query_decay[:, :n], state)
        out.append(inter + intra)
        state = state * block_decay + torch.matmul((bk * key_decay[:, -n:]).transpose(-1, -2), bv)
    return torch.cat(out, dim=-2)


def lightning_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope_rate: Tensor,
    block_size: int,
    cu_seqlens: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Lightning attention of q, k, v [B, h, T, d] with slopes [h, 1, 1] -> [B, h, T, d], the K^T V state
    reset at every sequence start in `cu_seqlens` (0, ..., T; None: one sequence; ending before T, the
    tail is one more sequence). Decays are computed in float32 from `slope_rate` and cast to v's dtype,
    which is what the stock module's buffers hold."""
    slope_rate = slope_rate.to(device=v.device, dtype=torch.float32)
    decays = tuple(d.to(v.dtype) for d in _decays(slope_rate, block_size))
    starts = _as_starts(cu_seqlens) or (0, v.shape[2])
    if starts[-1] > v.shape[2]:
        raise ValueError(f"cu_seqlens ends at {starts[-1]} but the sequence has {v.shape[2]} tokens")
    if starts[-1] < v.shape[2]:  # a padded tail (e.g. to a multiple of the SP size): a sequence of its own
        starts = (*starts, v.shape[2])
    if v.shape[2] == 0:
        return v.clone()
    parts = [
        _segment(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], slope_rate, block_size, decays)
        for a, b in zip(starts, starts[1:], strict=False)
        if b > a
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _slope_rate(module: nn.Module) -> Tensor:
    """The float32 slopes: the buffer, or recomputed from the config where a cast rounded the buffer."""
    if module.slope_rate.dtype == torch.float32:
        return module.slope_rate
    return module.get_slope_rate(device=module.slope_rate.device).to(torch.float32)


def _graph_task_id() -> int:
    """The running backward's id in this thread, -1 outside backward (torch >= 2.1; -1 where absent)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None else int(current())


def _resolve_layout(module: nn.Module, kwargs: dict[str, Any]) -> SequenceLayout:
    layout = kwargs.pop(LAYOUT_KWARG, None) or current_layout()
    if _graph_task_id() == -1:  # a plain forward, not a checkpoint recompute inside backward
        setattr(module, _USED_LAYOUT, layout.active)
    elif getattr(module, _USED_LAYOUT, False) and not layout.active:
        raise RuntimeError(
            "lightning attention recomputed (gradient checkpointing) without the sequence layout its "
            f"forward had: pass the layout to the trunk as {LAYOUT_KWARG}=... (cispo/models/lightning.py)"
        )
    return layout


class LayoutLightningAttention(MiniMaxLightningAttention):
    """transformers' lightning layer with the layout-aware forward; `install_lightning` swaps the class of
    existing instances to it (same parameters, buffers and state-dict keys; isinstance of the stock class
    still holds, and pickle / deepcopy find it by name)."""

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Any = None,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        layout = _resolve_layout(self, kwargs)
        if cache is not None:
            if layout.active:
                raise ValueError("a sequence layout (packing / sequence parallelism) needs use_cache=False")
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        batch, seq_len, _ = hidden_states.shape
        qkv = self.act_fn(self.qkv_proj(hidden_states))
        if attention_mask is not None:  # transformers' apply_mask_to_padding_states: padding adds no state
            qkv = (qkv * attention_mask[:, :, None]).to(qkv.dtype)
        qkv = qkv.reshape(batch, seq_len, self.num_attention_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in torch.split(qkv, self.head_dim, dim=3))
        slope_rate = _slope_rate(self)
        exchange = layout.exchange
        if exchange is not None:
            q, k, v = exchange.scatter_heads(q), exchange.scatter_heads(k), exchange.scatter_heads(v)
            h0, h1 = exchange.head_range(self.num_attention_heads)
            slope_rate = slope_rate[h0:h1]
        out = lightning_core(q, k, v, slope_rate, self.block_size, layout.cu_seqlens)
        if exchange is not None:
            out = exchange.gather_heads(out)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_attention_heads * self.head_dim)
        out = self.norm(out)
        out = F.sigmoid(self.output_gate(hidden_states)) * out
        return self.out_proj(out), None


def lightning_layers(model: nn.Module) -> list[nn.Module]:
    """The MiniMax lightning-attention layers of `model`, patched or not."""
    return [m for m in model.modules() if isinstance(m, MiniMaxLightningAttention)]


def install_lightning(model: nn.Module) -> int:
    """Gives every MiniMaxLightningAttention of `model` the layout-aware forward (idempotent). Returns
    the number of lightning layers of `model` (all of them run it afterwards; 0: none to patch)."""
    layers = lightning_layers(model)
    for layer in layers:
        if type(layer) is MiniMaxLightningAttention:
            layer.__class__ = LayoutLightningAttention
    return len(layers)


def is_installed(module: nn.Module) -> bool:
    return isinstance(module, LayoutLightningAttention)
