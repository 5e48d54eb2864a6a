"""NeMo Gym 0.7.0's command line against ``gym-plugin serve``: ``ng_status`` (one process, and one process per
server) finds our head server's /server_instances and lists every server we run as healthy; ``ng_collect_rollouts``
on a malformed row gets our agent's 400 and shows its body (in the failures sidecar)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gym_plugin.testing.scripted_tasks import add_row
from tests.peers.nemo_gym_peer import NG_ENV, ROOT, VENV, read_jsonl, served_config, write_jsonl
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


def test_ng_collect_rollouts_shows_our_agents_refusal_of_a_malformed_row(gym_plugin_deployment, tmp_path):
    rows = [add_row(1, 2, "exact_match_agent"), add_row(3, 4, "exact_match_agent"), add_row(5, 6, "math_agent")]
    rows[1]["responses_create_params"]["input"] = []  # our collector refuses it up front; the agent now does too
    path = write_jsonl(tmp_path / "rows.jsonl", rows)

    def collect(out: Path, *flags: str) -> subprocess.CompletedProcess:
        out.mkdir()
        return subprocess.run([str(VENV / "bin" / "ng_collect_rollouts"), f"+input_jsonl_fpath={path}",
                               f"+output_jsonl_fpath={out / 'rollouts.jsonl'}", "+head_server.host=127.0.0.1",
                               f"+head_server.port={gym_plugin_deployment}", *flags],
                              cwd=out, env=NG_ENV, capture_output=True, text=True, timeout=300)

    aborted = collect(tmp_path / "plain")  # NeMo Gym's default: a failed /run ends the run
    assert aborted.returncode != 0 and "/run failed status=400" in aborted.stdout, aborted.stdout[-2000:]
    assert "ClientResponseError: 400" in aborted.stderr
    routed = collect(tmp_path / "sidecar", "+route_failures_to_sidecar=true")
    assert routed.returncode == 0, routed.stdout[-3000:] + routed.stderr[-3000:]
    assert sorted(r["_ng_task_index"] for r in read_jsonl(tmp_path / "sidecar" / "rollouts.jsonl")) == [0, 2]
    (failure,) = read_jsonl(tmp_path / "sidecar" / "rollouts_failures.jsonl")
    assert (failure["_ng_task_index"], failure["_ng_failure_http_status"]) == (1, 400)
    assert json.loads(failure["_ng_failure_response_body"])["error"]["message"] == (
        "ProtocolError: exact_match_agent: the /run row: responses_create_params.input must be a non-empty string or "
        "list of items, got []; give the prompt, e.g. [{\"role\": \"user\", \"content\": \"...\"}]")
