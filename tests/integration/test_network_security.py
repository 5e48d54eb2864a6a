"""Servers reachable from the network need auth_token: binding an address other than loopback without one is
refused (one error block, exit 2, before anything binds) unless ``allow_unauthenticated_network`` is set (then a
warning at every start); with the token, a request from this machine's own non-loopback address gets 401 and no
config. Only this machine's own addresses are ever bound or called."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gym_plugin import GymIntegration
from gym_plugin.config import load_config
from gym_plugin.errors import ConfigError
from gym_plugin.http import HTTPStatusError, Transport, bearer_headers
from gym_plugin.launch import start_servers
from gym_plugin.net import free_port, is_loopback
from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.testing.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MATH = ROOT / "conf/gym/math.yaml"
SECRET_KEY = "sk-live-0123456789abcdef"
TOKEN = "tok-7f3a9c"


def own_address() -> str | None:
    """This machine's own non-loopback IPv4 address (the interface a route out would use; a UDP connect sends
    nothing), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if is_loopback(addr) or addr == "0.0.0.0" else addr


def needs_own_address() -> str:
    addr = own_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address to test network access from")
    return addr


def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "192.0.2.7", "10.1.2.3"))


# ---- refused: one block, exit 2, nothing bound ----------------------------------------------------------------
def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gym_plugin.cli", *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, names", [
    (["serve", "--config", str(MATH), "head_server.host=0.0.0.0"], ["the head server (head_server.host)"]),
    (["serve", "--process-per-server", "--config", str(MATH), "head_server.host=0.0.0.0",
      "math.resources_servers.math_verify.host=0.0.0.0"],
     ["server 'math' (math.resources_servers.math_verify.host)", "the head server (head_server.host)"]),
    (["embedded", "--model", "tiny", "--host", "0.0.0.0", "--port", "0"], ["gym-plugin embedded"]),
], ids=["serve", "process-per-server", "embedded"])
def test_network_bind_without_auth_token_exits_2_with_one_block(argv, names):
    head_port = free_port()
    argv = [*argv, "policy_base_url=http://127.0.0.1:9/v1", f"head_server.port={head_port}"] \
        if argv[0] == "serve" else argv
    proc = _run(*argv)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert err.startswith("error: ConfigError: 1 problem(s)") and err.count("error:") == 1, err
    assert "Traceback" not in err and proc.stdout == ""
    for name in names:
        assert f"{name} on '0.0.0.0'" in err
    fixes = ("--auth-token", "--allow-unauthenticated-network") if argv[0] == "embedded" else (
        "set auth_token in the config", "allow_unauthenticated_network: true in the config")
    assert all(f in err for f in fixes), err
    if argv[0] == "serve":  # refused before binding: the head port is still free
        with socket.socket() as s:
            s.bind(("127.0.0.1", head_port))


def test_gym_integration_and_server_start_refuse_network_binds_without_auth_token():
    with pytest.raises(ConfigError, match=r"the head server \(head_server.host\) on '0.0.0.0'"):
        GymIntegration("m", ["http://127.0.0.1:9/v1"], MATH, head_server_host="0.0.0.0", head_server_port=0,
                       check_endpoints=False)

    async def direct():
        server = FakeOpenAIServer(host="0.0.0.0", port=0)
        with pytest.raises(ConfigError, match="server 'fake_openai' on '0.0.0.0'.*allow_unauthenticated_network"):
            await server.start()
        assert server._runner is None  # noqa: SLF001 (nothing bound)

    asyncio.run(direct())


def test_allow_unauthenticated_network_starts_and_warns_at_every_start(caplog):
    addr = needs_own_address()

    async def body():
        cfg = load_config(MATH, ["policy_endpoint.impl=fake_openai", f"head_server.host={addr}", "head_server.port=0",
                                 "allow_unauthenticated_network=true"])
        for _ in range(2):
            running = await start_servers(cfg)
            try:
                t = Transport(allow_local=False)
                reply = await t.get(f"{running.head.url}/global_config_dict_yaml")
                await t.close()
            finally:
                await running.stop()
            assert running.head.url == f"http://{addr}:{running.head.port}" and "math_verify" in reply.data

    with caplog.at_level(logging.WARNING, logger="gym_plugin.servers.base"):
        asyncio.run(body())
    warnings = [r.getMessage() for r in caplog.records if "without auth_token" in r.getMessage()]
    assert warnings == [f"server 'head_server' listens on {addr!r} without auth_token (allow_unauthenticated_network "
                        "is set): anyone who reaches that address can call every route and read the served config, "
                        "secrets included."] * 2  # one per start, the one exposed server


# ---- with auth_token: 401 and no config from the network ---------------------------------------------------------
def test_with_auth_token_every_route_but_health_needs_it_from_the_network():
    addr = needs_own_address()

    async def body():
        cfg = load_config(MATH, [
            "policy_endpoint.impl=fake_openai", f"policy_api_key={SECRET_KEY}", f"auth_token={TOKEN}",
            f"head_server.host={addr}", "head_server.port=0", f"math.resources_servers.math_verify.host={addr}",
            f"math_agent.responses_api_agents.simple_agent.host={addr}",
            f"policy_model.responses_api_models.vllm_model.host={addr}"])
        running = await start_servers(cfg)
        anon = Transport(allow_local=False)
        wrong = Transport(allow_local=False, headers=bearer_headers("not-the-token"))
        authed = Transport(allow_local=False, headers=bearer_headers(TOKEN))
        head, agent, math = running.head.url, running.directory.url("math_agent"), running.directory.url("math")
        calls = [("GET", f"{head}/global_config_dict_yaml", None), ("GET", f"{head}/server_instances", None),
                 ("POST", f"{agent}/run", {**calculator_row(2, 3, 4), "agent_ref": {"name": "math_agent"}}),
                 ("POST", f"{math}/verify", {}), ("POST", f"{running.directory.url('policy_model')}/v1/responses",
                                                  {"input": "hi"})]
        try:
            refused = {}
            for method, url, payload in calls:
                assert url.startswith(f"http://{addr}:")
                for client in (anon, wrong):
                    with pytest.raises(HTTPStatusError) as exc:
                        await client.request(method, url, payload)
                    refused[(url, client is anon)] = (exc.value.status, exc.value.body)
            health = [(await anon.get(f"{u}/health")).status for u in (head, agent, math)]
            served = (await authed.get(f"{head}/global_config_dict_yaml")).data
        finally:
            for t in (anon, wrong, authed):
                await t.close()
            await running.stop()
        return refused, health, served

    refused, health, served = asyncio.run(body())
    assert len(refused) == 10 and {status for status, _ in refused.values()} == {401}
    for _status, text in refused.values():  # the 401 body is the error, nothing of the config
        assert json.loads(text)["error"]["type"] == "authentication_error"
        assert SECRET_KEY not in text and "math_verify" not in text and "port" not in text
    assert health == [200, 200, 200]  # liveness probes stay open
    assert SECRET_KEY in served and "math_verify" in served  # the token holder gets the config
