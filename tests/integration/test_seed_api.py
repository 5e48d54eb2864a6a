"""The seed's API end to end: GymIntegration and RolloutCollectionHelper over real servers on 127.0.0.1.

The policy endpoint is the scripted `FakeOpenAIServer`, run on an event loop of its own in a background
thread, so GymIntegration reaches it over real HTTP exactly as it would reach vLLM. Its tokenization is known
(gym_plugin/testing/fake_openai.py): a prompt is ``[1, role] + one id per word + [2]`` per message, then the
generation prompt ``[1, 5]``; a generation is one id per word + ``[2]``; the log-prob of id t is
``LOG_PROBS[t % 7]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from gym_plugin import BaseServerConfig, GymIntegration, RolloutCollectionHelper
from gym_plugin.errors import ConfigError, EndpointUnreachableError, UnknownAgentError
from gym_plugin.protocol import ROLLOUT_INDEX_KEY, TASK_INDEX_KEY, is_failure
from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.testing.fake_openai import LOG_PROBS, Behaviour, FakeOpenAIServer, ToolCall, Turn
from gym_plugin.net import free_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
EXACT = ROOT / "conf/gym/exact_match.yaml"
# Answers by marker (the first marker found in the last user message wins): sums the fake gets right / wrong.
SUMS = [("2 + 2", "4"), ("1 + 3", "4"), ("3 + 4", "7"), ("5 + 2", "9")]  # the last one is wrong (5 + 2 = 7)


@contextmanager
def fake_endpoint(script=None, **kw):
    """A FakeOpenAIServer on its own loop in a thread: a separate "machine" as far as GymIntegration knows."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = FakeOpenAIServer("fake", script, **kw)
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def sum_row(question: str, answer: str, agent: str = "exact_match_agent") -> dict:
    return {
        "responses_create_params": {"input": [{"type": "message", "role": "user", "content": f"What is {question}?"}]},
        "agent_ref": agent,  # the seed's string form; {"name": ...} works too
        "expected_answer": answer,
    }


def test_collect_rollouts_async_for_as_in_the_seed():
    rows = [sum_row(q, str(eval(q))) for q, _ in SUMS]  # expected answers: 4, 4, 7, 7
    with fake_endpoint(SUMS) as fake:
        with GymIntegration("fake-model", [fake.base_url], EXACT, head_server_port=0) as gym:

            async def main():
                return [r async for r in gym.collect_rollouts(rows)]

            rollouts = asyncio.run(main())
    assert sorted(r[TASK_INDEX_KEY] for r in rollouts) == [0, 1, 2, 3]
    by_index = {r[TASK_INDEX_KEY]: r for r in rollouts}
    # The fake answers 4, 4, 7, 9 to 2+2, 1+3, 3+4, 5+2: rewards 1, 1, 1, 0.
    assert [by_index[i]["reward"] for i in range(4)] == [1.0, 1.0, 1.0, 0.0]
    item = by_index[0]["response"]["output"][-1]
    # Prompt "What is 2 + 2?": [1, 4(user)] + 4 word ids + [2], then [1, 5(assistant)] -> 10 ids.
    assert len(item["prompt_token_ids"]) == 10 and item["prompt_token_ids"][:2] == [1, 4]
    assert item["prompt_token_ids"][-2:] == [1, 5]
    gen = item["generation_token_ids"]
    assert len(gen) == 2 and gen[-1] == 2  # the word "4" + IM_END
    assert item["generation_log_probs"] == [LOG_PROBS[t % 7] for t in gen]
    assert by_index[0]["responses_create_params"]["input"][0]["content"] == "What is 2 + 2?"


def test_run_examples_through_the_head_server_in_completion_order():
    rows = [sum_row(q, a) for q, a in SUMS]  # expected = the fake's answers: all rewards 1
    with fake_endpoint(SUMS) as fake, GymIntegration("fake-model", fake.base_url, EXACT, head_server_port=0) as gym:
        head = gym.head_server_config
        assert isinstance(head, BaseServerConfig) and head.port > 0

        async def main():
            helper = RolloutCollectionHelper()
            tasks = helper.run_examples(examples=rows, head_server_config=head, repeats=2)
            return [await t for t in tasks]  # a different loop from the servers': every call is real HTTP

        results = asyncio.run(main())
    assert len(results) == 8
    assert sorted((r[TASK_INDEX_KEY], r[ROLLOUT_INDEX_KEY]) for r in results) == [(i, k) for i in range(4) for k in (0, 1)]
    assert all(r["reward"] == 1.0 for r in results)


def test_two_base_urls_are_both_used():
    rows = [sum_row(q, a) for q, a in SUMS] * 4  # 16 rows, round-robin over 2 backends: 8 each
    with fake_endpoint(SUMS) as a, fake_endpoint(SUMS) as b:
        with GymIntegration("fake-model", [a.base_url, b.base_url], EXACT, head_server_port=0) as gym:
            records = gym.collect(rows)
    assert len(records) == 16 and all(r["reward"] == 1.0 for r in records)
    assert a.requests["/v1/chat/completions"] == 8 and b.requests["/v1/chat/completions"] == 8


def test_multi_turn_calculator_row_has_tokens_on_every_model_turn():
    # (3 * 4) + 5 = 17: multiply, then add, then the final answer -> 3 model calls, 2 tool outputs.
    script = Behaviour(turns=[Turn(tool_calls=[ToolCall("multiply", {"a": 3, "b": 4})]),
                              Turn(tool_calls=[ToolCall("add", {"a": 12, "b": 5})]),
                              "The answer is \\boxed{17}."])
    with fake_endpoint(script) as fake:
        with GymIntegration("fake-model", fake.base_url, ROOT / "conf/gym/calculator.yaml", head_server_port=0) as gym:
            (record,) = gym.collect([calculator_row(3, 4, 5)])
    assert record["reward"] == 1.0
    output = record["response"]["output"]
    assert [it["type"] for it in output] == ["function_call", "function_call_output", "function_call",
                                              "function_call_output", "message"]
    assert [json.loads(it["output"]) for it in output if it["type"] == "function_call_output"] in (
        [{"result": 12}, {"result": 17}], [12, 17])
    calls = [it for it in output if "generation_token_ids" in it]
    assert len(calls) == 3
    for k, it in enumerate(calls):
        assert it["generation_token_ids"] and len(it["generation_log_probs"]) == len(it["generation_token_ids"])
        if k:  # each model call's prompt extends the previous prompt + generation (no re-tokenization drift)
            prev = calls[k - 1]
            n = len(prev["prompt_token_ids"]) + len(prev["generation_token_ids"])
            assert it["prompt_token_ids"][:n] == prev["prompt_token_ids"] + prev["generation_token_ids"]


def test_unknown_agent_lists_the_configured_agents():
    with fake_endpoint("4") as fake, GymIntegration("fake-model", fake.base_url, EXACT, head_server_port=0) as gym:

        async def main():
            return [r async for r in gym.collect_rollouts([sum_row("2 + 2", "4", agent="your_agent_name")])]

        with pytest.raises(UnknownAgentError) as err:
            asyncio.run(main())
    message = str(err.value)
    assert "your_agent_name" in message and "exact_match_agent" in message
    assert isinstance(err.value, KeyError)  # the seed's troubleshooting says KeyError: it still is one


def test_unreachable_policy_endpoint_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(EndpointUnreachableError) as err:
        GymIntegration("fake-model", [url], EXACT, head_server_port=0)
    assert url in str(err.value) and "policy_base_url" in str(err.value)


def test_endpoint_down_without_the_check_gives_failure_records_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    rows = [sum_row("2 + 2", "4"), sum_row("1 + 3", "4")]
    with GymIntegration("fake-model", [url], EXACT, head_server_port=0, check_endpoints=False,
                        overrides=["policy_model.responses_api_models.vllm_model.max_attempts=1",
                                   "collector.max_attempts=1"]) as gym:
        records = gym.collect(rows)
        stats = gym.last_stats
    assert len(records) == 2 and all(is_failure(r) for r in records)  # every row accounted for
    assert all("reward" not in r or r["reward"] is None for r in records)  # no reward invented
    for r in records:  # the reason names the policy endpoint that is down; attempts are counted
        assert url in r["failure"]["last_error"] and r["failure"]["attempts"] >= 1, r["failure"]
    assert stats.failed == 2 and stats.succeeded == 0


def test_the_seed_example_script_runs():
    """examples/connect_gym_to_training.py (the seed's Full Integration Example) against the fake."""
    with fake_endpoint(default="4") as fake:
        env = {**os.environ, "POLICY_BASE_URL": fake.base_url, "HEAD_SERVER_PORT": "0",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run([sys.executable, str(ROOT / "examples/connect_gym_to_training.py")], env=env,
                             capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    # The first 8 prompts are 2+2, 1+3, 3+4, 5+2, 6+1, 2+7, 8+1, 4+5: the fake's "4" is right for two of them.
    rewards = sorted(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("Collected rollout"))
    assert rewards == [0.0] * 6 + [1.0] * 2
    assert lines[-1] == "Collected 8 rollouts"


def test_base_urls_none_uses_an_extra_server_started_first():
    fake = FakeOpenAIServer("local_fake", SUMS)  # port 0: its URL is known only once started
    with GymIntegration("fake-model", None, EXACT, head_server_port=0, extra_servers=[fake]) as gym:
        assert gym.base_urls == [fake.base_url] and fake.port > 0
        records = gym.collect([sum_row(q, a) for q, a in SUMS])
    assert [r["reward"] for r in records] == [1.0] * 4
    assert fake.requests["/v1/chat/completions"] == 4
    with pytest.raises(ConfigError, match="base_urls=None needs an OpenAI-compatible endpoint"):
        GymIntegration("fake-model", None, EXACT, head_server_port=0)
