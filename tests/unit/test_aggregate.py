"""/aggregate_metrics (NeMo Gym 0.7.0's run summary): hand-worked statistics, masking, repeats, the t quantile."""

from __future__ import annotations

import math

import pytest

from gym_plugin.servers.aggregate import aggregate_metrics, t_quantile
from gym_plugin.errors import ProtocolError


def rec(task: int, rollout: int, reward: float, tool_calls: int, masked: bool = False, tokens: int = 10) -> dict:
    r = {"_ng_task_index": task, "_ng_rollout_index": rollout, "reward": reward, "tool_calls": tool_calls,
         "answer_correct": reward == 1.0, "extracted_answer": "7", "agent_ref": {"name": "a"},
         "response": {"usage": {"input_tokens": tokens, "output_tokens": 2, "input_tokens_details": {}}}}
    if masked:
        r["mask_sample"] = True
    return r


RECORDS = [rec(0, 0, 1.0, 2), rec(0, 1, 0.0, 0, tokens=20), rec(1, 0, 1.0, 1), rec(1, 1, 1.0, 1),
           rec(2, 0, 1.0, 5, masked=True)]


def test_agent_metrics_by_hand():
    out = aggregate_metrics({"verify_responses": RECORDS})
    agent = out["agent_metrics"]
    # Scored rewards [1, 0, 1, 1]: mean .75, median 1, sample std sqrt(((.25^2) * 3 + .75^2) / 3) = .5.
    assert agent["mean/reward"] == 0.75 and agent["median/reward"] == 1.0
    assert agent["max/reward"] == 1.0 and agent["min/reward"] == 0.0
    assert agent["std/reward"] == pytest.approx(0.5)
    assert agent["mean/tool_calls"] == 1.0  # (2 + 0 + 1 + 1) / 4; the masked row's 5 is left out
    assert agent["mean/answer_correct"] == 0.75  # bools count as 0/1
    assert agent["mean/input_tokens"] == 12.5  # response.usage numbers: (10 + 20 + 10 + 10) / 4
    assert "mean/extracted_answer" not in agent and "mean/mask_sample" not in agent  # text and the flag: no
    assert "mean/input_tokens_details" not in agent
    assert agent["num_repeats"] == 2
    # One of five rollouts masked, and with it all of task 2.
    coverage = {"coverage/measured_rollouts": 4, "coverage/masked_rollouts": 1, "coverage/measured_tasks": 2,
                "coverage/fully_masked_tasks": 1}
    assert {k: agent[k] for k in coverage} == coverage
    assert out["key_metrics"] == {**{k: v for k, v in agent.items() if k.startswith("mean/")}, **coverage}


def test_group_and_repeat_level_metrics_by_hand():
    out = aggregate_metrics({"verify_responses": RECORDS})
    g0, g1 = out["group_level_metrics"]
    assert (g0["_ng_task_index"], g1["_ng_task_index"]) == (0, 1)
    assert g0["mean/reward"] == 0.5 and g0["std/reward"] == pytest.approx(math.sqrt(0.5))  # [1, 0]
    assert g1["std/reward"] == 0.0 and g0["num_rollouts"] == 2 and g0["missing_num_rollouts"] == 0
    assert [i["rollout_id"] for i in g0["rollout_infos"]] == ["0:0", "0:1"]
    assert g0["rollout_infos"][1] == {"rollout_id": "0:1", "_ng_task_index": 0, "_ng_rollout_index": 1,
                                      "reward": 0.0, "input_tokens": 20, "output_tokens": 2, "tool_calls": 0,
                                      "answer_correct": 0}
    r0, r1 = out["repeat_level_metrics"]
    # Repeat 0 rewards [1, 1] (tasks 0, 1), repeat 1 rewards [0, 1].
    assert (r0["_ng_rollout_index"], r0["sample_count"], r0["missing_count"]) == (0, 2, 0)
    assert r0["mean/reward"] == 1.0 and r1["mean/reward"] == 0.5
    assert r1["sem/reward"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert r1["p25/reward"] == 0.25 and r1["p75/reward"] == 0.75
    agent = out["agent_metrics"]
    # Across repeats: the two means [1, .5] -> mean .75, sample std sqrt(.125), se .25, 95 % t(1) interval.
    assert agent["mean_across_repeats/mean/reward"] == 0.75
    assert agent["std_across_repeats/mean/reward"] == pytest.approx(math.sqrt(0.125))
    assert agent["se_across_repeats/mean/reward"] == pytest.approx(0.25)
    assert agent["ci_low_95_across_repeats/mean/reward"] == pytest.approx(0.75 - 12.706204736 * 0.25)


def test_single_rollouts_have_std_zero_and_no_repeat_level():
    out = aggregate_metrics({"verify_responses": [rec(0, 0, 1.0, 1), rec(1, 0, 0.0, 1)]})
    assert out["group_level_metrics"][0]["std/reward"] == 0.0  # one row per task: 0, not NaN
    assert out["repeat_level_metrics"] == [] and out["agent_metrics"]["num_repeats"] == 1
    assert "mean_across_repeats/mean/reward" not in out["agent_metrics"]


def test_all_masked_and_empty():
    out = aggregate_metrics({"verify_responses": [rec(0, 0, 1.0, 1, masked=True)]})
    assert out["agent_metrics"] == out["key_metrics"] == {
        "coverage/measured_rollouts": 0, "coverage/masked_rollouts": 1, "coverage/measured_tasks": 0,
        "coverage/fully_masked_tasks": 1}
    assert aggregate_metrics({"verify_responses": []}) == {
        "group_level_metrics": [], "agent_metrics": {}, "key_metrics": {}, "repeat_level_metrics": []}


@pytest.mark.parametrize("body", [None, {"rows": []}, {"verify_responses": [1, 2]}])
def test_malformed_request_is_a_protocol_error(body):
    with pytest.raises(ProtocolError, match="verify_responses"):
        aggregate_metrics(body)


@pytest.mark.parametrize("df, want", [(1, 12.706204736174), (2, 4.302652729749), (4, 2.776445105198),
                                      (10, 2.228138851986), (100, 1.983971518524)])
def test_t_quantile_matches_tables(df, want):
    assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-9)
