"""Fuzzing (hypothesis): the example-row parser and the server endpoints.

- `validate_example` on arbitrary JSON values and near-valid rows: returns a row that really has the required
  shape, or raises ProtocolError; never another exception.
- Real servers on 127.0.0.1 (fake OpenAI endpoint -> policy model server -> exact_match resource server ->
  agent), random bodies (JSON values, near-valid rows, raw bytes) POSTed to /run, /v1/responses,
  /seed_session, /verify: every reply comes back within a timeout (no hang), with a JSON body; errors are
  4xx JSON errors, and a 5xx is only one of the two documented ones (``upstream_error``, ``verifier_error``),
  never a ``server_error`` (an unhandled exception) and never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gym_plugin.servers.base import Directory
from gym_plugin.errors import ProtocolError
from gym_plugin.protocol import agent_name
from gym_plugin.rows import validate_example
from gym_plugin.servers.agent import AgentConfig, AgentServer
from gym_plugin.servers.policy.config import PolicyModelConfig
from gym_plugin.servers.policy.server import PolicyModelServer
from gym_plugin.servers.resources.exact_match import ExactMatchResourceServer
from gym_plugin.testing.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.timeout(120)

# ---- strategies ----------------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", ""]),
                           "content": st.one_of(st.text(max_size=30), json_values)}),
    max_size=3,
)
create_params = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"input": st.one_of(st.text(max_size=30), messages, json_values)},
        optional={"tools": json_values, "model": json_values, "temperature": json_values,
                  "max_output_tokens": json_values, "tool_choice": json_values},
    ),
)
near_rows = st.fixed_dictionaries(
    {},
    optional={
        "responses_create_params": create_params,
        "agent_ref": st.one_of(st.just({"name": "agent"}), st.just("agent"), json_values),
        "expected_answer": st.one_of(st.text(max_size=10), json_values),
        "response": st.one_of(json_values, st.fixed_dictionaries({"output": json_values})),
        "_ng_task_index": json_values,
    },
)


# ---- the row parser --------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, near_rows))
def test_validate_example_returns_valid_rows_or_raises_protocol_error(row):
    try:
        out = validate_example(row, index=7)
    except ProtocolError as e:
        assert str(e)  # a typed error with a message
        return
    # accepted: it really has the shape agents need
    inp = out["responses_create_params"]["input"]
    assert isinstance(inp, str) or (isinstance(inp, list) and inp)
    assert isinstance(agent_name(out), str) and agent_name(out)


def test_validate_example_errors_name_the_row():
    with pytest.raises(ProtocolError, match="example row 7"):
        validate_example({"responses_create_params": {"input": "hi"}}, index=7)


# ---- the endpoints -----------------------------------------------------------------------------------------------
class _Stack:
    """The servers, on an event loop in a background thread (hypothesis drives examples synchronously)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []
        self.session = None
        self.call(self._start())

    def call(self, coro, timeout=30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self):
        fake = FakeOpenAIServer("fake", [("", "The answer is \\boxed{4}.")])
        await fake.start(register_local=False)
        self.servers.append(fake)
        d = Directory()
        policy = PolicyModelServer("policy", PolicyModelConfig(base_url=fake.base_url, model="m", backoff_s=0.01), d)
        res = ExactMatchResourceServer("res", ExactMatchResourceServer.Config(), d)
        agent = AgentServer("agent", AgentConfig(resources_server={"type": "resources_servers", "name": "res"},
                                                 model_server={"type": "responses_api_models", "name": "policy"},
                                                 timeout_s=10), d)
        for s in (policy, res, agent):
            await s.start(register_local=False)  # over HTTP only: the path a remote caller takes
            self.servers.append(s)
            d.set(s.name, s.url)
        self.urls = {"/run": agent.url, "/agent/v1/responses": agent.url, "/seed_session": res.url,
                     "/verify": res.url, "/v1/responses": policy.url}
        self.session = aiohttp.ClientSession()

    async def post(self, route, data: bytes):
        path = "/v1/responses" if route == "/agent/v1/responses" else route
        async with self.session.post(self.urls[route] + path, data=data,
                                     headers={"Content-Type": "application/json"},
                                     timeout=aiohttp.ClientTimeout(total=15)) as r:
            return r.status, await r.text()

    async def _stop(self):
        await self.session.close()
        for s in reversed(self.servers):
            await s.stop()

    def close(self):
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def servers():
    s = _Stack()
    yield s
    s.close()


bodies = st.one_of(
    near_rows.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)
ROUTES = ["/run", "/agent/v1/responses", "/seed_session", "/verify", "/v1/responses"]
ALLOWED_5XX = {"upstream_error", "verifier_error"}

def check_reply(route, body, status, text):
    where = f"{route} <- {body[:200]!r}: HTTP {status} {text[:300]}"
    assert "Traceback" not in text, where
    data = json.loads(text)  # every reply is JSON, errors included
    if status < 300:
        return
    assert 400 <= status < 600, where
    assert isinstance(data, dict) and isinstance(data.get("error"), dict), where
    assert isinstance(data["error"].get("message"), str) and data["error"]["message"], where
    if status >= 500:
        assert data["error"].get("type") in ALLOWED_5XX, where  # server_error = an unhandled exception (a bug)


@settings(max_examples=150, deadline=None, derandomize=True,  # reproducible: the same bodies every run
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_endpoints_answer_json_errors_never_crash_or_hang(servers, route, body):
    status, text = servers.call(servers.post(route, body), timeout=20)  # a hang fails here
    check_reply(route, body, status, text)


# Bodies the fuzzer once turned into unhandled 500s (fixed): a non-list `input` reached list(), a non-object
# output item reached `.get`. Each must now be a typed 400 naming the field.
@pytest.mark.parametrize("route,body,field", [
    ("/run", b'{"responses_create_params": {"input": false}}', "input"),
    ("/agent/v1/responses", b'{"input": 1.5}', "input"),
    ("/verify", b'{"response": {"output": [1]}, "expected_answer": "4"}', "output"),
])
def test_bodies_that_once_crashed_are_400s(servers, route, body, field):
    status, text = servers.call(servers.post(route, body))
    check_reply(route, body, status, text)
    assert status == 400 and field in json.loads(text)["error"]["message"]


def test_endpoints_known_bad_bodies(servers):
    """Hand-picked cases hypothesis might not reach, with the status each must get."""
    cases = [
        ("/run", b"{not json", 400),
        ("/run", b"[1, 2]", 400),
        ("/verify", b'{"response": {"output": "nope"}}', 400),
        ("/v1/responses", b'{"input": 5}', 400),
        ("/seed_session", b"null", 200),
        ("/run", b'{"responses_create_params": {"input": "2+2?"}, "agent_ref": "agent"}', 500),  # no expected_answer
        ("/run", b'{"responses_create_params": {"input": "2+2?"}, "expected_answer": "4"}', 200),
    ]
    for route, body, want in cases:
        status, text = servers.call(servers.post(route, body))
        check_reply(route, body, status, text)
        assert status == want, (route, body, status, text[:300])
    # the last row is scored for real: the fake model says \boxed{4}
    status, text = servers.call(servers.post("/run", cases[-1][1]))
    assert json.loads(text)["reward"] == 1.0
