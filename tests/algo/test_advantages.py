"""Section 2 (group advantages), DAPO overlong shaping and the dynamic-sampling filter."""

import math
import statistics

import pytest
import torch

from calibrl.algo import group_advantages, informative_groups, overlong_penalty


def adv(rewards, groups, experts=None, **kw):
    experts = experts or [False] * len(rewards)
    return group_advantages(torch.tensor(rewards), torch.tensor(groups), torch.tensor(experts), **kw).tolist()


def test_rareness_hand_worked():
    # pass rate 1/4: the correct response gets 1 - p = 0.75, wrong ones -p = -0.25
    assert adv([1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0]) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # pass rate 3/4: the rare wrong one gets the larger |A|
    assert adv([1.0, 1.0, 1.0, 0.0], [0, 0, 0, 0]) == pytest.approx([0.25, 0.25, 0.25, -0.75])


def test_std_normalisation_on_and_off():
    r = [1.0, 0.0, 0.0, 0.0]
    std = statistics.stdev(r)  # unbiased
    assert (adv(r, [0] * 4, std_normalize=True)
            == pytest.approx([a / (std + 1e-6) for a in [0.75, -0.25, -0.25, -0.25]]))
    assert adv(r, [0] * 4, std_normalize=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])


@pytest.mark.parametrize("std_normalize", [False, True])
def test_all_pass_and_all_fail_groups_get_zero(std_normalize):
    out = adv([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0, 0, 0, 1, 1, 1], std_normalize=std_normalize)
    assert out == pytest.approx([0.0] * 6)


@pytest.mark.parametrize("std_normalize", [False, True])
def test_single_response_group_gets_its_reward(std_normalize):
    out = adv([1.1, 0.0, 1.0, 0.0], [7, 3, 3, 9], std_normalize=std_normalize)
    scale = 1 / (1 + 1e-6) if std_normalize else 1.0
    assert out[0] == pytest.approx(1.1 * scale)
    assert out[3] == pytest.approx(0.0)
    assert out[1:3] == pytest.approx([-0.5 / ((math.sqrt(0.5) + 1e-6) if std_normalize else 1), 0.5 /
                                      ((math.sqrt(0.5) + 1e-6) if std_normalize else 1)])


def test_experts_out_of_the_baseline_but_get_r_minus_baseline():
    rewards, groups, experts = [1.0, 0.0, 1.1], [0, 0, 0], [False, False, True]
    assert adv(rewards, groups, experts) == pytest.approx([0.5, -0.5, 0.6])
    # LUFFY: the expert counts in the baseline
    mean = (1.0 + 0.0 + 1.1) / 3
    assert (adv(rewards, groups, experts, expert_in_baseline=True)
            == pytest.approx([r - mean for r in rewards]))


def test_loop_vs_vectorised_random():
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.randint(0, 2, (200,), generator=gen).float()
               + 0.1 * torch.randint(0, 2, (200,), generator=gen))
    groups = torch.randint(0, 40, (200,), generator=gen) * 3 + 11  # sparse ids
    experts = torch.rand(200, generator=gen) < 0.2
    for std_normalize in (False, True):
        for in_baseline in (False, True):
            out = group_advantages(rewards, groups, experts, std_normalize=std_normalize,
                                   expert_in_baseline=in_baseline)
            for i in range(200):
                members = [rewards[j].item() for j in range(200)
                           if groups[j] == groups[i] and (in_baseline or not experts[j])]
                mean, std = ((statistics.mean(members), statistics.stdev(members)) if len(members) > 1
                             else (0.0, 1.0))
                expected = rewards[i].item() - mean
                if std_normalize:
                    expected /= std + 1e-6
                assert out[i].item() == pytest.approx(expected, rel=1e-6, abs=1e-5)


def test_overlong_penalty():
    lengths = torch.tensor([10, 60, 80, 90, 100, 120])
    out = overlong_penalty(lengths, max_length=100, buffer_tokens=40, penalty=1.0).tolist()
    assert out == pytest.approx([0.0, 0.0, -0.5, -0.75, -1.0, -1.5])
    assert overlong_penalty(lengths, max_length=100, buffer_tokens=0).tolist() == [0.0] * 6


def test_informative_groups():
    passed = torch.tensor([True, True, False, False, True, False, True, True])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    experts = torch.tensor([False, False, False, False, False, False, False, True])  # group 3: one response
    assert informative_groups(passed, groups, experts).tolist() == [False, False, False, False, True, True,
                                                                    False, False]
