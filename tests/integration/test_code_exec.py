"""code_exec resource server: fake OpenAI endpoint -> policy -> agent -> code_exec, real sandboxes.

The scripted model answers with fenced code; the verifier runs it against the row's tests. Wrong or hostile
answers score 0.0; problems that are not the answer's fault (no usable tests, a sandbox that cannot start)
make /run fail with a verifier error instead of scoring 0.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest

from gym_plugin.servers.base import Directory
from gym_plugin.http import HTTPStatusError, Transport
from gym_plugin.servers.registry import get_server_class
from gym_plugin.servers.agent import AgentConfig, AgentServer
from gym_plugin.servers.policy.config import PolicyModelConfig
from gym_plugin.servers.policy.server import PolicyModelServer
from gym_plugin.servers.resources.code_exec import CodeExecConfig, CodeExecResourceServer, extract_code
from gym_plugin.testing.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.timeout(60)

BOTH_PATHS = pytest.mark.parametrize("allow_local", [False, True], ids=["http", "direct"])
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-4, 4) == 0"]

SCRIPT = [
    ("correct", "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"),
    ("wrong", "```python\ndef add(a, b):\n    return a * b\n```"),  # add(1, 2) = 2 != 3; add(-4, 4) = -16 != 0
    ("forkbomb", "```python\nimport os\nwhile True:\n    os.fork()\n```"),
    ("loop", "```python\nwhile True:\n    pass\n```"),
    ("passwd", "```python\nprint(open('/etc/passwd').read())\ndef add(a, b):\n    return a + b\n```"),
    ("prose", "def add(a, b): return a + b  (no code fence)"),
]


def row(text: str, tests=ADD_TESTS) -> dict:
    r = {"responses_create_params": {"input": [{"role": "user", "content": text}]}, "agent_ref": {"name": "agent"}}
    if tests is not None:
        r["tests"] = tests
    return r


@asynccontextmanager
async def stack(code_cfg: CodeExecConfig):
    fake = FakeOpenAIServer("fake", SCRIPT)
    d = Directory()
    started = []
    try:
        await fake.start()
        started.append(fake)
        policy = PolicyModelServer("policy", PolicyModelConfig(base_url=fake.base_url, model="fake-model"), d)
        res = CodeExecResourceServer("code", code_cfg, d)
        agent = AgentServer("agent", AgentConfig(resources_server={"type": "resources_servers", "name": "code"},
                                                 model_server={"type": "responses_api_models", "name": "policy"}), d)
        for s in (policy, res, agent):
            await s.start()
            started.append(s)
            d.set(s.name, s.url)
        yield agent
    finally:
        for s in reversed(started):
            await s.stop()


async def run_rows(agent, rows, allow_local):
    t = Transport(allow_local=allow_local)
    try:
        out = []
        for r in rows:
            try:
                out.append((await t.post(f"{agent.url}/run", r)).data)
            except HTTPStatusError as e:
                out.append(e)
        return out
    finally:
        await t.close()


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```") == "y = 2\n"  # the last python block
    assert extract_code("```\nz = 3\n```") == "z = 3\n"  # untagged block as fallback
    assert extract_code("```python\nx = 1\n```\n```\nz = 3\n```") == "x = 1\n"  # tagged wins over untagged
    assert extract_code("```bash\nls\n```") is None  # another language is not Python
    assert extract_code("```python\nx = 1\n") is None  # cut off before the closing fence
    assert extract_code("no code") is None


def test_registered():
    assert get_server_class("resources_servers", "code_exec") is CodeExecResourceServer


@BOTH_PATHS
def test_answers_are_scored_and_hostile_ones_contained(allow_local):
    async def body():
        cfg = CodeExecConfig(cpu_time_s=1, wall_time_s=3, memory_mb=256)
        async with stack(cfg) as agent:
            return await run_rows(agent, [row(k) for k, _ in SCRIPT], allow_local)

    correct, wrong, forkbomb, loop, passwd, prose = asyncio.run(body())
    assert (correct["reward"], correct["sandbox_status"], correct["tests_passed"], correct["tests_total"]) == (
        1.0, "passed", 2, 2)
    assert correct["extracted_code"] == "def add(a, b):\n    return a + b\n"
    assert correct["tests"] == ADD_TESTS  # row echoed
    assert (wrong["reward"], wrong["sandbox_status"], wrong["tests_passed"]) == (0.0, "failed", 0)
    assert "AssertionError" in wrong["sandbox_stderr"]
    assert (forkbomb["reward"], forkbomb["sandbox_status"]) == (0.0, "forbidden")
    assert (loop["reward"], loop["sandbox_status"]) == (0.0, "timeout")
    assert (passwd["reward"], passwd["sandbox_status"]) == (0.0, "forbidden")
    assert "root:" not in passwd["sandbox_stderr"]  # nothing of the file leaked
    assert (prose["reward"], prose["sandbox_status"], prose["extracted_code"]) == (0.0, "failed", "")


@BOTH_PATHS
def test_sandbox_and_row_problems_are_failures_not_zero(allow_local):
    async def body():
        async with stack(CodeExecConfig(cpu_time_s=1, python="/nonexistent/python3")) as agent:
            broken = await run_rows(agent, [row("correct")], allow_local)
        async with stack(CodeExecConfig(cpu_time_s=1)) as agent:
            no_tests = await run_rows(agent, [row("correct", tests=None), row("correct", tests=[])], allow_local)
        return broken + no_tests

    broken, missing, empty = asyncio.run(body())
    for err in (broken, missing, empty):
        assert isinstance(err, HTTPStatusError) and err.status >= 500, err  # a failed rollout, no reward
        assert "VerifierError" in str(err) or "verif" in str(err).lower()
    assert "could not run the answer" in str(broken) and "/nonexistent/python3" in str(broken)
    assert "'tests' must be a non-empty list" in str(missing)
