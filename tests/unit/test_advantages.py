"""compute_advantages: grpo, dr_grpo, rloo, invalid members, zero-variance groups. Hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from gym_plugin.advantages import compute_advantages, zero_variance_members
from gym_plugin.errors import ConfigError

# Group 3: rewards 1 0 0 1 (mean 0.5); group 8: 2 5 (mean 3.5); group 9: a single rollout (no baseline).
REWARDS = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 5.0, 7.0])
GROUPS = torch.tensor([3, 3, 8, 3, 3, 8, 9])


def test_grpo():
    adv, m = compute_advantages(REWARDS, GROUPS, "grpo", eps=0.0)
    # group 3: unbiased var = 4 * 0.25 / 3 = 1/3, std 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    # group 8: var = (1.5^2 * 2) / 1 = 4.5, std 2.12132 -> -+1.5 / 2.12132 = -+0.707107
    s3, s8 = 0.5 / math.sqrt(1 / 3), 1.5 / math.sqrt(4.5)
    torch.testing.assert_close(adv, torch.tensor([s3, -s3, -s8, -s3, s3, s8, 0.0]))
    assert m["advantage/num_groups"] == 3
    assert m["advantage/num_zero_variance_groups"] == 1  # the single-member group 9
    assert m["advantage/zero_variance_frac"] == pytest.approx(1 / 3)


def test_dr_grpo():
    adv, _ = compute_advantages(REWARDS, GROUPS, "dr_grpo")
    assert adv.tolist() == [0.5, -0.5, -1.5, -0.5, 0.5, 1.5, 0.0]


def test_rloo():
    adv, _ = compute_advantages(REWARDS, GROUPS, "rloo")
    # group 3: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - (1 + 0 + 1) / 3 = -2/3; group 8: 2 - 5 = -3, 5 - 2 = 3
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, -3.0, -2 / 3, 2 / 3, 3.0, 0.0]))


def test_invalid_members_do_not_count():
    valid = torch.tensor([True, True, True, True, False, False, True])
    adv, _ = compute_advantages(REWARDS, GROUPS, "dr_grpo", valid=valid)
    # group 3 valid rewards 1 0 0 -> mean 1/3; group 8 has only reward 2 left -> no baseline -> 0
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, 0.0, -1 / 3, 0.0, 0.0, 0.0]))


def test_zero_variance_members():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2])
    assert zero_variance_members(rewards, groups).tolist() == [True, True, False, False, True]
    adv, m = compute_advantages(rewards, groups, "grpo")
    assert adv[:2].tolist() == [0.0, 0.0]  # equal rewards: no signal
    assert m["advantage/num_zero_variance_groups"] == 2


def test_large_batch_matches_per_group_reference():
    torch.manual_seed(0)
    groups = torch.randint(0, 500, (4096,))
    rewards = torch.randn(4096)
    adv, _ = compute_advantages(rewards, groups, "grpo", eps=1e-6)
    for g in (0, 17, 499):  # spot-check against torch.std on the group itself
        sel = groups == g
        r = rewards[sel]
        expected = (r - r.mean()) / (r.std() + 1e-6) if sel.sum() > 1 else torch.zeros_like(r)
        torch.testing.assert_close(adv[sel], expected, atol=1e-5, rtol=1e-5)


def test_bad_mode():
    with pytest.raises(ConfigError, match="Did you mean 'rloo'"):
        compute_advantages(REWARDS, GROUPS, "rlo")
