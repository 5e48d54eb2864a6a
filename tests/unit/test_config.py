"""Config compose / resolve / validate: the seed's keys, env interpolation, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from gym_plugin.config import DEFAULT_POLICY_INSTANCE, load_config
from gym_plugin.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

ENV_YAML = """
policy_model_name: "${POLICY_MODEL_NAME}"
policy_base_url: "${oc.env:POLICY_BASE_URL}"
policy_api_key: dummy_key
global_aiohttp_connector_limit_per_host: 16384
global_aiohttp_connector_limit: 65536
head_server: {host: 127.0.0.1, port: 0}
math:
  resources_servers:
    math_verify: {}
math_agent:
  responses_api_agents:
    simple_agent:
      resources_server: {type: resources_servers, name: math}
      model_server: {type: responses_api_models, name: policy_model}
      max_turns: 3
"""


def write(tmp_path: Path, text: str, name: str = "env.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_seed_and_oc_env_interpolation_and_default_policy_server(tmp_path, monkeypatch):
    monkeypatch.setenv("POLICY_MODEL_NAME", "qwen3-4b")
    monkeypatch.setenv("POLICY_BASE_URL", "http://10.0.0.1:8000/v1")
    cfg = load_config(write(tmp_path, ENV_YAML))
    assert cfg.data["policy_model_name"] == "qwen3-4b"  # the seed's ${VAR} reads the environment
    assert cfg.base_urls == ["http://10.0.0.1:8000/v1"]
    assert cfg.agents == ["math_agent"]
    # No policy model server configured: the standard one is added, pointed at policy_base_url.
    policy = cfg.servers[DEFAULT_POLICY_INSTANCE]
    assert (policy.server_type, policy.impl) == ("responses_api_models", "vllm_model")
    assert policy.params == {"base_url": "http://10.0.0.1:8000/v1", "api_key": "dummy_key", "model": "qwen3-4b"}
    assert cfg.servers["math_agent"].params["max_turns"] == 3


def test_initial_dict_and_overrides_win_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("POLICY_MODEL_NAME", "from-env")
    monkeypatch.setenv("POLICY_BASE_URL", "http://10.0.0.1:8000/v1")
    initial = {"policy_model_name": "from-init", "policy_base_url": ["http://a:1/v1", "http://b:2/v1"]}
    cfg = load_config(write(tmp_path, ENV_YAML), ["math_agent.responses_api_agents.simple_agent.max_turns=7",
                                                  "policy_model.responses_api_models.vllm_model.routing=least_busy"],
                      initial)
    assert cfg.data["policy_model_name"] == "from-init"
    assert cfg.base_urls == ["http://a:1/v1", "http://b:2/v1"]  # a list of base URLs
    assert cfg.servers["math_agent"].params["max_turns"] == 7
    policy = cfg.servers[DEFAULT_POLICY_INSTANCE].params  # the override merged over the default server
    assert policy["routing"] == "least_busy" and policy["base_url"] == ["http://a:1/v1", "http://b:2/v1"]


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("POLICY_BASE_URL", raising=False)
    monkeypatch.setenv("POLICY_MODEL_NAME", "m")
    text = ENV_YAML.replace("max_turns: 3", "max_turnz: 3").replace("name: math}", "name: maths}")
    text += "global_aiohttp_connector_limit_per_hots: 5\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), ["head_server.port=70000"])
    problems = err.value.problems
    text = "\n".join(problems)
    # 1. the unset env var names the variable and the override that fixes it
    assert "policy_base_url" in text and "Set the environment variable POLICY_BASE_URL" in text
    # 2. a misspelt parameter, with did-you-mean
    assert "math_agent.responses_api_agents.simple_agent.max_turnz" in text and "'max_turns'" in text
    # 3. a reference to a server that does not exist
    assert "'maths' is not a configured server" in text and "Did you mean 'math'" in text
    # 4. a misspelt global key
    assert "global_aiohttp_connector_limit_per_hots" in text
    # 5. a port out of range names key and value
    assert "head_server.port: 70000" in text
    assert len(problems) == 5, problems


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    bad = write(tmp_path, "math: {resources_servers: [unclosed\n", "bad.yaml")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_implementation_lists_known_ones(tmp_path):
    text = "policy_base_url: http://h:1/v1\nx:\n  resources_servers:\n    exact_macth: {}\n"
    with pytest.raises(ConfigError, match="exact_macth.*Did you mean 'exact_match'"):
        load_config(write(tmp_path, text))


def test_policy_endpoint_gets_a_fixed_port_and_becomes_the_base_url():
    cfg = load_config(ROOT / "conf/gym/exact_match.yaml", ["policy_endpoint.impl=fake_openai"])
    port = cfg.data["policy_endpoint"]["port"]
    assert isinstance(port, int) and port > 0
    assert cfg.base_urls == [f"http://127.0.0.1:{port}/v1"]
    with pytest.raises(ConfigError, match="policy_endpoint.impl.*embedded"):
        load_config(ROOT / "conf/gym/exact_match.yaml", ["policy_endpoint.impl=vllm"])


def test_policy_endpoint_options_are_checked_with_did_you_mean():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "conf/gym/exact_match.yaml", ["policy_endpoint.impl=embedded", "policy_endpoint.modle=tiny"])
    assert "policy_endpoint.modle" in str(err.value) and "Did you mean 'model'" in str(err.value)
    with pytest.raises(ConfigError, match="policy_endpoint.defualt.*Did you mean 'default'"):
        load_config(ROOT / "conf/gym/exact_match.yaml", ["policy_endpoint.impl=fake_openai", "policy_endpoint.defualt=4"])


def test_inline_mappings_merge_with_files_in_order(tmp_path, monkeypatch):
    # A trainer's own config section (the recipe's env.gym, NeMo-RL's initial_global_config_dict) goes in as a
    # mapping, merged after the files before it, with the same interpolation and validation as a file.
    monkeypatch.setenv("POLICY_MODEL_NAME", "m")
    monkeypatch.setenv("POLICY_BASE_URL", "http://127.0.0.1:8000/v1")
    inline = {"math_agent": {"responses_api_agents": {"simple_agent": {"max_turns": 5}}},
              "extra": {"resources_servers": {"exact_match": {}}}, "policy_api_key": "${policy_model_name}-key"}
    cfg = load_config([write(tmp_path, ENV_YAML), inline])
    assert cfg.servers["math_agent"].params["max_turns"] == 5  # the mapping wins over the file before it
    assert cfg.servers["extra"].impl == "exact_match" and cfg.data["policy_api_key"] == "m-key"
    with pytest.raises(ConfigError, match=r"max_turnz: unknown parameter"):
        load_config([write(tmp_path, ENV_YAML), {"math_agent": {"responses_api_agents": {"simple_agent": {
            "max_turnz": 5}}}}])
