"""The reference-model KL (cispo/algo/kl.py): k3 per token, its gradient and the weights, by hand."""

import math

import pytest
import torch

from cispo.algo.kl import reference_kl
from cispo.algo.losses import normalization_weights

LN2, E = math.log(2.0), math.e


def example():
    """2 x 3 tokens, d = ref - new chosen so k3 = exp(d) - d - 1 is easy by hand:
    row 0: d = 0, 1, -1        k3 = 0, e - 2 = 0.71828183, 1/e = 0.36787944
    row 1: d = ln2, -ln2, 100  k3 = 2 - ln2 - 1 = 0.30685282, 1/2 + ln2 - 1 = 0.19314718, (masked)
    The masked token's gap (e^100 would overflow float32 to inf, and inf * 0 = NaN) must not leak in."""
    new = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -0.3, -101.0]], requires_grad=True)
    d = torch.tensor([[0.0, 1.0, -1.0], [LN2, -LN2, 100.0]])
    ref = (new.detach() + d).requires_grad_()  # a ref that asks for a gradient must not get one
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return new, ref, mask


def test_k3_values_and_metric_by_hand():
    new, ref, mask = example()
    # "sample" weights: row 0 has 3 tokens -> 1/(2*3) = 1/6 each; row 1 has 2 -> 1/(2*2) = 1/4 each.
    weights = normalization_weights(mask, "sample")
    torch.testing.assert_close(weights, torch.tensor([[1 / 6] * 3, [0.25, 0.25, 0.0]]))
    penalty, metrics = reference_kl(new, ref, mask, weights)
    # penalty = (0 + (e - 2) + 1/e) / 6 + ((1 - ln2) + (ln2 - 1/2)) / 4
    #         = 1.08616127 / 6 + 0.5 / 4 = 0.18102688 + 0.125 = 0.30602688
    assert penalty.item() == pytest.approx((E - 2 + 1 / E) / 6 + 0.5 / 4, rel=1e-6)
    assert penalty.item() == pytest.approx(0.30602688, abs=1e-7)
    # kl_ref: the plain mean of k3 over the 5 masked tokens = (e + 1/e - 1.5) / 5 = 1.58616127 / 5
    assert metrics["kl_ref"].item() == pytest.approx(0.31723225, abs=1e-7)
    assert not metrics["kl_ref"].requires_grad


def test_gradient_is_weight_times_one_minus_ratio_by_hand():
    new, ref, mask = example()
    weights = normalization_weights(mask, "sample")
    coef = 0.5
    penalty, _ = reference_kl(new, ref, mask, weights)
    (coef * penalty).backward()
    # d(c * w * k3)/d new = c * w * (1 - exp(ref - new)):
    # row 0: 0.5/6 * (1 - 1, 1 - e, 1 - 1/e)   = 0, -0.14319015, 0.05267671
    # row 1: 0.5/4 * (1 - 2, 1 - 1/2), masked 0 = -0.125, 0.0625, 0
    expected = torch.tensor([[0.0, coef / 6 * (1 - E), coef / 6 * (1 - 1 / E)], [-coef / 4, coef / 8, 0.0]])
    torch.testing.assert_close(new.grad, expected, atol=1e-7, rtol=0)
    assert new.grad[0, 1].item() == pytest.approx(-0.14319015, abs=1e-7)
    assert ref.grad is None  # the reference is detached


def test_zero_when_the_reference_is_the_policy():
    new = torch.tensor([[-1.0, -2.5, -0.1], [-4.0, -0.2, -0.3]], requires_grad=True)
    mask = torch.ones(2, 3)
    penalty, metrics = reference_kl(new, new.detach().clone(), mask, normalization_weights(mask))
    penalty.backward()
    assert penalty.item() == 0.0 and metrics["kl_ref"].item() == 0.0
    assert torch.equal(new.grad, torch.zeros(2, 3))


def test_mask_and_weights_decide_which_tokens_count():
    new, ref, mask = example()
    # Only row 0's d = 1 token trained: penalty = its weight (1) * (e - 2); the metric averages over it.
    only = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    penalty, metrics = reference_kl(new, ref, only, normalization_weights(only))
    assert penalty.item() == pytest.approx(E - 2, rel=1e-6)
    assert metrics["kl_ref"].item() == pytest.approx(E - 2, rel=1e-6)
    # Nothing trained: 0, not NaN.
    none = torch.zeros(2, 3)
    penalty, metrics = reference_kl(new, ref, none, normalization_weights(none))
    assert penalty.item() == 0.0 and metrics["kl_ref"].item() == 0.0


def test_micro_batches_sum_to_the_minibatch_penalty_and_k3_is_never_negative():
    gen = torch.Generator().manual_seed(0)
    new = -torch.rand(6, 5, generator=gen) * 4
    ref = -torch.rand(6, 5, generator=gen) * 4
    mask = (torch.rand(6, 5, generator=gen) > 0.3).float()
    weights = normalization_weights(mask, "group", torch.tensor([0, 0, 1, 1, 2, 2]))
    full, metrics = reference_kl(new, ref, mask, weights)
    parts = sum(reference_kl(new[r], ref[r], mask[r], weights[r])[0] for r in ([0, 1, 2], [3], [4, 5]))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)
    assert full.item() > 0 and metrics["kl_ref"].item() > 0
    for row in range(6):  # each token's k3 >= 0: every one-token penalty is
        for col in range(5):
            one = torch.zeros(6, 5)
            one[row, col] = 1.0
            assert reference_kl(new, ref, one, one)[0].item() >= 0.0


def test_shapes_must_match():
    with pytest.raises(ValueError, match="ref_logprobs"):
        reference_kl(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), torch.ones(2, 3))
