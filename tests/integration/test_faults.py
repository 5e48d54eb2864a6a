"""The fault suite: nothing is lost, nothing hangs, no reward is invented (docs/failure-semantics.md).

Every case runs the real path on 127.0.0.1: collector -> agent -> resource server (/seed_session, /verify) ->
policy model server -> OpenAI-compatible backend (the scripted `FakeOpenAIServer`). Faults are injected where
they happen in production, by a small reverse proxy (`FaultProxy`) in front of the backend (what vLLM's network
looks like to the policy model server) and in front of the agent (what the collector sees):

- ``5xx``: HTTP 503 with a JSON error body;
- ``reset``: the socket is aborted with a TCP RST, no reply;
- ``close``: the socket is closed (FIN) without a reply;
- ``slow``: the reply comes ``slow_s`` seconds late, past the caller's timeout;
- ``garbage``: HTTP 200 with a body that is not JSON (a truncated reply);

plus a verifier that raises, a verifier that cannot judge (row without ``expected_answer``), and the backend
process killed with SIGKILL and restarted on the same port mid-run.

For every case: rows in == results + failure records, every input index exactly once; a failure record has
``reward: None`` and a ``failure`` with kind, reason, attempts and last error; a verifier error is a failure,
never reward 0; and every collection runs under a timeout, so a hang fails the test instead of stalling CI.

`FaultProxy`, `FaultyExactMatch`, `start_stack` and `BackendProcess` are also used by ``bench/faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web

from gym_plugin.collect import CollectorConfig, RolloutCollector
from gym_plugin.servers.base import Directory
from gym_plugin.http import HTTPStatusError, Transport
from gym_plugin.net import free_port
from gym_plugin.protocol import is_failure
from gym_plugin.servers.agent import AgentConfig, AgentServer
from gym_plugin.servers.base import Server
from gym_plugin.servers.policy.config import PolicyModelConfig
from gym_plugin.servers.policy.server import PolicyModelServer
from gym_plugin.servers.resources.exact_match import ExactMatchResourceServer
from gym_plugin.testing.fake_openai import Behaviour, FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)

FAULTS = ("5xx", "reset", "close", "slow", "garbage")


# ---- fault injection ------------------------------------------------------------------------------------------
class _AbortConnection(web.StreamResponse):
    """Returned by the proxy to end the connection without a reply: RST (``rst=True``) or FIN."""

    def __init__(self, rst: bool):
        super().__init__()
        self._rst = rst

    async def prepare(self, request):  # type: ignore[override]
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if self._rst and sock is not None:
                # SO_LINGER with timeout 0: close() sends RST instead of FIN ("connection reset by peer").
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort() if self._rst else transport.close()
        # aiohttp treats ConnectionResetError from prepare() as a client that went away: no reply, no log.
        raise ConnectionResetError("fault proxy dropped the connection on purpose")


Chooser = Callable[[int, bytes], "str | None"]
"""``choose(request_number, raw_body) -> fault name or None``; request numbers start at 1."""


class FaultProxy:
    """Reverse proxy on 127.0.0.1 that forwards requests to ``upstream`` and injects faults where `choose` says.

    An upstream that cannot be reached (killed) is passed on as a reset connection, the way a transparent
    network path would show it. ``faults`` counts the faults injected, per kind.
    """

    def __init__(self, upstream: str, choose: Chooser, *, slow_s: float = 2.0):
        self.upstream = upstream.rstrip("/")
        self.choose = choose
        self.slow_s = slow_s
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> "FaultProxy":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # shutdown_timeout: 'slow' handlers still sleeping must not hold stop() for aiohttp's default 60 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 (the bound port)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
        )
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests += 1
        fault = self.choose(self.requests, raw)
        if fault is not None:
            self.faults[fault] += 1
        if fault == "5xx":
            return web.json_response({"error": {"message": "injected 503", "type": "server_error"}}, status=503)
        if fault == "garbage":
            return web.Response(status=200, text='{"choices": [{"message": ', content_type="application/json")
        if fault in ("reset", "close"):
            return _AbortConnection(rst=fault == "reset")
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
        assert self._session is not None
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs, data=raw,
                                             headers=headers) as resp:
                body = await resp.read()
                return web.Response(status=resp.status, body=body,
                                    content_type=resp.content_type or "application/json")
        except (aiohttp.ClientError, OSError):
            return _AbortConnection(rst=True)


_MARK = re.compile(r"\[(agent|backend)=([0-9a-z]+):(\d+)\] row(\d+)\b")


def marker_chooser(side: str) -> Chooser:
    """Faults scripted by the row's prompt: ``[backend=5xx:2] row7`` makes the first 2 requests that carry row 7
    through the backend proxy answer 503, then the row passes. Deterministic whatever the interleaving."""
    seen: Counter[int] = Counter()

    def choose(_n: int, raw: bytes) -> str | None:
        m = _MARK.search(raw.decode("utf-8", "replace"))
        if m is None or m.group(1) != side:
            return None
        row_id = int(m.group(4))
        seen[row_id] += 1
        return m.group(2) if seen[row_id] <= int(m.group(3)) else None

    return choose


class FaultyExactMatch(ExactMatchResourceServer):
    """exact_match whose /verify raises on rows with ``"verifier": "raise"`` (a verifier bug)."""

    async def verify_row(self, row, response, state):
        if row.get("verifier") == "raise":
            raise RuntimeError(f"verifier crashed on purpose (row {row.get('row_id')})")
        return await super().verify_row(row, response, state)


@dataclass
class Stack:
    """Backend proxy -> policy model server, resource server, agent (-> agent proxy), on 127.0.0.1."""

    backend_proxy: FaultProxy | None
    policy: PolicyModelServer
    verifier: FaultyExactMatch
    agent: AgentServer
    agent_proxy: FaultProxy | None
    started: list = field(default_factory=list)

    @property
    def agent_url(self) -> str:
        """What the collector talks to: the agent proxy when there is one."""
        return self.agent_proxy.url if self.agent_proxy is not None else self.agent.url

    async def stop(self) -> None:
        for s in reversed(self.started):
            await s.stop()


async def start_stack(
    backend_url: str,
    *,
    backend_choose: Chooser | None = None,
    agent_choose: Chooser | None = None,
    slow_s: float = 2.0,
    agent_slow_s: float | None = None,
    policy_timeout_s: float = 0.5,
    policy_attempts: int = 2,
    policy_backoff_s: float = 0.01,
    direct: bool = False,
) -> Stack:
    """Start the stack in front of an OpenAI-compatible ``backend_url`` (ending in /v1).

    direct=False: every hop is HTTP over loopback (servers not registered for in-process calls);
    direct=True: agent, resource and policy servers call each other in process (faster; the injected hops,
    collector -> agent proxy and policy -> backend proxy, stay HTTP).
    backend_choose / agent_choose: put a FaultProxy in front of the backend / the agent (None: no proxy).
    slow_s / agent_slow_s: how late a 'slow' reply of the backend / agent proxy comes (agent: slow_s if None).
    """
    started: list = []
    backend_proxy = None
    if backend_choose is not None:
        backend_proxy = await FaultProxy(backend_url.removesuffix("/v1"), backend_choose, slow_s=slow_s).start()
        started.append(backend_proxy)
    try:
        d = Directory()
        policy = PolicyModelServer("policy", PolicyModelConfig(
            base_url=backend_proxy.url + "/v1" if backend_proxy is not None else backend_url,
            model="fake-model", timeout_s=policy_timeout_s,
            max_attempts=policy_attempts, backoff_s=policy_backoff_s,
            # the proxy counts every backend request: only the model calls (no mode / version questions)
            token_mode="chat", report_policy_version=False), d)
        verifier = FaultyExactMatch("verifier", FaultyExactMatch.Config(), d)
        agent = AgentServer("agent", AgentConfig(resources_server="verifier", model_server="policy", max_turns=1), d)
        for s in (policy, verifier, agent):
            await s.start(register_local=direct)
            started.append(s)
            d.set(s.name, s.url)
        agent_proxy = None
        if agent_choose is not None:
            agent_slow = slow_s if agent_slow_s is None else agent_slow_s
            agent_proxy = await FaultProxy(agent.url, agent_choose, slow_s=agent_slow).start()
            started.append(agent_proxy)
    except BaseException:
        for s in reversed(started):
            await s.stop()
        raise
    return Stack(backend_proxy, policy, verifier, agent, agent_proxy, started)


BACKEND_SCRIPT = """
import asyncio, sys
from gym_plugin.testing.fake_openai import Behaviour, FakeOpenAIServer

async def main(port, delay_s):
    server = FakeOpenAIServer(script=Behaviour(delay_s=delay_s) if delay_s else None, port=port)
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
"""


class BackendProcess:
    """The fake OpenAI-compatible backend in its own process, so it can be killed (SIGKILL) and restarted on
    the same port, as a crashed vLLM server would be."""

    def __init__(self, port: int | None = None, delay_s: float = 0.0):
        self.port = port or free_port()
        self.delay_s = delay_s
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, timeout_s: float = 30.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BACKEND_SCRIPT, str(self.port), str(self.delay_s),
            stdout=asyncio.subprocess.PIPE, env=env,
        )
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if line.strip() != b"ready":
            raise RuntimeError(f"fake backend on port {self.port} did not start (said {line!r})")
        self.starts += 1

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


# ---- rows and checks ------------------------------------------------------------------------------------------
def fault_row(i: int, *, agent: str = "", backend: str = "", expected: str | None = "OK",
              verifier: str | None = None) -> dict:
    """Row i; the fake backend answers "OK" to every prompt, so expected "OK" scores 1.0 and "NO" 0.0."""
    marks = (f"[agent={agent}] " if agent else "") + (f"[backend={backend}] " if backend else "")
    text = f"{marks}row{i} Say OK."
    r: dict[str, Any] = {"responses_create_params": {"input": [{"role": "user", "content": text}]},
                         "agent_ref": {"name": "agent"}, "row_id": i}
    if expected is not None:
        r["expected_answer"] = expected
    if verifier is not None:
        r["verifier"] = verifier
    return r


def check_accounting(rows_in: int, records: list[dict]) -> tuple[dict[int, dict], list[dict]]:
    """rows in == results + failure records, each index exactly once; failure records well formed."""
    indices = [r["_ng_task_index"] for r in records]
    assert len(records) == rows_in, f"{rows_in} rows in, {len(records)} records out"
    assert sorted(indices) == list(range(rows_in)), "an index is missing or duplicated"
    failures = [r for r in records if is_failure(r)]
    for f in failures:
        assert f["reward"] is None, f"failure record with a reward: {f}"
        info = f["failure"]
        assert info["kind"] and info["reason"] and info["last_error"], info
        assert info["attempts"] >= 1, info
    for r in records:
        if not is_failure(r):
            # a result's reward is what the verifier computed: 1.0 iff the row expects the fake's "OK"
            assert r["reward"] == (1.0 if r["expected_answer"] == "OK" else 0.0), r
    return {r["_ng_task_index"]: r for r in records}, failures


async def collect_all(url: str, rows, guard_s: float = 45.0, **cfg: Any) -> list[dict]:
    """Collect every record over HTTP (cfg: CollectorConfig fields); fail instead of hanging after guard_s."""
    config = CollectorConfig(**{"backoff_s": 0.01, **cfg})
    transport = Transport(allow_local=False, timeout_s=config.timeout_s)

    async def run() -> list[dict]:
        async with RolloutCollector({"agent": url}, config, transport) as collector:
            return [r async for r in collector.collect(rows)]

    return await asyncio.wait_for(run(), guard_s)


# ---- faults at the backend (policy endpoint) -------------------------------------------------------------------
# Policy model server: 2 attempts per backend call, 0.5 s timeout. Collector: 3 attempts.
# A persistent backend fault costs 2 x 3 = 6 backend requests, then a failure record of kind http_status (the
# agent answers 502 "upstream_error" naming the backend), attempts 3.
BACKEND_CASES = [
    # (row kwargs, expected failure kind or None, backend requests that carry the row)
    (dict(), None, 1),
    (dict(expected="NO"), None, 1),                          # a real reward of 0.0, not a failure
    (dict(backend="5xx:1"), None, 2),                        # policy retry: 503, 200
    (dict(backend="5xx:3"), None, 4),                        # 503, 503 -> 502 to the collector; retry: 503, 200
    (dict(backend="5xx:99"), "http_status", 6),              # 2 x 3 requests, all 503
    (dict(backend="reset:1"), None, 2),
    (dict(backend="reset:99"), "http_status", 6),
    (dict(backend="close:1"), None, 2),
    (dict(backend="slow:1"), None, 2),                       # 2.0 s > 0.5 s timeout, retried
    (dict(backend="slow:99"), "http_status", 6),
    (dict(backend="garbage:1"), None, 2),                    # not JSON: 502 at once (policy does not retry it),
    (dict(backend="garbage:99"), "http_status", 3),          # the collector does: 1 backend request per attempt
    (dict(verifier="raise"), "verifier", 3),                 # a 500 from /verify: retried by the collector
    (dict(expected=None), "verifier", 3),                    # no expected_answer: cannot judge -> failure
]


@pytest.mark.parametrize("direct", [False, True], ids=["http", "direct"])
async def test_backend_faults_every_row_accounted(direct):
    fake = FakeOpenAIServer("fake")
    await fake.start(register_local=False)
    stack = await start_stack(fake.base_url, backend_choose=marker_chooser("backend"), direct=direct)
    try:
        rows = [fault_row(i, **kw) for i, (kw, _, _) in enumerate(BACKEND_CASES)]
        records = await collect_all(stack.agent_url, rows, max_attempts=3, timeout_s=10, concurrency=64)
    finally:
        await stack.stop()
        await fake.stop()
    by_index, failures = check_accounting(len(rows), records)
    for i, (kw, kind, _) in enumerate(BACKEND_CASES):
        rec = by_index[i]
        assert (rec["failure"]["kind"] if is_failure(rec) else None) == kind, (kw, rec)
        if kind is not None:
            assert rec["failure"]["attempts"] == 3 and rec["reward"] is None
            assert rec["failure"]["url"] == stack.agent.url + "/run"
            assert rec["row_id"] == i  # the row's keys travel with its failure record
    # 6 failures: 5xx:99, reset:99, slow:99, garbage:99, verifier raise, verifier cannot judge
    assert len(failures) == 6
    last = {i: by_index[i]["failure"]["last_error"] for i, (_, k, _) in enumerate(BACKEND_CASES) if k}
    backend = stack.backend_proxy.url + "/v1/chat/completions"
    assert backend in last[4] and "503" in last[4]
    assert backend in last[6] and "broke" in last[6]          # "Connection to ... broke: ..."
    assert backend in last[9] and "did not answer within 0.5 s" in last[9]
    assert backend in last[11] and "not JSON" in last[11]
    assert "VerifierError" in last[12] and "verifier crashed on purpose (row 12)" in last[12]
    assert "not reward 0" in last[12]
    assert "expected_answer" in last[13]
    # Faults injected = requests spoiled at the proxy: 5xx 1+3+6 = 10, reset 1+6 = 7, close 1, slow 1+6 = 7,
    # garbage 1+3 = 4.
    assert stack.backend_proxy.faults == Counter({"5xx": 10, "reset": 7, "close": 1, "slow": 7, "garbage": 4})
    # Total backend requests: sum of the per-row column = 1+1+2+4+6+2+6+2+2+6+2+3+3+3 = 43.
    assert stack.backend_proxy.requests == sum(n for _, _, n in BACKEND_CASES) == 43


# ---- faults between the collector and the agent ----------------------------------------------------------------
# Collector: 3 attempts, 1.0 s timeout; the agent proxy's 'slow' is 2.0 s.
AGENT_CASES = [
    (dict(), None, 1),
    (dict(agent="5xx:2"), None, 3),                          # 503, 503, 200
    (dict(agent="5xx:99"), "http_status", 3),
    (dict(agent="reset:1"), None, 2),
    (dict(agent="reset:99"), "connection", 3),
    (dict(agent="close:99"), "connection", 3),
    (dict(agent="slow:1"), None, 2),                         # 2.0 s > 1.0 s: timeout, retried
    (dict(agent="slow:99"), "timeout", 3),
    (dict(agent="garbage:1"), "malformed_response", 1),      # a 200 that is not JSON is not retried
]


async def test_agent_faults_every_row_accounted():
    fake = FakeOpenAIServer("fake")
    await fake.start(register_local=False)
    stack = await start_stack(fake.base_url, agent_choose=marker_chooser("agent"))
    try:
        rows = [fault_row(i, **kw) for i, (kw, _, _) in enumerate(AGENT_CASES)]
        records = await collect_all(stack.agent_url, rows, max_attempts=3, timeout_s=1.0, concurrency=64)
    finally:
        await stack.stop()
        await fake.stop()
    by_index, failures = check_accounting(len(rows), records)
    for i, (kw, kind, attempts) in enumerate(AGENT_CASES):
        rec = by_index[i]
        assert (rec["failure"]["kind"] if is_failure(rec) else None) == kind, (kw, rec)
        if kind is not None:
            assert rec["failure"]["attempts"] == attempts, (kw, rec["failure"])
            assert rec["failure"]["url"] == stack.agent_proxy.url + "/run"
    assert len(failures) == 5
    assert "503" in by_index[2]["failure"]["last_error"]
    assert "did not answer within 1 s" in by_index[7]["failure"]["last_error"]
    assert "not JSON" in by_index[8]["failure"]["last_error"]
    # requests at the agent proxy: 1+3+3+2+3+3+2+3+1 = 21
    assert stack.agent_proxy.requests == sum(n for _, _, n in AGENT_CASES) == 21


# ---- the policy endpoint killed (SIGKILL) and restarted mid-run ------------------------------------------------
async def test_backend_killed_and_restarted_mid_run():
    backend = BackendProcess(delay_s=0.05)
    await backend.start()
    stack = await start_stack(backend.base_url, policy_timeout_s=5.0, policy_attempts=2, policy_backoff_s=0.02)
    restarted = asyncio.Event()
    n_rows, gate = 60, 30

    async def rows():
        for i in range(n_rows):
            if i == gate:
                # Rows >= 30 start only once the backend is back: they must all succeed.
                await restarted.wait()
            yield fault_row(i)

    async def kill_and_restart() -> None:
        await backend.kill()
        await asyncio.sleep(0.3)  # down for 0.3 s + the restart (> the ~0.1 s the retries below last)
        await backend.start()
        restarted.set()

    config = CollectorConfig(concurrency=4, max_attempts=3, backoff_s=0.02, timeout_s=10)
    records: list[dict] = []
    killer = None
    try:
        async def run() -> None:
            nonlocal killer
            async with RolloutCollector({"agent": stack.agent_url}, config, Transport(allow_local=False)) as c:
                async for rec in c.collect(rows()):
                    records.append(rec)
                    if len(records) == 10:
                        killer = asyncio.ensure_future(kill_and_restart())

        await asyncio.wait_for(run(), 45)
    finally:
        if killer is not None:
            await killer
        await stack.stop()
        await backend.kill()
    by_index, failures = check_accounting(n_rows, records)
    assert backend.starts == 2
    # The rows in flight when the backend died (up to 4) fail: policy 2 attempts (reset, then refused) -> 502,
    # collector 3 attempts within ~0.1 s, all while nothing listens.
    assert len(failures) >= 1
    for f in failures:
        assert f["failure"]["kind"] == "http_status" and f["failure"]["attempts"] == 3
        assert backend.base_url in f["failure"]["last_error"]  # the policy server names the dead backend
        assert f["_ng_task_index"] < gate
    # every row started after the restart succeeded: the run recovers by itself
    assert all(not is_failure(by_index[i]) and by_index[i]["reward"] == 1.0 for i in range(gate, n_rows))


# ---- collector errors, watchdog, backpressure -------------------------------------------------------------------
class CountingAgent(Server):
    """/run answers (after ``delay_s``) with reward 1.0 and counts rows in flight."""

    server_type = "responses_api_agents"

    def __init__(self, delay_s: float = 0.0):
        super().__init__("agent")
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0

    def routes(self):
        return [("POST", "/run", self.run)]

    async def run(self, body, ctx):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)  # sleep(0) still yields, so rows overlap even on direct calls
            return {**body, "response": {"output": []}, "reward": 1.0}  # the row echoed, as agents do
        finally:
            self.in_flight -= 1


HANG_SCRIPT = """
import asyncio, sys
from gym_plugin.collect import CollectorConfig, RolloutCollector
from gym_plugin.http import HTTPStatusError, Transport
from tests.integration.test_faults import CountingAgent, fault_row

async def main(mode):
    agent = CountingAgent(delay_s=0.01)
    await agent.start(register_local=False)
    rows = [fault_row(i) for i in range(200)]
    rows[8]["extra"] = {1, 2}  # a set: json.dumps raises TypeError inside the HTTP client
    before = len(asyncio.all_tasks())
    config = CollectorConfig(concurrency=4)
    async with RolloutCollector({"agent": agent.url}, config, Transport(allow_local=False)) as collector:
        records = collector.collect(iter(rows))
        try:
            async for _ in records:
                await asyncio.sleep(0.05)  # a consumer slower than the workers: the output queue fills up
                if mode == "break":
                    break
        except TypeError as e:
            print("raised", type(e).__name__, e, flush=True)
        await records.aclose()
    await asyncio.sleep(0.1)  # the agent's keep-alive connection handlers end once the client closed
    print("closed, tasks left:", len(asyncio.all_tasks()) - before, flush=True)
    await agent.stop()

asyncio.run(main(sys.argv[1]))
"""


async def test_the_caller_is_never_left_hanging():
    """A collector error (a row that cannot be sent) reaches the caller, and a caller that stops early gets
    control back, with no worker left behind, while the consumer is slower than the workers. Both run in child
    processes, side by side: a hang there fails this test after 10 s instead of hanging the test session."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))

    async def run(mode: str) -> str:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", HANG_SCRIPT, mode, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return f"{mode}: HUNG"
        assert proc.returncode == 0, stderr.decode()[-2000:]
        return f"{mode}: {stdout.decode()}"

    error, stop = await asyncio.gather(run("error"), run("break"))
    assert "raised TypeError Object of type set is not JSON serializable" in error, error
    assert "closed, tasks left: 0" in error, error
    assert "closed, tasks left: 0" in stop, stop


async def test_watchdog_reports_a_stalled_batch(caplog):
    fake = FakeOpenAIServer("fake")
    await fake.start(register_local=False)
    stack = await start_stack(fake.base_url, agent_choose=marker_chooser("agent"), slow_s=0.8)
    try:
        with caplog.at_level(logging.WARNING, logger="gym_plugin.collect"):
            records = await collect_all(stack.agent_url, [fault_row(0, agent="slow:1")], timeout_s=5.0,
                                        stall_warning_s=0.2)
    finally:
        await stack.stop()
        await fake.stop()
    stalls = [r.getMessage() for r in caplog.records if "no row finished" in r.getMessage()]
    # 0.8 s without a finished row, a warning every 0.2 s: 3 or 4 warnings, each with the progress count
    assert len(stalls) >= 2 and "(0 of 1 rows done)" in stalls[0]
    assert records[0]["reward"] == 1.0  # the watchdog reports; the row still finishes


async def test_bounded_in_flight_for_20000_lazy_rows():
    """20,000 rows from a lazy iterable: at most `concurrency` rows at the agent at once, at most 2 x
    concurrency pulled ahead of the consumer (in flight + finished records waiting in the bounded queue), and
    a bounded number of asyncio tasks, even while the consumer is slow."""
    concurrency = 16
    agent = CountingAgent()
    await agent.start()  # in process: direct calls, so 20,000 rows take a few seconds
    pulled = 0

    def rows():
        nonlocal pulled
        for i in range(20_000):
            pulled += 1
            yield {"responses_create_params": {"input": f"q{i}"}, "agent_ref": "agent"}

    base_tasks = len(asyncio.all_tasks())
    max_ahead = max_tasks = seen = 0
    indices = set()
    try:
        async def run() -> None:
            nonlocal max_ahead, max_tasks, seen
            async with RolloutCollector({"agent": agent.url}, CollectorConfig(concurrency=concurrency)) as c:
                async for rec in c.collect(rows()):
                    seen += 1
                    indices.add(rec["_ng_task_index"])
                    max_ahead = max(max_ahead, pulled - seen)
                    if seen % 500 == 0:
                        max_tasks = max(max_tasks, len(asyncio.all_tasks()) - base_tasks)
                    if seen == 1000:
                        await asyncio.sleep(0.2)  # a slow consumer: the workers must wait, not read ahead
                        assert pulled - seen <= 2 * concurrency

        await asyncio.wait_for(run(), 50)
    finally:
        await agent.stop()
    assert seen == 20_000 and len(indices) == 20_000
    assert agent.max_in_flight == concurrency  # reached, never exceeded
    # pulled - seen <= 16 rows held by workers + 16 records in the output queue = 32
    assert 0 < max_ahead <= 2 * concurrency
    # 16 workers, plus at most a couple of helper tasks (the wait_for on the queue)
    assert max_tasks <= concurrency + 4


# ---- flushed output and --resume after a crash ------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gym_plugin.cli", "collect", "--quiet", *args]


def _read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _collect_subprocess(args: list[str], kill_at_lines: int | None, out: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        if kill_at_lines is None:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, stderr.decode()[-2000:]
            return stdout.decode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (out.exists() and out.read_text().count("\n") >= kill_at_lines):
            assert proc.returncode is None, "collect finished before it could be killed: make rows slower"
            assert loop.time() < deadline, "collect wrote nothing for 60 s"
            await asyncio.sleep(0.02)
        proc.kill()  # SIGKILL: no clean-up, no final flush
        await proc.wait()
        return None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _write_rows(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({**fault_row(i), "agent_ref": {"name": "exact_match_agent"}}) + "\n"
                            for i in range(n)))


async def test_resume_after_a_crash_mid_file(tmp_path):
    """`gym-plugin collect` killed with SIGKILL mid-file keeps every finished line; `--resume` runs only the
    rest; in the end every input row is in the output exactly once."""
    n = 300
    fake = FakeOpenAIServer("fake", Behaviour(delay_s=0.02))  # 300 rows / 4 at a time x 0.02 s = 1.5 s
    await fake.start(register_local=False)
    inp, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    _write_rows(inp, n)
    common = ["--config", str(ROOT / "conf/gym/exact_match.yaml"), "--input", str(inp), "--output", str(out),
              "--concurrency", "4", f"policy_base_url={fake.base_url}"]
    try:
        await _collect_subprocess(_cli(*common), kill_at_lines=40, out=out)
        await asyncio.sleep(0.2)  # requests the killed process had already sent reach the fake and are counted
        text = out.read_text()
        done = [json.loads(line) for line in text.splitlines()[: text.count("\n")]]  # complete lines only
        assert 40 <= len(done) < n
        assert len({r["_ng_task_index"] for r in done}) == len(done)
        assert all(r["reward"] == 1.0 for r in done)
        requests_before = fake.requests["/v1/chat/completions"]
        summary = await _collect_subprocess(_cli(*common, "--resume"), None, out)
    finally:
        await fake.stop()
    records = _read_records(out)
    by_index, failures = check_accounting(n, records)
    assert not failures
    # only the rows not already in the file were sent again (rows in flight at the kill may have reached the
    # backend before, so compare what --resume sent with what it had to do)
    assert fake.requests["/v1/chat/completions"] - requests_before == n - len(done)
    assert f"{len(done)} skipped (--resume)" in summary


async def test_resume_after_a_cut_last_line(tmp_path):
    """A crash in the middle of writing a line leaves half a line; --resume drops it (that row runs again)
    instead of gluing its next record onto it (regression: records were lost that way)."""
    n = 20
    fake = FakeOpenAIServer("fake")
    await fake.start(register_local=False)
    inp, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    _write_rows(inp, n)
    common = ["--config", str(ROOT / "conf/gym/exact_match.yaml"), "--input", str(inp), "--output", str(out),
              f"policy_base_url={fake.base_url}"]
    try:
        await _collect_subprocess(_cli(*common), None, out)
        lines = out.read_text().splitlines(keepends=True)
        # a crash in the middle of writing the 11th line: 10 whole lines, then half a line, no newline
        out.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
        await _collect_subprocess(_cli(*common, "--resume"), None, out)
    finally:
        await fake.stop()
    check_accounting(n, _read_records(out))  # every line is JSON, every row exactly once


# ---- safe defaults ----------------------------------------------------------------------------------------------
def _stack_config(*extra: str):
    from gym_plugin.config import load_config

    return load_config(str(ROOT / "conf/gym/exact_match.yaml"),
                       ["+policy_endpoint.impl=fake_openai", "policy_base_url=local", "head_server.port=0", *extra])


async def test_servers_bind_loopback_by_default():
    from gym_plugin.launch import start_servers

    running = await start_servers(_stack_config())
    try:
        hosts = {s.name: s.host for s in running.servers}
    finally:
        await running.stop()
    # policy_endpoint (fake), policy_model, exact_match, exact_match_agent, head: nothing on 0.0.0.0
    assert set(hosts.values()) == {"127.0.0.1"}, hosts


async def test_auth_token_in_the_config_makes_servers_require_it():
    """Servers started from a config with auth_token answer 401 without it; a collector with a wrong token gets
    one failure record per row (401 is not retried), with the right token the rows run."""
    from gym_plugin.launch import start_servers

    running = await start_servers(_stack_config("+auth_token=s3cret-token"))
    transport = Transport(allow_local=False)
    try:
        agent_url = running.agent_urls()["exact_match_agent"]
        row = fault_row(0) | {"agent_ref": {"name": "exact_match_agent"}}
        with pytest.raises(HTTPStatusError) as err:
            await transport.post(agent_url + "/run", row)
        assert err.value.status == 401
        urls = {"exact_match_agent": agent_url}
        wrong = await _collect_with(urls, [row], CollectorConfig(auth_token="wrong", max_attempts=3))
        right = await _collect_with(urls, [row], CollectorConfig(auth_token="s3cret-token"))
    finally:
        await transport.close()
        await running.stop()
    (fail,) = wrong
    assert fail["failure"]["kind"] == "http_status" and fail["failure"]["attempts"] == 1
    assert "HTTP 401" in fail["failure"]["last_error"] and fail["reward"] is None
    assert "s3cret-token" not in json.dumps(fail)  # the secret is not echoed into the record
    (ok,) = right
    assert not is_failure(ok) and ok["reward"] == 1.0


async def _collect_with(agent_urls: dict, rows: list, config: CollectorConfig) -> list[dict]:
    async with RolloutCollector(agent_urls, config, Transport(allow_local=False, timeout_s=config.timeout_s,
                                                              headers=_auth(config))) as c:
        return await asyncio.wait_for(_drain(c.collect(rows)), 30)


def _auth(config: CollectorConfig) -> dict:
    return {"Authorization": f"Bearer {config.auth_token}"} if config.auth_token else {}


async def _drain(records) -> list[dict]:
    return [r async for r in records]


async def test_an_oversized_row_is_refused_with_413_and_recorded():
    """Servers refuse request bodies over DEFAULT_CLIENT_MAX_SIZE (64 MiB) with HTTP 413; the collector files the
    row as one failure record (a 4xx is the request's fault: not retried) and goes on with the others."""
    from gym_plugin.servers.base import DEFAULT_CLIENT_MAX_SIZE

    assert DEFAULT_CLIENT_MAX_SIZE == 64 * 1024 * 1024
    agent = CountingAgent()
    await agent.start(register_local=False)
    rows = [fault_row(0), fault_row(1)]
    rows[0]["blob"] = "x" * (DEFAULT_CLIENT_MAX_SIZE + 1)
    try:
        records = await collect_all(agent.url, rows, max_attempts=3)
    finally:
        await agent.stop()
    by_index, failures = check_accounting(2, records)
    assert [f["_ng_task_index"] for f in failures] == [0]
    assert by_index[0]["failure"]["kind"] == "http_status" and by_index[0]["failure"]["attempts"] == 1
    assert "HTTP 413" in by_index[0]["failure"]["last_error"]
    assert by_index[1]["reward"] == 1.0
