"""The recipe's small helpers on their own: reward metrics, the step line, prompt batches, rank shards, the PNG."""

from __future__ import annotations

import itertools

import pytest

from gym_plugin.distributed import shard_groups
from gym_plugin.errors import ConfigError
from gym_plugin.plotting import plot_reward_curve
from gym_plugin.process import reward_metrics
from gym_plugin.run_logging import format_step_line
from gym_plugin.tasks import prompt_batches


def rollout(reward, gen_tokens):
    return {"reward": reward, "response": {"output": [{"type": "message", "generation_token_ids": [7] * gen_tokens}]}}


def test_reward_metrics_by_hand():
    records = [rollout(1.0, 4), rollout(0.0, 2), rollout(1.0, 6), rollout(0.5, 0),
               {"reward": None, "failure": {"kind": "timeout"}}]
    m = reward_metrics(records)
    # successful rewards 1, 0, 1, 0.5: mean 2.5/4 = 0.625; deviations .375, -.625, .375, -.125;
    # squares .140625 + .390625 + .140625 + .015625 = .6875; /4 = .171875; std = sqrt(.171875) = 0.41458
    assert m["rollout/reward_mean"] == 0.625
    assert m["rollout/reward_std"] == pytest.approx(0.171875 ** 0.5)
    assert m["rollout/accuracy"] == 0.5  # two of four reach 1.0
    assert (m["rollout/reward_min"], m["rollout/reward_max"]) == (0.0, 1.0)
    assert m["rollout/gen_tokens_mean"] == 3.0  # (4 + 2 + 6 + 0) / 4
    assert m["rollout/num_rollouts"] == 5 and m["rollout/num_failed"] == 1  # the failure is counted, not scored


def test_step_line_skips_missing_and_nan():
    line = format_step_line(3, 8, {"rollout/reward_mean": 0.46875, "loss/total": float("nan"),
                                   "perf/num_trained_tokens": 1234.0, "perf/collect_time_s": 4.04})
    assert line == "step 3/8 | reward 0.469 | tokens 1234 | collect 4.0s"


def test_prompt_batches_cover_each_epoch_and_never_repeat_within_a_batch():
    batches = list(itertools.islice(prompt_batches(10, 4, seed=3), 10))  # 40 indices = 4 epochs of 10
    assert all(len(set(b)) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(list(range(10)) * 4)
    assert batches == list(itertools.islice(prompt_batches(10, 4, seed=3), 10))  # same seed, same order
    assert batches != list(itertools.islice(prompt_batches(10, 4, seed=4), 10))
    with pytest.raises(ConfigError, match="prompts_per_step=11"):
        next(prompt_batches(10, 11, seed=0))


def test_shard_groups_round_robin_whole_groups():
    assert shard_groups(["p0", "p1", "p2", "p3", "p4"], 0, 2) == ["p0", "p2", "p4"]
    assert shard_groups(["p0", "p1", "p2", "p3", "p4"], 1, 2) == ["p1", "p3"]
    with pytest.raises(ConfigError, match="smaller than the number of ranks"):
        shard_groups(["p0"], 0, 2)


def test_reward_curve_png(tmp_path):
    rows = [{"step": s, "rollout/reward_mean": r, "rollout/reward_std": 0.5, "rollout/reward_min": 0.0,
             "rollout/reward_max": 1.0, "rollout/accuracy": r} for s, r in [(1, 0.25), (2, 0.5), (3, 0.75)]]
    out = plot_reward_curve(rows, tmp_path / "curve.png", eval_rows=[{"step": 0, "eval/reward_mean": 0.3}])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
