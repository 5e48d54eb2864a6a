"""keep_top_p_top_k: the top-p / top-k filter both embedded schedulers sample through (continuous.sample and the
batch-at-a-time engine), on hand-worked distributions."""

import torch

from gym_plugin.servers.embedded.continuous import keep_top_p_top_k


def test_top_p_and_top_k_keep_a_prefix_of_the_sorted_order_per_row():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3],    # sorted 0.5, 0.3, 0.15, 0.05: mass before 0, .5, .8, .95
                          [0.15, 0.5, 0.05, 0.3],
                          [0.15, 0.5, 0.05, 0.3],
                          [0.25, 0.25, 0.25, 0.25]])
    top_p = torch.tensor([0.8, 1.0, 0.9, 1.0])
    top_k = torch.tensor([0, 1, 3, 2])
    out = keep_top_p_top_k(probs.clone(), top_p, top_k)
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.3],     # top_p .8: .5 and .3 (mass before .15 is .8, not < .8)
                             [0.0, 0.5, 0.0, 0.0],     # top_k 1: the argmax only
                             [0.15, 0.5, 0.0, 0.3],    # top_p .9 keeps 3 (mass before .15 is .8 < .9); top_k 3 too
                             [0.25, 0.25, 0.25, 0.25]])  # ties: the threshold is a probability, so all four stay
    assert torch.equal(out, expected)
    # off (top_p 1, top_k 0): nothing removed
    assert torch.equal(keep_top_p_top_k(probs[:1].clone(), torch.tensor([1.0]), torch.tensor([0])), probs[:1])
