"""gym_plugin.trl's records -> TRL rollout_func output (`rollouts_to_trl`), on hand-built records; no TRL needed.

Token ids are made up: a call's prompt, generation and log-probs are written out, and the expected completion /
env_mask / logprobs are worked out by hand in the comments (the multi-turn splice of process_rollouts).
"""

from __future__ import annotations

import pytest

from gym_plugin.errors import ConfigError, ProtocolError
from gym_plugin.process import process_rollouts
from gym_plugin.trl import GymRollouts, WeightSyncCallback, _merge_stats, gym_dataset, gym_reward, rollouts_to_trl
from gym_plugin.weight_sync import WeightSyncConfig

EOS = 2


def call(prompt, gen, lps, kind="function_call", **extra):
    return {"type": kind, "prompt_token_ids": prompt, "generation_token_ids": gen, "generation_log_probs": lps,
            **extra}


def record(items, reward=1.0, task=0, agent="calc_agent", **extra):
    return {"reward": reward, "_ng_task_index": task, "agent_ref": {"name": agent}, "response": {"output": items},
            **extra}


# call 1: prompt [10, 11, 12] -> [20, 21] (a tool call); the tool result + scaffolding [30, 31]; call 2 -> [22]
TWO_CALLS = [call([10, 11, 12], [20, 21], [-0.1, -0.2]),
             {"type": "function_call_output", "output": "12"},
             call([10, 11, 12, 20, 21, 30, 31], [22], [-0.3], kind="message")]


def test_multi_turn_completion_is_everything_after_the_first_prompt():
    out, stats = rollouts_to_trl([record(TWO_CALLS)], placeholder_id=EOS)
    assert out["prompt_ids"] == [[10, 11, 12]]
    assert out["completion_ids"] == [[20, 21, 30, 31, 22]]
    assert out["env_mask"] == [[1, 1, 0, 0, 1]]  # generations 1, tool result + scaffolding 0
    assert out["logprobs"][0] == pytest.approx([-0.1, -0.2, 0.0, 0.0, -0.3])  # 0.0 on environment tokens
    assert out["gym_reward"] == [1.0]
    assert stats["gym/drift_count"] == 0 and stats["gym/num_no_signal"] == 0
    # the same as process_rollouts' row: loss mask = [0] * prompt + env_mask
    batch = process_rollouts([record(TWO_CALLS)], pad_token_id=0)
    assert batch.input_ids[0].tolist() == [10, 11, 12, 20, 21, 30, 31, 22]
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 1]


def test_drift_trains_the_last_call_only_or_nothing():
    # call 2's prompt does not start with call 1's prompt + generation ([10, 11, 99, ...]): a drifted splice
    drifted = [call([10, 11, 12], [20, 21], [-0.1, -0.2]), call([10, 11, 99, 30], [22], [-0.3], kind="message")]
    out, stats = rollouts_to_trl([record(drifted)], placeholder_id=EOS, drift_policy="last_turn")
    assert out["prompt_ids"] == [[10, 11, 99, 30]] and out["completion_ids"] == [[22]]
    assert out["env_mask"] == [[1]] and out["logprobs"][0] == pytest.approx([-0.3])
    assert stats["gym/drift_count"] == 1 and out["gym_reward"] == [1.0]
    out, stats = rollouts_to_trl([record(drifted)], placeholder_id=EOS, drift_policy="drop")
    assert out["completion_ids"] == [[EOS]] and out["env_mask"] == [[0]] and out["gym_reward"] == [None]
    assert stats["gym/num_no_signal"] == 1
    with pytest.raises(ConfigError, match="one completion"):
        rollouts_to_trl([record(drifted)], placeholder_id=EOS, drift_policy="split")


def test_constrained_call_stays_context():
    items = [dict(TWO_CALLS[0], constrained=True), *TWO_CALLS[1:]]
    out, stats = rollouts_to_trl([record(items)], placeholder_id=EOS)
    assert out["env_mask"] == [[0, 0, 0, 0, 1]]  # the grammar-constrained generation [20, 21] is not trained
    assert out["logprobs"][0] == pytest.approx([0.0, 0.0, 0.0, 0.0, -0.3])
    assert stats["gym/num_constrained_calls"] == 1
    assert process_rollouts([record(items)], pad_token_id=0).loss_mask[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    out, _ = rollouts_to_trl([record(items)], placeholder_id=EOS, constrained_policy="drop")
    assert out["gym_reward"] == [None] and out["env_mask"] == [[0]]


def test_rollouts_without_signal_keep_their_slot():
    failure = {"_ng_task_index": 1, "agent_ref": {"name": "calc_agent"}, "reward": None,
               "failure": {"kind": "http_status", "reason": "503"}}
    masked = record(TWO_CALLS, reward=1.0, task=2, mask_sample=True)
    no_tokens = record([{"type": "message", "role": "assistant", "content": "hi"}], reward=0.0, task=3)
    ok = record(TWO_CALLS, reward=0.5, task=4, agent="other_agent")
    out, stats = rollouts_to_trl([record(TWO_CALLS), failure, masked, no_tokens, ok], placeholder_id=EOS)
    assert out["gym_reward"] == [1.0, None, None, None, 0.5]
    for i in (1, 2, 3):
        assert out["prompt_ids"][i] == [EOS] and out["completion_ids"][i] == [EOS]
        assert out["env_mask"][i] == [0] and out["logprobs"][i] == [0.0]
    assert out["completion_ids"][4] == [20, 21, 30, 31, 22]
    metrics = _merge_stats([stats])
    assert metrics["gym/num_rollouts"] == 5 and metrics["gym/num_failed"] == 1 and metrics["gym/num_masked"] == 1
    assert metrics["gym/num_missing_tokens"] == 1 and metrics["gym/num_no_signal"] == 3
    # means over the 4 rollouts with a reward: model calls (2 + 2 + 0 + 2) / 4, function calls (1 + 1 + 0 + 1) / 4
    assert metrics["gym/turns_mean"] == 1.5 and metrics["gym/tool_calls_mean"] == 0.75
    # reward by agent over those 4: calc_agent (1.0 + 1.0 + 0.0) / 3, other_agent 0.5
    assert metrics["gym/reward/calc_agent"] == pytest.approx(2 / 3) and metrics["gym/reward/other_agent"] == 0.5


def test_two_ranks_stats_merge_into_sums_and_means():
    _, a = rollouts_to_trl([record(TWO_CALLS, reward=1.0)], placeholder_id=EOS)
    _, b = rollouts_to_trl([record(TWO_CALLS, reward=0.0, task=1), {"reward": None, "failure": {"kind": "agent"},
                                                                   "_ng_task_index": 2}], placeholder_id=EOS)
    metrics = _merge_stats([a, b])
    assert metrics["gym/num_rollouts"] == 3 and metrics["gym/num_failed"] == 1
    assert metrics["gym/reward/calc_agent"] == 0.5  # (1.0 + 0.0) / 2, the failure left out


def test_dataset_and_reward_errors():
    with pytest.raises(ProtocolError, match="agent_ref"):
        gym_dataset([{"responses_create_params": {"input": "hi"}}])
    with pytest.raises(ConfigError, match="GymRollouts"):
        gym_reward(["x"])
    assert gym_reward(["a", "b"], gym_reward=[1, None]) == [1.0, None]


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="model_name="):
        GymRollouts("conf/gym/calculator.yaml", base_urls=["http://127.0.0.1:1/v1"])
    with pytest.raises(ConfigError, match="'last_turn', 'drop'"):
        GymRollouts("conf/gym/calculator.yaml", drift_policy="split")
    with pytest.raises(ConfigError, match="already shares the trainer's weights"):
        WeightSyncCallback(WeightSyncConfig(kind="inprocess"))
    with pytest.raises(ConfigError, match="build_weight_sync"):
        WeightSyncCallback(object())
