"""Server-level tests: fake OpenAI endpoint -> policy model server -> agent -> resource servers, for real.

Every server is started on 127.0.0.1 (an ephemeral port) and driven both over HTTP (``allow_local=False``) and
through direct in-process calls (``allow_local=True``). No mocks: the "model" is the scripted
`FakeOpenAIServer`, whose tokenization is known (see gym_plugin/testing/fake_openai.py): a prompt is
``[IM_START=1, role] + one id per word + [IM_END=2]`` per message, then ``[1, ASSISTANT=5]``; a generation is one
id per word + ``[2]``; the log-prob of id t is ``LOG_PROBS[t % 7]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

import pytest
from omegaconf import OmegaConf

from gym_plugin.servers.base import Directory
from gym_plugin.errors import ConfigError, MissingTokenIdsError
from gym_plugin.http import HTTPStatusError, Transport
from gym_plugin.servers.registry import SERVER_REGISTRY, get_server_class
from gym_plugin.servers.agent import AgentConfig, AgentServer
from gym_plugin.servers.head import HeadServer
from gym_plugin.servers.policy.config import PolicyModelConfig
from gym_plugin.servers.policy.server import PolicyModelServer
from gym_plugin.servers.resources.base import ResourceServer, ResourceServerConfig
from gym_plugin.servers.resources.calculator import CalculatorResourceServer, calculator_row
from gym_plugin.servers.resources.exact_match import ExactMatchResourceServer
from gym_plugin.servers.resources.math_verify import MathVerifyResourceServer
from gym_plugin.testing.fake_openai import LOG_PROBS, Behaviour, FakeOpenAIServer, ToolCall, Turn
from gym_plugin.net import free_port

pytestmark = pytest.mark.timeout(60)

BOTH_PATHS = pytest.mark.parametrize("allow_local", [False, True], ids=["http", "direct"])

CALC_SCRIPT = Behaviour(
    turns=[
        Turn(tool_calls=[ToolCall("multiply", {"a": 3, "b": 4})]),  # 3 * 4 = 12
        Turn(tool_calls=[ToolCall("add", {"a": 12, "b": 5})]),  # 12 + 5 = 17
        "The answer is \\boxed{17}.",
    ]
)


def row(text: str, expected: str | None = "4", agent: str = "agent") -> dict:
    r = {"responses_create_params": {"input": [{"role": "user", "content": text}]}, "agent_ref": {"name": agent}}
    if expected is not None:
        r["expected_answer"] = expected
    return r


class FailingVerifier(ResourceServer):
    """A verifier with a bug: /verify always raises."""

    async def verify_row(self, row, response, state):
        raise RuntimeError("verifier crashed on purpose")


@asynccontextmanager
async def stack(script=None, *, n_backends=1, resource_cls=ExactMatchResourceServer, resource_config=None,
                policy_kw=None, agent_kw=None, fake_kw=None, base_urls=None):
    """fakes -> policy -> resource -> agent, started on 127.0.0.1; yields a namespace; stops everything."""
    fakes = [FakeOpenAIServer(f"fake{i}", script, **(fake_kw or {})) for i in range(n_backends)]
    started = []
    try:
        for f in fakes:
            await f.start()
            started.append(f)
        d = Directory()
        urls = base_urls or [f.base_url for f in fakes]
        pkw = {"backoff_s": 0.01, **(policy_kw or {})}
        policy = PolicyModelServer("policy", PolicyModelConfig(base_url=urls if len(urls) > 1 else urls[0],
                                                               model="fake-model", **pkw), d)
        res = resource_cls("res", resource_config or resource_cls.Config(), d)
        agent = AgentServer("agent", AgentConfig(resources_server={"type": "resources_servers", "name": "res"},
                                                 model_server={"type": "responses_api_models", "name": "policy"},
                                                 **(agent_kw or {})), d)
        for s in (policy, res, agent):
            await s.start()
            started.append(s)
            d.set(s.name, s.url)

        class NS:
            pass

        ns = NS()
        ns.fakes, ns.fake, ns.policy, ns.res, ns.agent, ns.directory = fakes, fakes[0], policy, res, agent, d
        yield ns
    finally:
        for s in reversed(started):
            await s.stop()


async def run_row(ns, r: dict, allow_local: bool) -> dict:
    t = Transport(allow_local=allow_local)
    try:
        return (await t.post(f"{ns.agent.url}/run", r)).data
    finally:
        await t.close()


def model_items(response: dict) -> list[dict]:
    """Output items that end a model call (they carry the token fields)."""
    return [it for it in response["output"] if "prompt_token_ids" in it]


# ---- single turn ------------------------------------------------------------------------------------------------
@BOTH_PATHS
def test_single_turn_exact_match_rewards_and_tokens(allow_local):
    async def body():
        script = [("2+2", "The answer is \\boxed{4}."), ("3+3", "\\boxed{7}")]
        async with stack(script) as ns:
            good = await run_row(ns, row("What is 2+2?", "4"), allow_local)
            bad = await run_row(ns, row("What is 3+3?", "6"), allow_local)
        assert good["reward"] == 1.0 and good["extracted_answer"] == "4"
        assert bad["reward"] == 0.0 and bad["extracted_answer"] == "7"  # 3+3 is 6, the model said 7
        assert good["expected_answer"] == "4" and good["agent_ref"] == {"name": "agent"}  # row echoed
        (item,) = good["response"]["output"]
        assert item["type"] == "message" and item["content"][0]["text"] == "The answer is \\boxed{4}."
        # prompt: [1, user=4] + 3 words ("What", "is", "2+2?") + [2] + generation prompt [1, assistant=5]
        p = item["prompt_token_ids"]
        assert len(p) == 2 + 3 + 1 + 2 and p[:2] == [1, 4] and p[-3:] == [2, 1, 5]
        # generation: 4 words ("The", "answer", "is", "\boxed{4}.") + [IM_END=2]
        g = item["generation_token_ids"]
        assert len(g) == 5 and g[-1] == 2
        assert item["generation_log_probs"] == [LOG_PROBS[t % 7] for t in g]
        assert good["response"]["usage"] == {"input_tokens": 8, "output_tokens": 5, "total_tokens": 13}

    asyncio.run(body())


@BOTH_PATHS
def test_single_turn_math_rewards(allow_local):
    async def body():
        script = [
            ("half", "So it is \\boxed{\\frac{1}{2}}."),  # symbolic path: 1/2 == 0.5
            ("thousand", "\\boxed{1,000}"),  # fast path: thousands separator, 1000 == 1000
            ("pi", "\\boxed{3}"),  # 3 != 3.14
            ("root", "\\boxed{2\\sqrt{2}}"),  # symbolic: 2*sqrt(2) == sqrt(8)
        ]
        async with stack(script, resource_cls=MathVerifyResourceServer) as ns:
            rewards = {
                k: (await run_row(ns, row(f"Question {k}?", exp), allow_local))["reward"]
                for k, exp in [("half", "0.5"), ("thousand", "1000"), ("pi", "3.14"), ("root", "\\sqrt{8}")]
            }
        assert rewards == {"half": 1.0, "thousand": 1.0, "pi": 0.0, "root": 1.0}

    asyncio.run(body())


def test_math_fast_path_costs_microseconds():
    async def body():
        server = MathVerifyResourceServer("m", MathVerifyResourceServer.Config(), Directory())
        resp = {"output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": "so \\boxed{42}"}]}]}
        r = {"expected_answer": "42"}
        t0 = time.perf_counter()
        for _ in range(1000):
            out = await server.verify_row(r, resp, None)
        per_call = (time.perf_counter() - t0) / 1000
        assert out == {"reward": 1.0, "extracted_answer": "42"}
        assert per_call < 200e-6, f"fast path took {per_call * 1e6:.0f} us per call"

    asyncio.run(body())


# ---- multi-turn tools -------------------------------------------------------------------------------------------
@BOTH_PATHS
def test_calculator_multi_turn_tokens_on_every_turn(allow_local):
    async def body():
        async with stack(CALC_SCRIPT, resource_cls=CalculatorResourceServer) as ns:
            out = await run_row(ns, calculator_row(3, 4, 5), allow_local)
            sessions_left = ns.res.session_count
            last_chat = ns.fake.last_request
        assert out["reward"] == 1.0 and out["extracted_answer"] == "17"  # 3 * 4 + 5 = 17
        assert out["tools_used"] == ["multiply", "add"] and out["tool_calls"] == 2
        kinds = [it["type"] for it in out["response"]["output"]]
        assert kinds == ["function_call", "function_call_output", "function_call", "function_call_output", "message"]
        outputs = [json.loads(it["output"]) for it in out["response"]["output"] if it["type"] == "function_call_output"]
        assert outputs == [{"result": 12}, {"result": 17}]
        turns = model_items(out["response"])
        assert len(turns) == 3  # one per model call, each with all three token fields
        for t in turns:
            assert len(t["generation_token_ids"]) == len(t["generation_log_probs"]) > 0
        # Prefix continuity: turn k+1's prompt starts with turn k's prompt + generation; in between comes the
        # tool result segment [1, tool=6, <2 words: '{"result":' '12}'>, 2] and the generation prompt [1, 5].
        for a, b in zip(turns, turns[1:]):
            seen = a["prompt_token_ids"] + a["generation_token_ids"]
            assert b["prompt_token_ids"][: len(seen)] == seen
            rest = b["prompt_token_ids"][len(seen):]
            # [1, 6] + 2 words + [2] + [1, 5] = 7 ids
            assert len(rest) == 2 + 2 + 1 + 2 and rest[:2] == [1, 6] and rest[-3:] == [2, 1, 5]
        # token continuity: earlier turns' ids are passed on, on the history assistant messages
        assistants = [m for m in last_chat["messages"] if m["role"] == "assistant"]
        assert [m["prompt_token_ids"] for m in assistants] == [t["prompt_token_ids"] for t in turns[:2]]
        assert sessions_left == 0  # the session was dropped at /verify

    asyncio.run(body())


def test_calculator_right_answer_without_tools_scores_zero():
    async def body():
        async with stack("\\boxed{17}", resource_cls=CalculatorResourceServer) as ns:
            out = await run_row(ns, calculator_row(3, 4, 5), True)
        assert out["answer_correct"] is True and out["tools_used"] == [] and out["reward"] == 0.0

    asyncio.run(body())


def test_bad_tool_calls_are_fed_back_to_the_model():
    async def body():
        script = Behaviour(turns=[
            Turn(tool_calls=[ToolCall("divide", {"a": 1, "b": 2}),  # not a tool of the row
                             ToolCall("add", '{"a": 1,'),  # broken JSON
                             ToolCall("add", {"a": "x", "b": 1})]),  # rejected by the tool (HTTP 400)
            "\\boxed{17}",
        ])
        async with stack(script, resource_cls=CalculatorResourceServer) as ns:
            out = await run_row(ns, calculator_row(3, 4, 5), False)
        errs = [it["output"] for it in out["response"]["output"] if it["type"] == "function_call_output"]
        assert len(errs) == 3 and all(e.startswith("Error:") for e in errs)
        assert "unknown tool 'divide'" in errs[0] and "not valid JSON" in errs[1] and "must be a number" in errs[2]
        assert out["tool_calls"] == 0 and out["reward"] == 0.0  # no tool succeeded: required tools unused

    asyncio.run(body())


def test_max_turns_stops_the_loop():
    async def body():
        forever = Behaviour(turns=[Turn(tool_calls=[ToolCall("add", {"a": 1, "b": 1})])])
        async with stack(forever, resource_cls=CalculatorResourceServer, agent_kw={"max_turns": 3}) as ns:
            out = await run_row(ns, calculator_row(3, 4, 5), True)
            calls = ns.fake.requests["/v1/chat/completions"]
        assert calls == 3 and out["tool_calls"] == 3 and out["reward"] == 0.0

    asyncio.run(body())


# ---- token styles -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["A", "B"])
def test_token_styles_give_the_same_tokens(style):
    async def body():
        async with stack(CALC_SCRIPT, resource_cls=CalculatorResourceServer, policy_kw={"token_style": style}) as ns:
            out = await run_row(ns, calculator_row(3, 4, 5), False)
            sent = ns.fake.last_request
            tokenize_calls = ns.fake.requests["/tokenize"]
            expected_prompt = ns.fake.prompt_ids(sent["messages"], sent["tools"])
        assert sent["logprobs"] is True and sent["top_logprobs"] == 0
        if style == "A":
            assert sent["return_tokens_as_token_ids"] is True and "return_token_ids" not in sent
            assert tokenize_calls == 3  # one /tokenize per model call
        else:
            assert sent["return_token_ids"] is True and "return_tokens_as_token_ids" not in sent
            assert tokenize_calls == 0
        turns = model_items(out["response"])
        assert out["reward"] == 1.0 and len(turns) == 3
        assert turns[-1]["prompt_token_ids"] == expected_prompt

    asyncio.run(body())


def test_missing_token_ids_names_backend_and_fix():
    async def body():
        async with stack("\\boxed{4}", fake_kw={"token_ids": False}) as ns:
            with pytest.raises(HTTPStatusError) as ei:
                await run_row(ns, row("What is 2+2?"), False)
            base = ns.fake.base_url
        msg = ei.value.body  # the full error body (the exception text cuts it at 300 chars)
        assert ei.value.status == 400 and MissingTokenIdsError.__name__ in msg
        assert base in msg and "token_style" in msg and "return_token_ids" in msg

    asyncio.run(body())


# ---- routing ----------------------------------------------------------------------------------------------------
def test_two_base_urls_round_robin_and_sticky_rollouts():
    async def body():
        async with stack(CALC_SCRIPT, n_backends=2, resource_cls=CalculatorResourceServer) as ns:
            for _ in range(4):
                out = await run_row(ns, calculator_row(3, 4, 5), True)
                assert out["reward"] == 1.0
            counts = [f.requests["/v1/chat/completions"] for f in ns.fakes]
        # 4 rollouts x 3 model calls, rollouts alternate backends and stay on one: 6 + 6 (not e.g. 7 + 5)
        assert counts == [6, 6]

    asyncio.run(body())


def test_least_busy_spreads_concurrent_rollouts():
    async def body():
        slow = Behaviour(turns=["\\boxed{4}"], delay_s=0.05)
        async with stack(slow, n_backends=2, policy_kw={"routing": "least_busy"}) as ns:
            outs = await asyncio.gather(*[run_row(ns, row(f"What is 2+2? #{i}"), True) for i in range(6)])
            counts = [f.requests["/v1/chat/completions"] for f in ns.fakes]
        assert [o["reward"] for o in outs] == [1.0] * 6
        assert counts == [3, 3]  # started together: each pick goes to the backend with fewer in flight

    asyncio.run(body())


# ---- failures ---------------------------------------------------------------------------------------------------
@BOTH_PATHS
def test_5xx_burst_is_retried_through(allow_local):
    async def body():
        burst = Behaviour(turns=["\\boxed{4}"], fail_status=503, fail_times=2)
        async with stack([("2+2", burst)], policy_kw={"max_attempts": 3}) as ns:
            out = await run_row(ns, row("What is 2+2?"), allow_local)
            calls = ns.fake.requests["/v1/chat/completions"]
        assert out["reward"] == 1.0 and calls == 3  # 2 failures + 1 success

    asyncio.run(body())


def test_5xx_burst_longer_than_retries_fails_naming_the_backend():
    async def body():
        burst = Behaviour(turns=["\\boxed{4}"], fail_status=500, fail_times=5)
        async with stack([("2+2", burst)], policy_kw={"max_attempts": 2}) as ns:
            with pytest.raises(HTTPStatusError) as ei:
                await run_row(ns, row("What is 2+2?"), False)
            base = ns.fake.base_url
        assert ei.value.status == 502 and f"{base}/chat/completions" in str(ei.value)
        assert "after 2 attempt(s)" in str(ei.value)

    asyncio.run(body())


@BOTH_PATHS
@pytest.mark.parametrize("token_mode,route", [("chat", "/chat/completions"), ("completions", "/completions"),
                                              ("auto", "/models")])
def test_unreachable_backend_error_names_the_url(allow_local, token_mode, route):
    async def body():
        dead = f"http://127.0.0.1:{free_port()}/v1"
        kw = {"max_attempts": 2, "token_mode": token_mode, "tokenizer": "tiny"}
        async with stack("x", base_urls=[dead], policy_kw=kw) as ns:
            with pytest.raises(HTTPStatusError) as ei:
                await run_row(ns, row("What is 2+2?"), allow_local)
        # auto mode first asks GET /models which backend it is: that is the request that fails
        assert ei.value.status == 502 and f"{dead}{route}" in str(ei.value) and "2 attempt(s)" in str(ei.value)

    asyncio.run(body())


@BOTH_PATHS
def test_dropped_connection_is_retried_then_reported(allow_local):
    async def body():
        drop = Behaviour(drop_connection=True)
        async with stack([("2+2", drop)], policy_kw={"max_attempts": 2}) as ns:
            with pytest.raises(HTTPStatusError) as ei:
                await run_row(ns, row("What is 2+2?"), allow_local)
            calls = ns.fake.requests["/v1/chat/completions"]
        assert calls == 2 and ei.value.status == 502 and ns.fake.base_url in str(ei.value)

    asyncio.run(body())


def test_malformed_backend_reply_is_an_error():
    async def body():
        async with stack([("2+2", Behaviour(malformed=True))]) as ns:
            with pytest.raises(HTTPStatusError) as ei:
                await run_row(ns, row("What is 2+2?"), False)
        assert "not JSON" in str(ei.value)

    asyncio.run(body())


@BOTH_PATHS
def test_context_length_400_gives_incomplete_response(allow_local):
    async def body():
        async with stack([("2+2", Behaviour(context_length_error=True))]) as ns:
            out = await run_row(ns, row("What is 2+2?"), allow_local)
            calls = ns.fake.requests["/v1/chat/completions"]
        assert calls == 1  # a 400 is not retried
        assert out["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
        assert out["response"]["output"] == [] and out["reward"] == 0.0

    asyncio.run(body())


@BOTH_PATHS
def test_verifier_failure_is_an_error_not_reward_zero(allow_local):
    async def body():
        async with stack("\\boxed{4}") as ns:  # exact_match needs expected_answer: this row has none
            with pytest.raises(HTTPStatusError) as e1:
                await run_row(ns, row("What is 2+2?", expected=None), allow_local)
        async with stack("\\boxed{4}", resource_cls=FailingVerifier, resource_config=ResourceServerConfig()) as ns:
            with pytest.raises(HTTPStatusError) as e2:
                await run_row(ns, row("What is 2+2?"), allow_local)
        for e in (e1, e2):
            assert e.value.status == 500 and "VerifierError:" in str(e.value)
        assert "expected_answer" in str(e1.value) and "verifier crashed on purpose" in str(e2.value)

    asyncio.run(body())


def test_session_bound_evicts_oldest():
    async def body():
        res = CalculatorResourceServer("calc", CalculatorResourceServer.Config(max_sessions=2), Directory())
        await res.start()
        try:
            sids = [(await res.dispatch_local("POST", "/seed_session", {})).session_id for _ in range(3)]
            assert res.session_count == 2
            with pytest.raises(HTTPStatusError) as ei:  # the first session was evicted
                await res.dispatch_local("POST", "/add", {"a": 1, "b": 2}, session_id=sids[0])
            assert ei.value.status == 400 and "unknown session" in str(ei.value)
            r = await res.dispatch_local("POST", "/add", {"a": 1, "b": 2}, session_id=sids[2])
            assert r.data == {"result": 3}
        finally:
            await res.stop()

    asyncio.run(body())


# ---- agent /v1/responses, head server, registry -----------------------------------------------------------------
def test_agent_responses_route_runs_tools_without_verify():
    async def body():
        async with stack(CALC_SCRIPT, resource_cls=CalculatorResourceServer) as ns:
            t = Transport(allow_local=False)
            params = calculator_row(3, 4, 5)["responses_create_params"]
            resp = (await t.post(f"{ns.agent.url}/v1/responses", params)).data
            await t.close()
        assert resp["object"] == "response" and "reward" not in resp
        assert [it["type"] for it in resp["output"]].count("function_call") == 2

    asyncio.run(body())


def test_head_server_serves_parseable_yaml():
    async def body():
        cfg = {"policy_model_name": "m", "policy_base_url": ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"],
               "head_server": {"host": "127.0.0.1", "port": 0},
               "policy_model": {"responses_api_models": {"vllm_model": {"base_url": "${policy_base_url}",
                                                                        "host": "127.0.0.1", "port": 123}}}}
        head = HeadServer(cfg)
        await head.start()
        try:
            t = Transport(allow_local=False)
            raw = await (await t.session()).get(f"{head.url}/global_config_dict_yaml")
            text = await raw.text()
            await t.close()
        finally:
            await head.stop()
        parsed = OmegaConf.create(json.loads(text))
        assert parsed.policy_model.responses_api_models.vllm_model.port == 123
        # interpolations are resolved before serving
        assert list(parsed.policy_model.responses_api_models.vllm_model.base_url) == cfg["policy_base_url"]

    asyncio.run(body())


def test_registry_names_and_errors():
    assert get_server_class("resources_servers", "math_verify") is MathVerifyResourceServer
    assert SERVER_REGISTRY[("responses_api_agents", "simple_agent")] is AgentServer
    with pytest.raises(ConfigError, match="Did you mean 'exact_match'"):
        get_server_class("resources_servers", "exact_mach")
    with pytest.raises(ConfigError, match="Did you mean 'resources_servers'"):
        get_server_class("resource_servers", "exact_match")


def test_config_errors_name_field_value_and_fix():
    with pytest.raises(ConfigError) as ei:
        PolicyModelConfig(base_url="localhost:8000", routing="round_robbin", token_style="C")
    text = str(ei.value)
    assert "3 problem(s)" in text and "Did you mean 'round_robin'" in text and "'localhost:8000'" in text
    with pytest.raises(ConfigError, match="max_turns=0"):
        AgentConfig(resources_server="r", model_server="p", max_turns=0)


def test_math_symbolic_check_works_off_the_main_thread():
    # signal.alarm only works in the main thread: off it, the server runs math_verify in a worker thread.
    import threading

    server = MathVerifyResourceServer("m", MathVerifyResourceServer.Config(), Directory())
    resp = {"output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "\\boxed{\\frac{3}{4}}"}]}]}
    results = []
    th = threading.Thread(target=lambda: results.append(
        asyncio.run(server.verify_row({"expected_answer": "0.75"}, resp, None))))
    th.start()
    th.join(30)
    assert results and results[0]["reward"] == 1.0  # 3/4 == 0.75


def test_finish_reason_length_is_incomplete_and_stops_the_agent():
    async def body():
        cut = Behaviour(turns=[Turn(text="partial", tool_calls=[ToolCall("add", {"a": 1, "b": 2})],
                                    finish_reason="length")])
        async with stack(cut, resource_cls=CalculatorResourceServer) as ns:
            out = await run_row(ns, calculator_row(3, 4, 5), True)
            calls = ns.fake.requests["/v1/chat/completions"]
        assert calls == 1 and out["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
        assert out["tool_calls"] == 0  # the agent stopped before running the tool call of a cut-off turn
        assert "generation_token_ids" in out["response"]["output"][-1]  # the cut-off turn keeps its tokens

    asyncio.run(body())


def test_policy_version_and_sampling_params_reach_the_items_and_backend():
    async def body():
        async with stack("\\boxed{4}", fake_kw={"policy_version": 7},
                         agent_kw={"extra_params": {"temperature": 0.5, "max_output_tokens": 32}}) as ns:
            out = await run_row(ns, row("What is 2+2?"), False)
            sent = ns.fake.last_request
        assert out["response"]["output"][-1]["policy_version"] == 7
        assert sent["temperature"] == 0.5 and sent["max_tokens"] == 32 and sent["model"] == "fake-model"

    asyncio.run(body())


def test_chat_completions_passthrough():
    async def body():
        async with stack("hello there") as ns:
            t = Transport(allow_local=False)
            reply = (await t.post(f"{ns.policy.url}/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "hi"}], "return_token_ids": True})).data
            await t.close()
        assert reply["choices"][0]["message"]["content"] == "hello there"
        assert reply["model"] == "fake-model"  # filled in by the policy server
        assert reply["prompt_token_ids"][:2] == [1, 4] and len(reply["choices"][0]["token_ids"]) == 3  # 2 words + end

    asyncio.run(body())


def test_model_cannot_reach_reserved_routes_as_tools():
    async def body():
        script = Behaviour(turns=[Turn(tool_calls=[ToolCall("verify", {}), ToolCall("../health", {}),
                                                   ToolCall("multiply", {"a": 3, "b": 4})]), "\\boxed{12}"])
        r = calculator_row(3, 4, 5)
        del r["responses_create_params"]["tools"]  # no tool list in the row: names are checked by the agent alone
        r["required_tools"] = ["multiply"]
        r["expected_answer"] = "12"
        async with stack(script, resource_cls=CalculatorResourceServer) as ns:
            out = await run_row(ns, r, True)
        outs = [it["output"] for it in out["response"]["output"] if it["type"] == "function_call_output"]
        assert outs == ["Error: unknown tool 'verify'", "Error: unknown tool '../health'", '{"result": 12}']
        assert out["reward"] == 1.0  # the session survived the attempted 'verify' call

    asyncio.run(body())


def test_token_style_none_for_backends_without_token_ids():
    async def body():
        async with stack(CALC_SCRIPT, resource_cls=CalculatorResourceServer, fake_kw={"token_ids": False},
                         policy_kw={"token_style": "none"}) as ns:
            out = await run_row(ns, calculator_row(3, 4, 5), False)
            sent = ns.fake.last_request
        assert out["reward"] == 1.0 and model_items(out["response"]) == []
        assert "logprobs" not in sent and all("prompt_token_ids" not in m for m in sent["messages"])

    asyncio.run(body())
