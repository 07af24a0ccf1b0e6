import pytest
import torch

from cispo.algo.advantages import batch_normalized_advantages, get_advantage, group_advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4, eps=1e-6)
    # group 0: mean 0.5, population std 0.5 -> +-0.5 / 0.500001
    a = 0.5 / 0.500001
    torch.testing.assert_close(adv.values[:4], torch.tensor([a, -a, -a, a]))
    # group 1: all equal -> exactly zero, flagged
    assert torch.equal(adv.values[4:8], torch.zeros(4))
    # group 2: mean 0.25, std sqrt(0.1875) = 0.4330127
    std = 0.1875**0.5
    torch.testing.assert_close(adv.values[8:], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (std + 1e-6))
    assert adv.zero_variance_groups.tolist() == [False, True, False]
    assert adv.keep_rows(4).tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_group_advantages_sum_to_zero_per_group():
    torch.manual_seed(0)
    adv = group_advantages(torch.rand(32), 8)
    torch.testing.assert_close(adv.values.view(4, 8).sum(1), torch.zeros(4), atol=1e-5, rtol=0)


def test_mean_centring_only():
    adv = group_advantages(torch.tensor([3.0, 1.0]), 2, scale_by_std=False)
    assert adv.values.tolist() == [1.0, -1.0]


def test_batch_normalisation_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = batch_normalized_advantages(rewards, 2)
    # batch std of [1,0,1,1] = sqrt(0.1875); group 0 centred +-0.5; group 1 zero variance -> 0
    s = 0.1875**0.5 + 1e-6
    torch.testing.assert_close(adv.values, torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0]))


def test_bad_group_size_and_unknown_estimator():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="unknown advantage estimator 'gae'"):
        get_advantage("gae")
