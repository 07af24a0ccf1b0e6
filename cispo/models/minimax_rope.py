"""Partial RoPE for transformers' MiniMaxForCausalLM, as the published MiniMax-Text-01 / M1 checkpoints
use it.

The published checkpoints rotate `rotary_dim` 64 of each softmax head's 128 dims (`partial_rotary_factor`
0.5 once converted), but transformers' MiniMax (5.25, installed here) ignores the factor: its default RoPE
init takes the whole head_dim and its `apply_rotary_pos_emb` rotates every dim. `install()` swaps those two
module-level functions of `transformers.models.minimax.modeling_minimax` for ones that follow the published
convention; with factor 1.0 (or none) both compute exactly what transformers' own do.

The convention, read for this module (2026-12-07):
- the published remote code, `modeling_minimax_text_01.py` (MiniMaxAI/MiniMax-Text-01; the copy read is
  zzp1012/nanoGPT @ 07c618bc46a8cb07934ee3b1559b34e6bd050fd7): `MiniMaxText01RotaryEmbedding(rotary_dim,
  base=rope_theta)` with `inv_freq = 1 / base ** (arange(0, rotary_dim, 2) / rotary_dim)` and
  `emb = cat(freqs, freqs)`; `apply_rotary_pos_emb` splits `q[..., :rot_dim]` / `q[..., rot_dim:]`,
  rotates the first part with `rotate_half` (NeoX style: dim i pairs with i + rot_dim/2, not GPT-J's
  interleaved 2i, 2i+1) and concatenates the untouched rest after it; the same for k.
- vLLM 0.23.0 (sdist on PyPI), `model_executor/models/minimax_text_01.py`: `partial_rotary_factor =
  rotary_dim / head_dim`, `get_rope(..., is_neox_style=True, dtype=torch.float32)`;
  `layers/rotary_embedding/base.py` `forward_static`: `query[..., :rotary_dim]` rotated NeoX style (halves
  of the rotary part), `query[..., rotary_dim:]` passed through, the same inv_freq over rotary_dim.
Precision follows transformers (cos/sin in the activations' dtype), as vLLM's kernels do at run time.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

_MODULE = "transformers.models.minimax.modeling_minimax"
_MARK = "_cispo_partial_rope"


def rotary_dim(config: Any) -> int:
    """The number of leading head dims RoPE rotates: head_dim * rope_parameters.partial_rotary_factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))


def default_rope_parameters(config: Any, device: Any = None, **_: Any) -> tuple[torch.Tensor, float]:
    """inv_freq over the rotary part only (the remote code's and vLLM's), attention scaling 1."""
    dim = rotary_dim(config)
    base = config.rope_parameters["rope_theta"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base**exponents), 1.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_partial_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style RoPE on the first cos.shape[-1] dims of each q / k head; the rest pass through."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    width = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if width == x.shape[-1]:  # full rotary: the very expression transformers evaluates
            return (x * cos) + (_rotate_half(x) * sin)
        part, rest = x[..., :width], x[..., width:]
        return torch.cat(((part * cos) + (_rotate_half(part) * sin), rest), dim=-1)

    return rotate(q), rotate(k)


def _fp32_inv_freq(forward: Any) -> Any:
    """The rotary forward with inv_freq in float32 again after a cast rounded it (`model.to(bfloat16)`,
    DeepSpeed's bf16 engine): an engine loaded with dtype=bfloat16 keeps it in float32, so a rounded copy
    in the learner would shift its angles (by ~0.02 rad at position 500 here) against the engine's."""

    def fp32_forward(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        if self.inv_freq.dtype != torch.float32 and self.rope_type == "default":
            inv_freq, _ = default_rope_parameters(self.config, device=self.inv_freq.device)
            self.inv_freq, self.original_inv_freq = inv_freq, inv_freq.clone()
        return forward(self, x, position_ids)

    return fp32_forward


def install() -> None:
    """Makes transformers' MiniMax honour partial_rotary_factor in this process (idempotent). Models built
    afterwards get the right inv_freq; `honour_partial_rotary` also repairs one built before."""
    module = importlib.import_module(_MODULE)
    if getattr(module, _MARK, False):
        return
    embedding = getattr(module, "MiniMaxRotaryEmbedding", None)
    if embedding is None or not callable(getattr(module, "apply_rotary_pos_emb", None)):
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__}'s {_MODULE} has no MiniMaxRotaryEmbedding / "
            "apply_rotary_pos_emb to patch for partial RoPE (cispo/models/minimax_rope.py)"
        )
    # transformers' own, kept for comparison (tests/models/test_minimax_rope.py)
    module._cispo_original_rope = (embedding.compute_default_rope_parameters, module.apply_rotary_pos_emb)
    embedding.compute_default_rope_parameters = staticmethod(default_rope_parameters)
    embedding.forward = _fp32_inv_freq(embedding.forward)
    module.apply_rotary_pos_emb = apply_partial_rotary  # MiniMaxAttention.forward looks the name up per call
    setattr(module, _MARK, True)


def honour_partial_rotary(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with RoPE on only its config's rotary dims: installs the patch and recomputes the
    inv_freq buffers of default-RoPE MiniMax rotary embeddings built before it (no-op for others)."""
    install()
    embedding = importlib.import_module(_MODULE).MiniMaxRotaryEmbedding
    for sub in model.modules():
        if isinstance(sub, embedding) and sub.rope_type == "default":
            inv_freq, _ = default_rope_parameters(sub.config, device=sub.inv_freq.device)
            if inv_freq.shape != sub.inv_freq.shape:
                sub.inv_freq = inv_freq
                sub.original_inv_freq = inv_freq.clone()
            if _ensure_installed not in sub._forward_pre_hooks.values():
                sub.register_forward_pre_hook(_ensure_installed)
    return model


def _ensure_installed(_module: torch.nn.Module, _args: Any) -> None:
    """A pre-hook on each rotary embedding: a model pickled to another process (a Ray learner rank, an
    engine) brings it along by reference, so that process patches its transformers before attention runs."""
    install()
