"""Our collector drives NeMo Gym 0.7.0's own servers (started by its ``ng_run``: string_match and the
example_single_tool_call tool task, each behind simple_agent and a legacy_agent environment server) against our
fake endpoint, and gives the rewards and token ids NeMo Gym's own collector gives, row by row."""

from __future__ import annotations

import json

import pytest

from gym_plugin.launch import agent_routes
from tests.peers.nemo_gym_peer import (
    expected_reward,
    model_call_items,
    nemo_gym_rows,
    ng_aggregate_rollouts,
    ng_collect_rollouts,
    our_collect,
    read_jsonl,
    served_config,
    write_jsonl,
)
from tests.peers.nemo_gym_peer import fake_endpoint, nemo_gym_deployment, nemo_gym_venv  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.nemo_gym, pytest.mark.timeout(900)]

ENV_SERVER = {"string_match_simple_agent": "string_match_environment_server",
              "example_single_tool_call_simple_agent": "example_single_tool_call_environment_server"}


def test_our_collector_routes_through_nemo_gyms_environment_servers(nemo_gym_deployment):
    config = served_config(nemo_gym_deployment)
    routes = agent_routes(config)
    for agent, env in ENV_SERVER.items():
        relay = config[env]["environment_servers"]["legacy_agent"]
        agent_port = config[agent]["responses_api_agents"]["simple_agent"]["port"]
        assert routes[agent].url == f"http://127.0.0.1:{relay['port']}" and relay["port"] != agent_port
        assert (routes[agent].environment_server, routes[agent].environment_server_type) == (env, "legacy_agent")


def test_same_rewards_and_tokens_as_nemo_gyms_collector_row_by_row(nemo_gym_deployment, tmp_path):
    rows = nemo_gym_rows()
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "ng").mkdir()
    ng_out, our_out = tmp_path / "ng" / "rollouts.jsonl", tmp_path / "ours.jsonl"
    theirs_proc = ng_collect_rollouts(nemo_gym_deployment, path, ng_out)
    assert theirs_proc.returncode == 0, theirs_proc.stdout[-4000:] + theirs_proc.stderr[-4000:]
    ours_proc = our_collect(nemo_gym_deployment, path, our_out)
    assert ours_proc.returncode == 0, ours_proc.stderr[-3000:]
    assert "200 rollouts, 0 failures" in ours_proc.stdout
    theirs = {r["_ng_task_index"]: r for r in read_jsonl(ng_out)}
    ours = {r["_ng_task_index"]: r for r in read_jsonl(our_out)}
    assert sorted(theirs) == sorted(ours) == list(range(200))
    for i, row in enumerate(rows):
        mine, ng = ours[i], theirs[i]
        assert mine["reward"] == ng["reward"] == expected_reward(row), (i, row)
        mine_calls, ng_calls = model_call_items(mine), model_call_items(ng)
        assert mine_calls, f"row {i}: no token ids"
        assert [(c["prompt_token_ids"], c["generation_token_ids"], c["generation_log_probs"]) for c in mine_calls] == \
               [(c["prompt_token_ids"], c["generation_token_ids"], c["generation_log_probs"]) for c in ng_calls]
        for key in ("agent_ref", "_ng_environment_server", "_ng_result_type"):  # the keys 0.7.0 stamps
            assert mine[key] == ng[key], (i, key)
        assert mine["_ng_environment_server"] == ENV_SERVER[row["agent_ref"]["name"]]
    summary = json.loads(ng_out.with_name("quality_summary.json").read_text())
    assert summary["run"]["verdicts"]["unhealthy"] == 0

    # Our records carry what NeMo Gym's tools read: its ng_aggregate_rollouts scores them on the environment
    # server each names, and its health check passes them.
    (tmp_path / "agg").mkdir()
    agg = ng_aggregate_rollouts(nemo_gym_deployment, our_out, tmp_path / "agg" / "rollouts.jsonl")
    assert agg.returncode == 0, agg.stdout[-3000:] + agg.stderr[-3000:]
    metrics = json.loads((tmp_path / "agg" / "rollouts_aggregate_metrics.json").read_text())
    ng_metrics = json.loads(ng_out.with_name("rollouts_aggregate_metrics.json").read_text())
    assert {m["_ng_environment_server"]: m["key_metrics"]["mean/reward"] for m in metrics} == {
        m["_ng_environment_server"]: m["key_metrics"]["mean/reward"] for m in ng_metrics}
    assert "Rollout health: 200 checked" in agg.stdout and ", 0 unhealthy," in agg.stdout
