"""Environment server entries (NeMo Gym 0.7.0's hop in front of every agent): generated, declared, refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gym_plugin.config import load_config
from gym_plugin.envservers import default_name
from gym_plugin.errors import ConfigError
from gym_plugin.launch import agent_routes

ROOT = Path(__file__).resolve().parents[2]
BASE = ["policy_base_url=http://127.0.0.1:9/v1"]

TWO_AGENTS = """
policy_base_url: http://127.0.0.1:9/v1
math:
  resources_servers:
    math_verify: {}
math_simple_agent:
  responses_api_agents:
    simple_agent:
      resources_server: {type: resources_servers, name: math}
      model_server: {type: responses_api_models, name: policy_model}
solver:
  responses_api_agents:
    simple_agent:
      resources_server: {type: resources_servers, name: math}
      model_server: {type: responses_api_models, name: policy_model}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "env.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("agent, impl, want", [
    ("math_simple_agent", "simple_agent", "math_environment_server"),  # NeMo Gym's own example
    ("math_agent", "simple_agent", "math_environment_server"),
    ("solver", "simple_agent", "solver_environment_server"),
    ("simple_agent", "simple_agent", "simple_agent_environment_server"),
])
def test_names_follow_nemo_gym(agent, impl, want):
    assert default_name(agent, impl) == want


def test_every_agent_gets_a_legacy_agent_entry(tmp_path):
    cfg = load_config(write(tmp_path, TWO_AGENTS))
    assert cfg.data["math_environment_server"] == {"environment_servers": {"legacy_agent": {
        "agent_server": {"type": "responses_api_agents", "name": "math_simple_agent"}}}}
    assert {n: s.agent for n, s in cfg.environment_servers.items()} == {
        "math_environment_server": "math_simple_agent", "solver_environment_server": "solver"}
    assert sorted(cfg.servers) == ["math", "math_simple_agent", "policy_model", "solver"]  # none is started


def test_a_taken_name_falls_back_to_the_agent_name(tmp_path):
    text = TWO_AGENTS.replace("math:\n", "math_environment_server:\n").replace("name: math}", "name: math_environment_server}")
    cfg = load_config(write(tmp_path, text))
    assert cfg.environment_servers["math_simple_agent_environment_server"].agent == "math_simple_agent"
    assert cfg.servers["math_environment_server"].server_type == "resources_servers"


def test_a_declared_entry_is_kept_and_no_second_one_added(tmp_path):
    text = TWO_AGENTS + """
my_relay:
  environment_servers:
    legacy_agent:
      entrypoint: app.py
      agent_server: {type: responses_api_agents, name: solver}
      default_episode_timeout_seconds: 21600
"""
    cfg = load_config(write(tmp_path, text))
    assert {n: s.agent for n, s in cfg.environment_servers.items()} == {
        "my_relay": "solver", "math_environment_server": "math_simple_agent"}
    assert "solver_environment_server" not in cfg.data


def test_problems_are_all_reported_with_the_fix(tmp_path):
    text = TWO_AGENTS + """
typed_env:
  environment_servers:
    single_agent_turn:
      agent_server: {type: responses_api_agents, name: solver}
bad_ref:
  environment_servers:
    legacy_agent:
      agent_server: {type: responses_api_agents, name: solvr}
      max_turns: 3
twin_a:
  environment_servers:
    legacy_agent:
      agent_server: {name: math_simple_agent}
twin_b:
  environment_servers:
    legacy_agent:
      agent_server: {type: responses_api_agents, name: math_simple_agent}
"""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    text = "\n".join(err.value.problems)
    assert "typed_env.environment_servers.single_agent_turn: implementation 'single_agent_turn' is not one" in text
    assert "bad_ref.environment_servers.legacy_agent.agent_server.name: 'solvr' is not a configured agent. " \
           "Did you mean 'solver'?" in text
    assert "bad_ref.environment_servers.legacy_agent.max_turns: unknown key" in text
    assert "environment servers ['twin_a', 'twin_b'] all front agent 'math_simple_agent'" in text
    assert len(err.value.problems) == 4


def test_routes_from_a_served_config():
    served = {
        "head_server": {"host": "127.0.0.1", "port": 11000},
        "a_agent": {"responses_api_agents": {"simple_agent": {"host": "127.0.0.1", "port": 5001}}},
        "b_agent": {"responses_api_agents": {"simple_agent": {"host": "0.0.0.0", "port": 5002}}},
        "a_environment_server": {"environment_servers": {"legacy_agent": {
            "agent_server": {"type": "responses_api_agents", "name": "a_agent"}, "host": "0.0.0.0", "port": 6001}}},
    }
    routes = agent_routes(served)
    assert routes["a_agent"].url == "http://127.0.0.1:6001"  # through its environment server
    assert (routes["a_agent"].environment_server, routes["a_agent"].environment_server_type) == (
        "a_environment_server", "legacy_agent")
    assert routes["b_agent"].url == "http://127.0.0.1:5002" and routes["b_agent"].environment_server is None
    served["b_environment_server"] = {"environment_servers": {"legacy_agent": {"agent_server": {"name": "b_agent"}}}}
    served["a_twin"] = {"environment_servers": {"single_agent_turn_legacy": {
        "agent_server": {"type": "responses_api_agents", "name": "a_agent"}, "port": 6002}}}
    with pytest.raises(ConfigError) as err:
        agent_routes(served)
    assert "agent 'a_agent' is fronted by several environment servers ['a_environment_server', 'a_twin']" in str(err.value)
    assert "b_environment_server.environment_servers.legacy_agent: no port in the served config" in str(err.value)
