"""The collector against a real agent server on 127.0.0.1 whose behaviour each row scripts.

Every test runs twice: over HTTP (allow_local=False) and with direct in-process calls, which must agree.
"""

from __future__ import annotations

import asyncio

import pytest

from gym_plugin.collect import CollectorConfig, RolloutCollector
from gym_plugin.errors import ProtocolError, UnknownAgentError
from gym_plugin.http import Transport
from gym_plugin.servers.base import HandlerError, Server


class ScriptedAgent(Server):
    """/run answers as the row's ``script`` says: ok | fail_n:<k> (503 k times per row, then ok) | sleep:<s> |
    no_reward | boom (500 always)."""

    server_type = "responses_api_agents"

    def __init__(self, name: str = "agent"):
        super().__init__(name)
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: dict[int, int] = {}

    def routes(self):
        return [("POST", "/run", self.run)]

    async def run(self, body, ctx):
        idx = body["_ng_task_index"]
        self.calls[idx] = self.calls.get(idx, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            script = body.get("script", "ok")
            await asyncio.sleep(0.002)
            if script.startswith("fail_n:") and self.calls[idx] <= int(script.split(":")[1]):
                raise HandlerError(503, "overloaded")
            if script.startswith("sleep:"):
                await asyncio.sleep(float(script.split(":")[1]))
            if script == "no_reward":
                return {**body, "response": {"output": []}}
            if script == "boom":
                raise HandlerError(500, "agent crashed")
            return {**body, "response": {"output": [], "id": f"resp_{idx}"}, "reward": float(body["x"] % 2)}
        finally:
            self.in_flight -= 1


def row(i: int, script: str = "ok", agent: str = "agent") -> dict:
    return {"responses_create_params": {"input": f"q{i}"}, "agent_ref": {"name": agent}, "x": i, "script": script}


@pytest.fixture(params=[False, True], ids=["http", "direct"])
def local(request):
    return request.param


async def _collect(agent: Server, rows, local: bool, **cfg) -> list[dict]:
    config = CollectorConfig(backoff_s=0.01, **cfg)
    transport = Transport(allow_local=local, timeout_s=config.timeout_s)
    async with RolloutCollector({"agent": agent.url}, config, transport) as collector:
        return [r async for r in collector.collect(rows)]


async def test_every_row_once_with_index_and_reward(local):
    agent = ScriptedAgent()
    await agent.start()
    try:
        records = await _collect(agent, [row(i) for i in range(40)], local, concurrency=8)
    finally:
        await agent.stop()
    assert sorted(r["_ng_task_index"] for r in records) == list(range(40))
    by_idx = {r["_ng_task_index"]: r for r in records}
    # reward = x % 2 for row x: rows 0..39 -> 20 ones
    assert sum(r["reward"] for r in records) == 20.0
    assert by_idx[7]["reward"] == 1.0 and by_idx[8]["reward"] == 0.0
    assert agent.max_in_flight <= 8


async def test_concurrency_is_bounded_for_a_lazy_iterable(local):
    agent = ScriptedAgent()
    await agent.start()
    pulled = {"n": 0}

    def rows():
        for i in range(30):
            pulled["n"] += 1
            yield row(i, "sleep:0.01")

    try:
        config = CollectorConfig(concurrency=3, backoff_s=0.01)
        async with RolloutCollector({"agent": agent.url}, config, Transport(allow_local=local)) as collector:
            seen = 0
            async for _ in collector.collect(rows()):
                seen += 1
                # rows are pulled lazily: never more than done + in flight (3) + the queue (3) + 1 being pulled
                assert pulled["n"] <= seen + 3 + 3 + 1
    finally:
        await agent.stop()
    assert seen == 30 and agent.max_in_flight <= 3


async def test_5xx_burst_is_retried_through(local):
    agent = ScriptedAgent()
    await agent.start()
    try:
        records = await _collect(agent, [row(i, "fail_n:2") for i in range(5)], local, max_attempts=3)
    finally:
        await agent.stop()
    assert all(r.get("failure") is None for r in records)
    assert all(agent.calls[i] == 3 for i in range(5))  # 2 x 503, then 200


async def test_retries_exhausted_gives_failure_record(local):
    agent = ScriptedAgent()
    await agent.start()
    try:
        records = await _collect(agent, [row(0, "boom"), row(1)], local, max_attempts=2)
    finally:
        await agent.stop()
    fail = next(r for r in records if r["_ng_task_index"] == 0)
    assert fail["reward"] is None
    assert fail["failure"]["kind"] == "http_status"
    assert fail["failure"]["attempts"] == 2
    assert "agent crashed" in fail["failure"]["last_error"]
    assert fail["failure"]["url"] == agent.url + "/run"
    assert fail["x"] == 0  # the row's keys travel with the failure record
    assert next(r for r in records if r["_ng_task_index"] == 1)["reward"] == 1.0


async def test_timeout_gives_failure_record(local):
    agent = ScriptedAgent()
    await agent.start()
    try:
        records = await _collect(agent, [row(0, "sleep:5"), row(1)], local, timeout_s=0.3, max_attempts=1)
    finally:
        await agent.stop()
    fail = next(r for r in records if r["_ng_task_index"] == 0)
    assert fail["failure"]["kind"] == "timeout" and fail["failure"]["attempts"] == 1
    assert fail["reward"] is None


async def test_malformed_reply_is_a_failure_not_a_reward(local):
    agent = ScriptedAgent()
    await agent.start()
    try:
        records = await _collect(agent, [row(0, "no_reward")], local)
    finally:
        await agent.stop()
    assert records[0]["failure"]["kind"] == "malformed_response"
    assert records[0]["reward"] is None


async def test_unreachable_agent_names_the_url():
    agent = ScriptedAgent()
    await agent.start()
    url = agent.url
    await agent.stop()  # nothing listens there now
    config = CollectorConfig(max_attempts=2, backoff_s=0.01)
    async with RolloutCollector({"agent": url}, config) as collector:
        records = [r async for r in collector.collect([row(0)])]
    assert records[0]["failure"]["kind"] == "connection"
    assert records[0]["failure"]["attempts"] == 2
    assert url in records[0]["failure"]["last_error"]


async def test_unknown_agent_lists_configured_agents():
    collector = RolloutCollector({"math_agent": "http://127.0.0.1:1", "tool_agent": "http://127.0.0.1:2"})
    with pytest.raises(UnknownAgentError) as err:
        [r async for r in collector.collect([row(0, agent="math_agnet")])]
    msg = str(err.value)
    assert "'math_agnet'" in msg and "['math_agent', 'tool_agent']" in msg and "Did you mean 'math_agent'?" in msg
    assert isinstance(err.value, KeyError)  # as the seed's troubleshooting section expects
    await collector.close()


async def test_malformed_row_raises_or_records():
    bad = {"agent_ref": {"name": "agent"}, "responses_create_params": {"input": []}}
    collector = RolloutCollector({"agent": "http://127.0.0.1:1"})
    with pytest.raises(ProtocolError, match="example row 1: responses_create_params.input"):
        [r async for r in collector.collect([row(0), bad])]
    await collector.close()
    agent = ScriptedAgent()
    await agent.start()
    try:
        records = await _collect(agent, [row(0), bad], True, invalid_rows="record")
    finally:
        await agent.stop()
    kinds = sorted((r["_ng_task_index"], (r.get("failure") or {}).get("kind")) for r in records)
    assert kinds == [(0, None), (1, "invalid_row")]


async def test_error_in_the_input_reaches_the_caller():
    agent = ScriptedAgent()
    await agent.start()

    def rows():
        yield row(0)
        raise RuntimeError("input file broke")

    try:
        async with RolloutCollector({"agent": agent.url}) as collector:
            with pytest.raises(RuntimeError, match="input file broke"):
                [r async for r in collector.collect(rows())]
    finally:
        await agent.stop()


async def test_repeats_and_skip():
    agent = ScriptedAgent()
    await agent.start()
    try:
        async with RolloutCollector({"agent": agent.url}) as collector:
            recs = [r async for r in collector.collect([row(0), row(1)], repeats=3, skip=lambda i, r: (i, r) == (1, 2))]
    finally:
        await agent.stop()
    units = sorted((r["_ng_task_index"], r["_ng_rollout_index"]) for r in recs)
    assert units == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_failure_kind_marks_only_real_verifier_errors():
    from gym_plugin.collect import _failure_kind
    from gym_plugin.http import HTTPStatusError

    def err(body: str) -> HTTPStatusError:
        return HTTPStatusError("POST x answered HTTP 502", "http://a/run", 502, body)

    # What the agent sends when /verify failed: the VerifierError: prefix and the verifier_error type.
    assert _failure_kind(err('{"error": {"message": "VerifierError: resource server ...", "type": "verifier_error"}}')) == "verifier"
    # An agent whose *name* contains "verif" failing for another reason is an HTTP failure, not a verifier one.
    assert _failure_kind(err('{"error": {"message": "agent \'verifier_agent\': policy model server failed", '
                             '"type": "upstream_error"}}')) == "http_status"
