"""The head server's ``GET /server_instances`` (what NeMo Gym 0.7.0's ``ng_status`` reads): every server of a
``start_servers`` deployment, in NeMo Gym's ``ServerInstanceDisplayConfig`` shape, with its real address and a
status from its own /health. All on 127.0.0.1; the policy is the scripted fake, served in process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gym_plugin.config import load_config
from gym_plugin.http import Transport
from gym_plugin.launch import start_servers

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
# The fields of nemo_gym.server_utils.ServerInstanceDisplayConfig in NeMo Gym 0.7.0 (its model_dump keys).
NEMO_GYM_FIELDS = {"config_path", "dir_path", "entrypoint", "host", "name", "pid", "port", "process_name",
                   "server_type", "start_time", "status", "uptime_seconds", "url"}


def test_server_instances_lists_every_server_in_nemo_gyms_shape_with_live_status():
    async def body():
        cfg = load_config(ROOT / "conf/gym/math.yaml",
                          ["policy_endpoint.impl=fake_openai", "head_server.port=0"])
        running = await start_servers(cfg)
        t = Transport(allow_local=False)
        try:
            head = running.head.url
            listed = (await t.get(f"{head}/server_instances")).data
            by_name = {i["process_name"]: i for i in listed}
            # stop one server: its entry stays, with the status a dead socket gives
            math = next(s for s in running.servers if s.name == "math")
            await math.stop()
            after = {i["process_name"]: i["status"] for i in (await t.get(f"{head}/server_instances")).data}
        finally:
            await t.close()
            await running.stop()
        return running, listed, by_name, after

    running, listed, by_name, after = asyncio.run(body())
    # math.yaml: the math resource server, its agent, the default policy model server, the environment server entry
    # generated for the agent, and the local policy endpoint the override added: 5 entries.
    assert sorted(by_name) == ["math", "math_agent", "math_environment_server", "policy_endpoint", "policy_model"]
    for inst in listed:
        assert set(inst) == NEMO_GYM_FIELDS
        assert inst["pid"] == os.getpid() and inst["status"] == "success"
        assert inst["url"] == f"http://127.0.0.1:{inst['port']}" and inst["host"] == "127.0.0.1"
    urls = running.directory
    assert by_name["math"]["url"] == urls.url("math") and by_name["math_agent"]["url"] == urls.url("math_agent")
    assert (by_name["math"]["server_type"], by_name["math"]["name"]) == ("resources_servers", "math_verify")
    assert (by_name["math_agent"]["server_type"], by_name["math_agent"]["name"]) == ("responses_api_agents",
                                                                                   "simple_agent")
    # the relay entry is served by its agent: same address, same process
    env = by_name["math_environment_server"]
    assert (env["server_type"], env["name"], env["url"]) == ("environment_servers", "legacy_agent",
                                                            by_name["math_agent"]["url"])
    assert by_name["math_agent"]["entrypoint"] == "gym_plugin.servers.agent.AgentServer"
    assert after["math"] == "connection_error" and after["math_agent"] == "success"
