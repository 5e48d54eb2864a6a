"""The environment-server hop on real servers (127.0.0.1): our head server describes it, our collector honours it,
our agents and resource servers answer /aggregate_metrics."""

from __future__ import annotations

import copy
from pathlib import Path

from gym_plugin.collect import CollectorConfig, RolloutCollector
from gym_plugin.config import load_config
from gym_plugin.http import Transport
from gym_plugin.launch import agent_routes, fetch_head_config, start_servers
from gym_plugin.servers.base import Server

ROOT = Path(__file__).resolve().parents[2]


class Relay(Server):
    """Stands in for NeMo Gym's legacy_agent relay: forwards /run and /aggregate_metrics to one agent, counting."""

    def __init__(self, agent_url: str):
        super().__init__("relay")
        self.agent_url = agent_url
        self.runs = 0
        self.transport = Transport(allow_local=False)

    def routes(self):
        return [("POST", "/run", self.run), ("POST", "/aggregate_metrics", self.aggregate)]

    async def run(self, body, ctx):
        self.runs += 1
        return (await self.transport.post(f"{self.agent_url}/run", body)).data

    async def aggregate(self, body, ctx):
        return (await self.transport.post(f"{self.agent_url}/aggregate_metrics", body)).data

    async def on_stop(self):
        await self.transport.close()


def rows(n: int) -> list[dict]:
    """Even rows expect '4' (what the fake answers): reward 1; odd rows expect '5': reward 0."""
    return [{"responses_create_params": {"input": f"q{i}"}, "expected_answer": "4" if i % 2 == 0 else "5",
             "agent_ref": {"name": "exact_match_agent"}} for i in range(n)]


async def test_head_config_fronts_each_agent_and_collector_posts_through_the_relay():
    cfg = load_config(ROOT / "conf/gym/exact_match.yaml",
                      ["policy_endpoint.impl=fake_openai", "policy_endpoint.default=4", "head_server.port=0"])
    running = await start_servers(cfg)
    relay = Relay(running.directory.url("exact_match_agent"))
    transport = Transport(allow_local=False)
    try:
        served = await fetch_head_config(running.head.url, transport)
        agent = served["exact_match_agent"]["responses_api_agents"]["simple_agent"]
        entry = served["exact_match_environment_server"]["environment_servers"]["legacy_agent"]
        # NeMo Gym 0.7.0's client looks this entry up and posts there: it is served at the agent's own address.
        assert entry == {"agent_server": {"type": "responses_api_agents", "name": "exact_match_agent"},
                         "host": agent["host"], "port": agent["port"]}
        route = agent_routes(served)["exact_match_agent"]
        assert (route.url, route.environment_server) == (running.directory.url("exact_match_agent"),
                                                        "exact_match_environment_server")

        # A deployment whose environment server is a separate relay: the collector goes through it.
        await relay.start()
        relayed = copy.deepcopy(served)
        relayed["exact_match_environment_server"]["environment_servers"]["legacy_agent"]["port"] = relay.port
        config = CollectorConfig(concurrency=8)
        async with RolloutCollector(agent_routes(relayed), config, Transport(allow_local=False)) as collector:
            records = [r async for r in collector.collect(rows(10))]
        assert relay.runs == 10
        assert sorted((r["_ng_task_index"], r["reward"]) for r in records) == [(i, float(i % 2 == 0)) for i in range(10)]
        for r in records:
            assert r["_ng_environment_server"] == "exact_match_environment_server"
            assert r["_ng_result_type"] == "legacy_agent" and r["agent_ref"] == {"name": "exact_match_agent"}

        # Without an environment server (a plain URL), rows go to the agent and records carry no stamp.
        async with RolloutCollector({"exact_match_agent": running.directory.url("exact_match_agent")}) as collector:
            direct = [r async for r in collector.collect(rows(2))]
        assert relay.runs == 10 and all("_ng_environment_server" not in r for r in direct)

        # After the rows, NeMo Gym posts /aggregate_metrics to the environment server (-> agent); the resource
        # server answers it too. Rewards 1, 0, 1, ...: mean .5.
        stripped = [{k: v for k, v in r.items() if k not in ("response", "responses_create_params")} for r in records]
        for url in (f"http://127.0.0.1:{relay.port}", running.directory.url("exact_match")):
            metrics = (await transport.post(f"{url}/aggregate_metrics", {"verify_responses": stripped})).data
            assert metrics["key_metrics"]["mean/reward"] == 0.5 and metrics["agent_metrics"]["num_repeats"] == 1
            assert len(metrics["group_level_metrics"]) == 10 and metrics["repeat_level_metrics"] == []
    finally:
        await transport.close()
        await relay.stop()
        await running.stop()
