"""Policy losses against values worked out by hand.

The shared example (B=2, T=3), mask [[1,1,0],[1,1,1]] so N = 5 trained tokens, A = [1, -2]:
    row 0: logprobs [-1.0, -2.0, -3.0], ratios r = [2, 1, (masked)]
    row 1: logprobs [-0.5, -1.5, -0.1], ratios r = [6, 0.5, 1]
"""

import math

import pytest
import torch

from cispo.algo.losses import cispo_loss, dapo_loss, get_policy_loss, grpo_loss, normalization_weights

LN2, LN6 = math.log(2.0), math.log(6.0)


def example(requires_grad: bool = True):
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -0.1]], requires_grad=requires_grad)
    log_ratio = torch.tensor([[LN2, 0.0, -3.0], [LN6, -LN2, 0.0]])
    old = logprobs.detach() - log_ratio
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    return logprobs, old, adv, mask


def test_cispo_value_gradient_and_metrics_by_hand():
    logprobs, old, adv, mask = example()
    loss, metrics = cispo_loss(logprobs, old, adv, mask, eps_low=1.0, eps_high=4.0)
    # w = clip(r, 0, 5): row 0 [2, 1], row 1 [5, 0.5, 1]
    # sum w*A*logp = (2*1*-1) + (1*1*-2) + (5*-2*-0.5) + (0.5*-2*-1.5) + (1*-2*-0.1)
    #              = -4 + 5 + 1.5 + 0.2 = 2.7
    # loss = -2.7 / 5
    assert loss.item() == pytest.approx(-0.54, abs=1e-6)
    loss.backward()
    # d loss / d logp = -mask * w * A / N
    expected = torch.tensor([[-0.4, -0.2, 0.0], [2.0, 0.2, 0.4]])
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-6, rtol=0)
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 5)  # r = 6 > 5
    assert metrics["clip_frac_low"].item() == 0.0  # nothing below 1 - 1.0 = 0
    assert metrics["is_weight_mean"].item() == pytest.approx((2 + 1 + 5 + 0.5 + 1) / 5)
    assert metrics["is_weight_max"].item() == pytest.approx(5.0)
    assert metrics["ratio_mean"].item() == pytest.approx((2 + 1 + 6 + 0.5 + 1) / 5)
    # k3 KL: mean of (r - 1) - ln r over trained tokens
    k3 = sum((r - 1) - math.log(r) for r in (2, 1, 6, 0.5, 1)) / 5
    assert metrics["approx_kl"].item() == pytest.approx(k3, rel=1e-5)
    assert all(not v.requires_grad for v in metrics.values())


def test_gradient_identity_on_random_inputs():
    torch.manual_seed(0)
    logprobs = (-torch.rand(4, 9) * 3).requires_grad_()
    old = logprobs.detach() + torch.randn(4, 9)
    mask = (torch.rand(4, 9) > 0.3).float()
    adv = torch.randn(4)
    loss, _ = cispo_loss(logprobs, old, adv, mask, eps_low=0.5, eps_high=0.8)
    loss.backward()
    w = torch.exp(logprobs.detach() - old).clamp(0.5, 1.8)
    torch.testing.assert_close(logprobs.grad, -mask * w * adv[:, None] / mask.sum())


def test_offset_convention_not_absolute_cap():
    # eps_high = 4 caps the weight at 1 + 4 = 5, so r = 4.5 passes unclipped (TRL's absolute cap: 4).
    logprobs = torch.tensor([[math.log(4.5)]], requires_grad=True)
    old = torch.zeros(1, 1)
    loss, metrics = cispo_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 1), eps_high=4.0)
    loss.backward()
    assert logprobs.grad.item() == pytest.approx(-4.5, rel=1e-5)
    assert metrics["clip_frac_high"].item() == 0.0


def test_clipping_exactly_at_the_boundaries():
    # r exactly 1 + eps_high and exactly 1 - eps_low: weight equals the ratio, nothing counted as clipped.
    ratios = torch.tensor([[1.28, 0.8, 1.2800001 * 1.01, 0.79]])
    logprobs = torch.log(ratios).requires_grad_()
    loss, metrics = cispo_loss(
        logprobs, torch.zeros(1, 4), torch.tensor([1.0]), torch.ones(1, 4), eps_low=0.2, eps_high=0.28
    )
    loss.backward()
    # w = [1.28, 0.8, 1.28 (clipped), 0.8 (clipped)]; grad = -w * A / 4
    torch.testing.assert_close(logprobs.grad, -torch.tensor([[1.28, 0.8, 1.28, 0.8]]) / 4)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.25)


def test_unified_token_mask_recovers_ppo_style_dropping():
    logprobs, old, adv, mask = example()
    # eps_low = 0.2: w row 1 = [5, 0.8, 1]. Token (1,1) has A < 0 and r = 0.5 < 0.8: dropped by M.
    # With M: sum = -4 + (5*-2*-0.5) + (1*-2*-0.1) = -4 + 5 + 0.2 = 1.2 -> loss -0.24
    loss, metrics = cispo_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=4.0, token_mask=True)
    assert loss.item() == pytest.approx(-0.24, abs=1e-6)
    assert metrics["token_mask_frac"].item() == pytest.approx(1 / 5)
    # Without M the token stays, weighted 0.8: -4 + 5 + 0.8*-2*-1.5 + 0.2 = 3.6 -> loss -0.72
    loss_plain, _ = cispo_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=4.0)
    assert loss_plain.item() == pytest.approx(-0.72, abs=1e-6)


def test_no_gradient_into_old_logprobs():
    logprobs, old, adv, mask = example()
    old = old.clone().requires_grad_()
    loss, _ = cispo_loss(logprobs, old, adv, mask)
    loss.backward()
    assert old.grad is None


def test_on_policy_cispo_is_token_level_reinforce():
    torch.manual_seed(1)
    logprobs = (-torch.rand(3, 5) * 2).requires_grad_()
    mask = (torch.rand(3, 5) > 0.2).float()
    adv = torch.randn(3)
    loss, metrics = cispo_loss(logprobs, logprobs.detach(), adv, mask)
    reinforce = -(mask * adv[:, None] * logprobs).sum() / mask.sum()
    torch.testing.assert_close(loss, reinforce)
    (g1,) = torch.autograd.grad(loss, logprobs)
    (g2,) = torch.autograd.grad(reinforce, logprobs)
    torch.testing.assert_close(g1, g2)
    assert metrics["is_weight_mean"].item() == pytest.approx(1.0)


def test_grpo_by_hand():
    logprobs, old, adv, mask = example()
    loss, metrics = grpo_loss(logprobs, old, adv, mask)
    # row 0 (A=1):  min(2*1, 1.2*1) = 1.2; min(1, 1) = 1            -> mean 1.1
    # row 1 (A=-2): min(-12, -2.4) = -12; min(-1, -1.6) = -1.6; -2  -> mean -5.2
    # loss = -(1.1 - 5.2) / 2 = 2.05
    assert loss.item() == pytest.approx(2.05, abs=1e-5)
    loss.backward()
    # the clipped token (0, 0) gets no gradient: that is what CISPO changes
    assert logprobs.grad[0, 0].item() == 0.0
    assert metrics["grad_zeroed_frac"].item() == pytest.approx(2 / 5)  # (0,0) and (1,1)


def test_dapo_by_hand():
    logprobs, old, adv, mask = example()
    loss, _ = dapo_loss(logprobs, old, adv, mask)
    # row 0: min(2, 1.28) + 1 = 2.28; row 1: -12 - 1.6 - 2 = -15.6; token level: -(2.28 - 15.6) / 5
    assert loss.item() == pytest.approx(13.32 / 5, abs=1e-5)


def test_normalizers_by_hand():
    logprobs, old, adv, mask = example()
    # per-row sums of w*A*logp: row 0 = -4 (2 tokens), row 1 = 6.7 (3 tokens)
    one_group, _ = cispo_loss(logprobs, old, adv, mask, normalizer="group", group_ids=torch.tensor([7, 7]))
    assert one_group.item() == pytest.approx(-0.54, abs=1e-6)  # one group: same as token level
    two_groups, _ = cispo_loss(logprobs, old, adv, mask, normalizer="group", group_ids=torch.tensor([0, 1]))
    assert two_groups.item() == pytest.approx(-(-4 / 2 + 6.7 / 3) / 2, abs=1e-6)
    sample, _ = cispo_loss(logprobs, old, adv, mask, normalizer="sample")
    assert sample.item() == pytest.approx(-(-4 / 2 + 6.7 / 3) / 2, abs=1e-6)
    mixed, _ = cispo_loss(logprobs, old, adv, mask, normalizer="sample_token")
    assert mixed.item() == pytest.approx(0.5 * sample.item() + 0.5 * -0.54, abs=1e-6)


def test_microbatches_with_precomputed_weights_sum_to_full_batch():
    logprobs, old, adv, mask = example()
    for normalizer in ("token", "group", "sample", "sample_token"):
        groups = torch.tensor([0, 1])
        full, _ = cispo_loss(logprobs, old, adv, mask, normalizer=normalizer, group_ids=groups)
        weights = normalization_weights(mask, normalizer, groups)
        parts = [
            cispo_loss(
                logprobs[i : i + 1],
                old[i : i + 1],
                adv[i : i + 1],
                mask[i : i + 1],
                token_weights=weights[i : i + 1],
            )[0]
            for i in range(2)
        ]
        assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-6), normalizer


def test_per_token_advantages_accepted():
    logprobs, old, adv, mask = example()
    a = cispo_loss(logprobs, old, adv, mask)[0]
    b = cispo_loss(logprobs, old, adv[:, None].expand(2, 3), mask)[0]
    assert a.item() == pytest.approx(b.item())


def test_unknown_loss_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'; registered: cispo, dapo, grpo"):
        get_policy_loss("ppo")


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("old", torch.zeros(2, 4), "old_logprobs has shape"),
        ("mask", torch.ones(3, 3), "mask has shape"),
        ("adv", torch.zeros(3), "advantages must be"),
    ],
)
def test_mismatched_shapes_are_named(field, bad, message):
    logprobs, old, adv, mask = example()
    args = {"old": old, "mask": mask, "adv": adv}
    args[field] = bad
    with pytest.raises(ValueError, match=message):
        cispo_loss(logprobs, args["old"], args["adv"], args["mask"])


def test_unknown_normalizer_is_named():
    logprobs, old, adv, mask = example()
    with pytest.raises(ValueError, match="unknown normalizer 'seq'"):
        cispo_loss(logprobs, old, adv, mask, normalizer="seq")
