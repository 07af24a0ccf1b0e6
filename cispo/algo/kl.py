"""The reference-model KL penalty (GRPO's beta * KL(pi_theta || pi_ref)), a pure function of tensors.

Convention (DeepSeekMath's GRPO, Schulman's "k3" estimator): per sampled token o_t,

    d_t  = log pi_ref(o_t) - log pi_theta(o_t)           (reference minus current policy)
    k3_t = exp(d_t) - d_t - 1  >= 0                      (e^x >= 1 + x, equality iff d_t = 0)

Under o_t ~ pi_theta, E[exp(d_t)] = sum_o pi_theta(o) pi_ref(o) / pi_theta(o) = 1, so E[k3_t] = E[-d_t] =
E[log pi_theta - log pi_ref] = KL(pi_theta || pi_ref): an unbiased, never negative, per-token estimate of
the reverse KL of the current policy from the reference (k1 = -d_t is unbiased too but negative on half
the tokens; k3 has a lower variance when the two are close). The tokens are in fact sampled by the
behaviour policy, a few updates behind; like GRPO (and TRL, OpenRLHF, verl), no importance weight corrects
for that, which keeps the term a pure function of the current and reference log-probs.

Gradient: d k3_t / d log pi_theta(o_t) = 1 - exp(d_t) = 1 - pi_ref / pi_theta: it pushes the policy's
log-prob down where it exceeds the reference's and up where it is below. Only `logprobs` is
differentiated; the reference log-probs are detached here whatever the caller passes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_kl(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, token_weights: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """(penalty, metrics): penalty = sum_t token_weights * mask * k3 over [B, T].

    logprobs      [B, T] log pi_theta of the sampled tokens (carries the gradient)
    ref_logprobs  [B, T] log pi_ref of the same tokens (detached)
    mask          [B, T] 1 for trained response tokens
    token_weights [B, T] the policy loss's normalisation weights (cispo.algo.losses.normalization_weights,
                  computed once over the whole minibatch), so the micro-batches' penalties sum to the
                  minibatch's exactly, like the policy loss.

    metrics: {"kl_ref": mean k3 over the masked tokens} (detached; 0 with no masked token)."""
    for name, tensor in (("ref_logprobs", ref_logprobs), ("mask", mask), ("token_weights", token_weights)):
        if tensor.shape != logprobs.shape or logprobs.dim() != 2:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; logprobs {tuple(logprobs.shape)} (both [B, T])"
            )
    live = mask > 0
    # Zeroed off the mask before exp: padding log-probs are arbitrary and exp of a large gap would make
    # inf * 0 = NaN in the sum.
    d = torch.where(live, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
    k3 = torch.expm1(d) - d  # exp(d) - 1 - d, without the cancellation of exp(d) - 1 for small d
    penalty = (token_weights * mask * k3).sum()
    with torch.no_grad():
        m = live.to(k3.dtype)
        metrics = {"kl_ref": (k3 * m).sum() / m.sum().clamp(min=1.0)}
    return penalty, metrics
