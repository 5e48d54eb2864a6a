"""policy_loss: clipping, dual clip, KL, TIS, aggregations. Numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from gym_plugin.errors import ConfigError
from gym_plugin.loss import LossConfig, kl_penalty, policy_loss

RATIOS = torch.tensor([[1.5, 0.5, 1.1]])
ONES = torch.ones(1, 3)


def loss_at(ratios, adv, **kw):
    """Loss and metrics with old log-probs 0, so that exp(logprobs) is the ratio; logprobs require grad."""
    logprobs = torch.log(ratios).requires_grad_(True)
    loss, metrics = policy_loss(logprobs, torch.zeros_like(logprobs), torch.tensor(adv), torch.ones_like(logprobs), **kw)
    return loss, metrics, logprobs


def test_clipping_positive_advantage():
    loss, m, lp = loss_at(RATIOS, [1.0])
    # -A*r = [-1.5, -0.5, -1.1]; -A*clip(r, 0.8, 1.2) = [-1.2, -0.8, -1.1]; max = [-1.2, -0.5, -1.1]
    # token-mean = -(1.2 + 0.5 + 1.1) / 3 = -0.93333; token 0 clipped -> clip_frac 1/3 (all "high")
    assert loss.item() == pytest.approx(-2.8 / 3, abs=1e-6)
    assert m["loss/clip_frac"] == pytest.approx(1 / 3) and m["loss/clip_frac_high"] == pytest.approx(1 / 3)
    assert m["loss/clip_frac_low"] == 0
    loss.backward()
    # d/dlogp of -A*r/3 = -r/3 on unclipped tokens; 0 on the clipped one
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.5 / 3, -1.1 / 3]]))


def test_clip_higher():
    loss, m, _ = loss_at(RATIOS, [1.0], clip_eps_high=0.28)
    # token 0 now clipped at 1.28: -(1.28 + 0.5 + 1.1) / 3 = -0.96
    assert loss.item() == pytest.approx(-0.96, abs=1e-6)
    loss, m, _ = loss_at(RATIOS, [1.0], clip_eps_high=0.6)  # 1.5 < 1.6: nothing clipped
    assert loss.item() == pytest.approx(-3.1 / 3, abs=1e-6) and m["loss/clip_frac"] == 0


def test_clipping_negative_advantage_and_dual_clip():
    loss, m, _ = loss_at(RATIOS, [-1.0])
    # -A*r = [1.5, 0.5, 1.1]; clipped = [1.2, 0.8, 1.1]; max = [1.5, 0.8, 1.1] -> 3.4 / 3; token 1 clipped (low)
    assert loss.item() == pytest.approx(3.4 / 3, abs=1e-6)
    assert m["loss/clip_frac_low"] == pytest.approx(1 / 3)
    loss, m, lp = loss_at(RATIOS, [-1.0], dual_clip_c=1.3)
    # dual clip bounds each token's loss by -A*c = 1.3: [1.3, 0.8, 1.1] -> 3.2 / 3
    assert loss.item() == pytest.approx(3.2 / 3, abs=1e-6)
    assert m["loss/dual_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    # only token 2 (unclipped, 1.1 = r) carries gradient: d(r/3)/dlogp = r/3
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, 1.1 / 3]]))


def test_kl_estimators_and_penalty():
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    # k1 = log 0.5 - log 0.25 = log 2; k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + log 2 - 1
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2), abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    loss, m = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, kl_coef=0.1)
    # advantage 0 -> only the penalty: 0.1 * 0.193147
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5), abs=1e-6)
    assert m["loss/kl"] == pytest.approx(math.log(2) - 0.5, abs=1e-6)
    loss, _ = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, kl_coef=0.1, kl_type="k1")
    assert loss.item() == pytest.approx(0.1 * math.log(2), abs=1e-6)
    with pytest.raises(ConfigError, match="ref_logprobs"):
        policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.1)


def test_truncated_importance_sampling():
    zeros = torch.zeros(1, 3)
    rollout = torch.log(torch.tensor([[1 / 3, 0.5, 1.0]]))
    # ratio 1, A = 1 -> pg = -1 per token. Token TIS weights exp(0 - rollout) = [3, 2, 1] -> capped at 2: [2, 2, 1]
    loss, m = policy_loss(zeros, zeros, torch.tensor([1.0]), ONES, rollout_logprobs=rollout, tis_level="token", tis_cap=2.0)
    assert loss.item() == pytest.approx(-5 / 3, abs=1e-6)
    assert m["loss/tis_capped_frac"] == pytest.approx(1 / 3)
    # Sequence TIS: exp(sum(0 - rollout)) = 3 * 2 * 1 = 6 -> capped 2 -> -2; with cap 10 -> -6
    loss, _ = policy_loss(zeros, zeros, torch.tensor([1.0]), ONES, rollout_logprobs=rollout, tis_level="sequence", tis_cap=2.0)
    assert loss.item() == pytest.approx(-2.0, abs=1e-6)
    loss, m = policy_loss(zeros, zeros, torch.tensor([1.0]), ONES, rollout_logprobs=rollout, tis_level="sequence", tis_cap=10.0)
    assert loss.item() == pytest.approx(-6.0, abs=1e-5)
    # mismatch metric: mean |0 - rollout| = (log 3 + log 2 + 0) / 3
    assert m["loss/rollout_logprob_abs_diff"] == pytest.approx((math.log(3) + math.log(2)) / 3, abs=1e-6)
    with pytest.raises(ConfigError, match="rollout_logprobs"):
        policy_loss(zeros, zeros, torch.tensor([1.0]), ONES, tis_level="token")


# Two rows, ratio 1: per-token loss = -A. Row 0 trains tokens with loss 1, 2, 3; row 1 one token with loss 4.
AGG_ADV = -torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "aggregation, kw, expected",
    [
        ("token-mean", {}, 10 / 4),  # (1 + 2 + 3 + 4) / 4 tokens
        ("token-mean", {"global_token_count": 8}, 10 / 8),
        ("seq-mean-token-mean", {}, (6 / 3 + 4 / 1) / 2),  # mean of row means 2 and 4 = 3
        ("seq-mean-token-mean", {"global_seq_count": 4}, 6 / 4),
        ("seq-mean-token-sum-norm", {}, 10 / (2 * 4)),  # token sum / (2 rows * T = 4)
        ("seq-mean-token-sum-norm", {"token_sum_norm": 5}, 10 / (2 * 5)),
    ],
)
def test_aggregations(aggregation, kw, expected):
    zeros = torch.zeros(2, 4)
    loss, m = policy_loss(zeros, zeros, AGG_ADV, AGG_MASK, aggregation=aggregation, **kw)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["loss/num_tokens"] == 4


def test_config_validation_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        LossConfig(aggregation="token_mean", kl_type="k2", dual_clip_c=0.5).validate()
    assert len(err.value.problems) == 3
    assert "Did you mean 'token-mean'" in str(err.value)
