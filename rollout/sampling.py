"""Token sampling whose log-probs are those of the distribution actually sampled from.

The behaviour log-prob of a token is log pi'(token), where pi' is the model's distribution after temperature
scaling and after top-k / top-p truncation renormalise the kept tokens. CISPO's importance ratio is
r = pi_learner(token) / pi'(token). With the defaults (temperature 1, no truncation) pi' equals the policy and
r is the true ratio. With truncation, pi'(token) >= pi(token) for every kept token (the removed mass is
spread over the kept ones), so unless the learner applies the same truncation r is biased below 1 by the
kept mass Z = sum of pi over kept tokens (r = Z * pi_new / pi_old); with temperature T != 1 the learner must
divide its logits by the same T for r to stay a ratio of the same distributions.
"""

from __future__ import annotations

import torch

from cispo.core.types import SamplingParams


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """FP32 log-probs [B, V] of the sampling distribution: temperature, then top-k, then top-p."""
    scaled = logits.float()
    if params.temperature != 1.0:
        scaled = scaled / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        scaled = _top_p_mask(scaled, params.top_p)
    return torch.log_softmax(scaled, dim=-1)


def _top_p_mask(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the mass strictly before it already reaches top_p; the most likely token always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def sample(logprobs: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from exp(logprobs) [B, V]; return (tokens [B], their log-probs [B]).

    Inverse-CDF sampling in float64: one uniform number per row instead of one random number per vocabulary
    entry (torch.multinomial and the exponential race draw B*V of them, about 12 ms per step at B=64,
    V=8192 on 2 CPU cores, against about 1 ms here). The target is capped strictly below the row total, so
    the first index whose cumulative mass exceeds it always has positive probability: a token the
    distribution excludes (top-k / top-p, log-prob -inf) can never be drawn.
    """
    # exp in float32 (accurate to an ulp, 2.5x cheaper than float64), accumulated in float64.
    cdf = torch.cumsum(logprobs.exp(), dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    uniform = torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device)
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
