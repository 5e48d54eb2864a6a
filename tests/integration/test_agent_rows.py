"""An agent's /run refuses the rows our collector refuses, with the same check (`gym_plugin.rows.check_row`):
HTTP 400, a JSON error body naming the problem, and no model call. Over real HTTP on 127.0.0.1, the policy being
the scripted fake served in process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gym_plugin.collect import CollectorConfig, RolloutCollector
from gym_plugin.config import load_config
from gym_plugin.errors import ProtocolError
from gym_plugin.http import HTTPStatusError, Transport
from gym_plugin.launch import start_servers
from gym_plugin.rows import validate_example
from gym_plugin.testing.scripted_tasks import add_row

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
AGENT = {"name": "exact_match_agent"}
BAD_ROWS = {
    "empty input list": {"responses_create_params": {"input": []}, "agent_ref": AGENT},
    "empty input string": {"responses_create_params": {"input": ""}, "agent_ref": AGENT},
    "no input": {"responses_create_params": {"temperature": 1.0}, "agent_ref": AGENT},
    "input not a list": {"responses_create_params": {"input": {"role": "user"}}, "agent_ref": AGENT},
    "no create params": {"agent_ref": AGENT, "question": "1 + 2?"},
    "not an object": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_agent_refuses_what_the_collector_refuses(kind):
    row = BAD_ROWS[kind]
    with pytest.raises(ProtocolError) as collector_refusal:
        validate_example(row, 0)
    # the collector's message after its "example row 0" prefix: the agent's message ends with the same text
    reason = str(collector_refusal.value).removeprefix("example row 0")

    async def body():
        cfg = load_config(ROOT / "conf/gym/exact_match.yaml", ["policy_endpoint.impl=fake_openai"])
        running = await start_servers(cfg, start_head=False)
        fake = running.servers[0]
        t = Transport(allow_local=False)
        try:
            with pytest.raises(HTTPStatusError) as refused:
                await t.post(f"{running.directory.url('exact_match_agent')}/run", row)
            # a good row still runs on the same servers
            ok = (await t.post(f"{running.directory.url('exact_match_agent')}/run", add_row(1, 2, "exact_match_agent"))).data
            # our collector files the bad row as invalid_row without posting it
            async with RolloutCollector(running.agent_urls(), CollectorConfig(invalid_rows="record")) as collector:
                records = [r async for r in collector.collect([row])]
        finally:
            await t.close()
            await running.stop()
        return refused.value, ok, records, fake.requests

    refused, ok, records, requests = asyncio.run(body())
    assert refused.status == 400
    error = json.loads(refused.body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == f"ProtocolError: exact_match_agent: the /run row{reason}"
    assert ok["reward"] == 0.0  # it ran: the fake answers "OK" to every prompt, the expected answer is 3
    assert requests["/v1/chat/completions"] == 1  # the good row's one model call: the bad row reached no model
    assert [r["failure"]["kind"] for r in records] == ["invalid_row"]
    assert records[0]["failure"]["reason"].endswith(reason)
