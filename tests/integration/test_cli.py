"""`gym-plugin collect` and `gym-plugin serve` as a user runs them (subprocesses, real servers on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gym_plugin.protocol import TASK_INDEX_KEY

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
CLI = [sys.executable, "-m", "gym_plugin.cli"]


def write_rows(path: Path, n: int, n_invalid: int = 0) -> None:
    """n rows for the exact-match agent: even rows expect '4' (what the fake answers), odd rows expect '5';
    then n_invalid rows without responses_create_params (each must come back as a failure record)."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"responses_create_params": {"input": f"What is {i} plus nothing?"},
                                "expected_answer": "4" if i % 2 == 0 else "5",
                                "agent_ref": {"name": "exact_match_agent"}}) + "\n")
        for _ in range(n_invalid):
            f.write(json.dumps({"agent_ref": {"name": "exact_match_agent"}, "expected_answer": "4"}) + "\n")


def test_collect_2000_rows_against_the_fake_endpoint(tmp_path):
    rows, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_rows(rows, 1990, n_invalid=10)
    proc = subprocess.run(
        [*CLI, "collect", "--config", str(ROOT / "conf/gym/exact_match.yaml"), "--input", str(rows),
         "--output", str(out), "--quiet", "policy_endpoint.impl=fake_openai", "policy_endpoint.default=4"],
        env=ENV, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2000
    assert sorted(r[TASK_INDEX_KEY] for r in records) == list(range(2000))  # each row exactly once
    ok = [r for r in records if r.get("failure") is None]
    failed = [r for r in records if r.get("failure") is not None]
    assert len(ok) == 1990 and len(failed) == 10
    assert all(r["failure"]["kind"] == "invalid_row" and r["reward"] is None for r in failed)
    # 995 even rows expect '4' (reward 1), 995 odd rows expect '5' (reward 0): mean 0.5 over the 1990 rollouts.
    assert sum(r["reward"] for r in ok) == 995
    assert all(r["response"]["output"][-1]["generation_token_ids"] for r in ok)
    summary = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"collected 2000 records \(1990 rollouts, 10 failures: invalid_row=10\) in [\d.]+s: ([\d.]+) "
                  r"rollouts/s, reward mean 0.500", summary)
    assert m and float(m.group(1)) > 0, summary


def test_collect_errors_are_one_line_with_the_fix(tmp_path):
    rows = tmp_path / "rows.jsonl"
    write_rows(rows, 2)
    # An endpoint nobody serves: one clear error naming the URL, exit status 2, no traceback.
    proc = subprocess.run(
        [*CLI, "collect", "--config", str(ROOT / "conf/gym/exact_match.yaml"), "--input", str(rows),
         "--output", str(tmp_path / "out.jsonl"), "policy_base_url=http://127.0.0.1:9/v1"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "EndpointUnreachableError" in proc.stderr and "http://127.0.0.1:9/v1" in proc.stderr
    # A bad override: ConfigError naming the key.
    proc = subprocess.run(
        [*CLI, "collect", "--config", str(ROOT / "conf/gym/exact_match.yaml"), "--input", str(rows),
         "--output", str(tmp_path / "out.jsonl"), "policy_endpoint.impl=fake_openai",
         "exact_match_agent.responses_api_agents.simple_agent.max_turnz=2"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "ConfigError" in proc.stderr and "max_turnz" in proc.stderr
    assert "max_turns" in proc.stderr  # did-you-mean


def test_serve_process_per_server_then_collect_over_http(tmp_path):
    """`serve --process-per-server`: every server in its own process, found through the head server; with
    auth_token set, every hop (collector -> head/agent, agent -> resource/policy servers) carries the token."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen(
        [*CLI, "serve", "--config", str(ROOT / "conf/gym/exact_match.yaml"), "--process-per-server",
         "policy_endpoint.impl=fake_openai", "policy_endpoint.default=4", f"head_server.port={port}",
         "+auth_token=s3cret"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        seen_head = False  # each child prints its server + "ready"; the head starts last, after every /health
        while True:
            line = serve.stdout.readline()
            assert line or serve.poll() is None, "serve exited early"
            seen_head = seen_head or "head_server" in line
            if seen_head and line.strip() == "ready":
                break
            assert time.monotonic() < deadline, "serve did not become ready"
        head = f"http://127.0.0.1:{port}/global_config_dict_yaml"
        with pytest.raises(urllib.error.HTTPError) as err:  # no token: 401
            urllib.request.urlopen(head, timeout=5)
        assert err.value.code == 401
        req = urllib.request.Request(head, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert b"exact_match_agent" in r.read()
        rows, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
        write_rows(rows, 20)
        proc = subprocess.run(
            [*CLI, "collect", "--head-url", f"http://127.0.0.1:{port}", "--input", str(rows), "--output", str(out),
             "--quiet"],
            env=ENV, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2 and "401" in proc.stderr  # the head server refuses a collector without it
        proc = subprocess.run(
            [*CLI, "collect", "--head-url", f"http://127.0.0.1:{port}", "--input", str(rows), "--output", str(out),
             "--quiet", "--auth-token", "s3cret"],
            env=ENV, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == 20 and sum(r["reward"] for r in records) == 10  # 10 even rows expect '4'
        # The head server fronts the agent with an environment server entry (at the agent's port) in this launch too.
        assert {r["_ng_environment_server"] for r in records} == {"exact_match_environment_server"}
        # The launcher dies without any cleanup (SIGKILL): its server processes must not outlive it.
        import psutil

        children = psutil.Process(serve.pid).children()
        assert len(children) == 4  # policy endpoint, exact_match, policy_model, exact_match_agent
        serve.kill()
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"server processes outlived their launcher: {alive}"
    finally:
        serve.terminate()
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()


def test_a_line_that_is_not_json_is_one_invalid_row_record(tmp_path):
    rows, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_rows(rows, 4)
    lines = rows.read_text().splitlines()
    rows.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")  # 5 rows, the 3rd is broken
    proc = subprocess.run(
        [*CLI, "collect", "--config", str(ROOT / "conf/gym/exact_match.yaml"), "--input", str(rows),
         "--output", str(out), "--quiet", "policy_endpoint.impl=fake_openai", "policy_endpoint.default=4"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r[TASK_INDEX_KEY]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == [0, 1, 2, 3, 4]
    bad = records[2]
    assert bad["reward"] is None and bad["failure"]["kind"] == "invalid_row"
    assert "rows.jsonl:3: not valid JSON" in bad["invalid_row"]
    # rows 0, 1 (file lines 1, 2) and 3, 4 (lines 4, 5 = written rows 2, 3): even written rows expect '4'
    assert [records[i]["reward"] for i in (0, 1, 3, 4)] == [1.0, 0.0, 1.0, 0.0]
    assert "1 failures: invalid_row=1" in proc.stdout
