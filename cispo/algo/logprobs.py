"""Token log-probs and entropy from final hidden states, with the LM head in FP32 and in sequence chunks.

The naive path builds the full [T, V] logits (and autograd keeps them, plus the softmax, for backward):
8 GB at T=4096 with a 152K vocabulary. Here the logits of one chunk of rows exist at a time, forward
and backward; backward recomputes each chunk's logits from the saved hidden states instead of storing
them, which costs one extra matmul per chunk and saves O(T * V) memory. Except when all rows fit in one
chunk (short minibatches, e.g. K = 16 small updates per rollout batch): then backward would rebuild that
one chunk anyway, so forward keeps its log-softmax for it instead (no higher peak, one matmul less).

The head runs in FP32 whatever the model's dtype (the MiniMax-M1 report found that bf16 logits make
training and inference probabilities disagree): hidden states and the head weight are upcast per chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _chunk_logits(hidden: Tensor, weight32: Tensor, bias32: Tensor | None, inv_temp: float) -> Tensor:
    logits = hidden.to(torch.float32) @ weight32.t()
    if bias32 is not None:
        logits = logits + bias32
    if inv_temp != 1.0:
        logits = logits * inv_temp
    return logits


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, inv_temp, with_entropy):  # type: ignore[override]
        weight32 = weight.to(torch.float32)
        bias32 = None if bias is None else bias.to(torch.float32)
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # One chunk in all: its log-softmax is what backward would recompute (bit for bit), so keep it.
        keep = n <= chunk_size and any(ctx.needs_input_grad[:3])  # False under no_grad
        ctx.log_p = None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:stop], weight32, bias32, inv_temp)
            lse = torch.logsumexp(logits, dim=-1)
            lse_all[start:stop] = lse
            logprobs[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - lse
            if with_entropy or keep:
                log_p = logits.sub_(lse[:, None])
            if with_entropy:
                entropy[start:stop] = -(torch.exp(log_p) * log_p).sum(-1)
            if keep:
                ctx.log_p = log_p
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.chunk_size, ctx.inv_temp = chunk_size, inv_temp
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):  # type: ignore[override]
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        weight32 = weight.to(torch.float32)
        bias32 = None if bias is None else bias.to(torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight32) if need_w else None
        grad_bias = torch.zeros_like(bias32) if (need_b and bias32 is not None) else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:stop].to(torch.float32)
            # Used once: a second backward (retain_graph) recomputes.
            log_p, ctx.log_p = ctx.log_p, None
            if log_p is None:
                log_p = _chunk_logits(h, weight32, bias32, ctx.inv_temp).sub_(lse_all[start:stop, None])
            # d logp_t / d z = onehot(target) - softmax(z); scaled by the incoming grad and 1/temperature.
            grad_logits = log_p.exp_().neg_()
            rows = torch.arange(stop - start, device=h.device)
            grad_logits[rows, targets[start:stop]] += 1.0
            grad_logits.mul_(grad_logprobs[start:stop, None].to(torch.float32) * ctx.inv_temp)
            if grad_hidden is not None:
                grad_hidden[start:stop] = (grad_logits @ weight32).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del log_p, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target token (and optionally the entropy of each row's distribution).

    hidden [N, H] (any float dtype), weight [V, H] (the LM head), targets [N] int64, bias [V] or None.
    Returns logprobs [N] float32 (differentiable w.r.t. hidden, weight, bias) and entropy [N] float32
    (detached; a metric) or None. Logits are computed as (hidden @ weight.T + bias) / temperature in FP32,
    chunk_size rows at a time.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)}, {tuple(targets.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, {hidden.shape[1]}], got {tuple(weight.shape)}")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size}, {temperature}")
    logprobs, entropy = _ChunkedTokenLogprobs.apply(
        hidden, weight, bias, targets.long(), chunk_size, 1.0 / temperature, with_entropy
    )
    return logprobs, (entropy if with_entropy else None)


def naive_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Reference: full [N, V] FP32 logits through autograd. Returns (logprobs [N], entropy [N])."""
    logits = hidden.to(torch.float32) @ weight.to(torch.float32).t()
    if bias is not None:
        logits = logits + bias.to(torch.float32)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(1, targets[:, None].long()).squeeze(1), entropy.detach()


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    **forward_kwargs: object,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [B, L] of the response tokens of right-padded sequences under a causal LM.

    Position t holds the log-prob of input_ids[:, t] predicted from position t - 1; non-response
    positions are 0. Only the response rows go through the FP32 head. The model must expose its trunk as
    ``model.model`` (every transformers *ForCausalLM does) and its head via get_output_embeddings().
    """
    trunk = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    hidden = out.last_hidden_state[:, :-1]
    predicted = response_mask[:, 1:].bool()
    logprobs, entropy = masked_head_logprobs(
        model,
        hidden,
        input_ids[:, 1:],
        predicted,
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )

    def shift(values: Tensor) -> Tensor:
        return torch.nn.functional.pad(values, (1, 0))

    return shift(logprobs), (None if entropy is None else shift(entropy))


def masked_head_logprobs(
    model: torch.nn.Module,
    hidden: Tensor,
    targets: Tensor,
    predicted: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The model's FP32-head log-prob of targets[i] from hidden[i] wherever predicted[i] (bool) holds, as
    float32 of predicted's shape, 0 elsewhere (and the entropy, or None). hidden [..., H]; targets and
    predicted [...]. Only the predicted positions go through the head."""
    head = model.get_output_embeddings()
    lp_flat, ent_flat = token_logprobs(
        hidden[predicted],
        head.weight,
        targets[predicted],
        bias=getattr(head, "bias", None),
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )

    def scatter(values: Tensor) -> Tensor:
        dense = torch.zeros(predicted.shape, dtype=torch.float32, device=hidden.device)
        return dense.masked_scatter(predicted, values)

    return scatter(lp_flat), (None if ent_flat is None else scatter(ent_flat))
