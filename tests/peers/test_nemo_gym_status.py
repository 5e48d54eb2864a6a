"""NeMo Gym 0.7.0's ``ng_status`` against ``gym-plugin serve`` (one process, and one process per server): it finds
our head server's /server_instances and lists every server we run as healthy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.peers.nemo_gym_peer import NG_ENV, ROOT, VENV, served_config
from tests.peers.nemo_gym_peer import fake_endpoint, gym_plugin_deployment, nemo_gym_venv  # noqa: F401 (fixtures)
from gym_plugin.testing import nemo_gym_peer as peer

pytestmark = [pytest.mark.nemo_gym, pytest.mark.timeout(300)]

# exact_match, math and calculator: a resource server and an agent each, the environment server entry generated
# for each agent, and the one policy model server (policy_model): 3 + 3 + 3 + 1 = 10 servers.
EXPECTED = {"exact_match", "exact_match_agent", "exact_match_environment_server", "math", "math_agent",
            "math_environment_server", "calculator", "calculator_agent", "calculator_environment_server",
            "policy_model"}


def ng_status(head_port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV / "bin" / "ng_status"), "+head_server.host=127.0.0.1",
                           f"+head_server.port={head_port}", *args],
                          env=NG_ENV, capture_output=True, text=True, timeout=120)


def served_ports(head_port: int) -> dict[str, int]:
    """Instance name -> port, from the config the head server serves."""
    return {name: params["port"] for name, section in served_config(head_port).items()
            if isinstance(section, dict) and name != "head_server"
            for impls in section.values() for params in impls.values()}


def check_listing(head_port: int) -> list[dict]:
    """ng_status's table says 10 of 10 healthy; its JSON lists each server at the port the served config gives."""
    table = ng_status(head_port)
    assert table.returncode == 0, table.stdout[-3000:] + table.stderr[-3000:]
    assert "10 servers found (10 healthy, 0 unhealthy)" in table.stdout, table.stdout[-3000:]
    assert "No NeMo Gym servers found running" not in table.stdout
    listed = ng_status(head_port, "+json=true")
    assert listed.returncode == 0, listed.stderr[-3000:]
    servers = json.loads(listed.stdout.strip().splitlines()[-1])
    assert {s["process_name"] for s in servers} == EXPECTED
    ports = served_ports(head_port)
    for s in servers:
        assert s["status"] == "success" and s["port"] == ports[s["process_name"]], s
        assert s["url"] == f"http://127.0.0.1:{s['port']}"
    return servers


def test_ng_status_lists_our_servers_as_healthy(gym_plugin_deployment):
    servers = check_listing(gym_plugin_deployment)
    assert len({s["pid"] for s in servers}) == 1  # one process serves them all


def test_ng_status_against_serve_process_per_server(fake_endpoint, tmp_path):
    configs = [str(ROOT / f"conf/gym/{name}.yaml") for name in ("exact_match", "math", "calculator")]
    proc, port = peer.start_gym_plugin(tmp_path, fake_endpoint, configs, serve_args=("--process-per-server",))
    try:
        servers = {s["process_name"]: s for s in check_listing(port)}
    finally:
        peer.stop(proc, 20)
    # 7 processes (one per server); each environment server entry is served by its agent's process
    assert len({s["pid"] for s in servers.values()}) == 7
    for agent in ("exact_match", "math", "calculator"):
        assert servers[f"{agent}_environment_server"]["pid"] == servers[f"{agent}_agent"]["pid"]
