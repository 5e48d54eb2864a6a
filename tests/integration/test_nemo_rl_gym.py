"""NemoGymDropIn (NeMo-RL's Gym-path actor, gym_plugin.nemo_rl.gym) driven without Ray or NeMo-RL: its async
methods called the way NeMo-RL's actor calls reach them, against real Gym servers and a scripted policy endpoint
on 127.0.0.1 reached over HTTP only (like vLLM in another process). tests/peers/nemo_rl/ runs NeMo-RL's own
rollout functions on it under Ray.

The fake's tokenization is documented (gym_plugin/testing/fake_openai.py): a message is ``[IM_START=1, role id]
+ one id per whitespace-separated word + [IM_END=2]`` (user 4, assistant 5, tool 6, tools 8), a word's id is
``crc32(word) % VOCAB + 16`` (VOCAB = 600 here, so the tiny tokenizer can decode every id), the generation
prompt is ``[1, 5]``, a generation is its words + ``[2]``, and the log-prob of generated id t is
``-0.1 * (t % 7 + 1)``. Expected ids below are built from those rules.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

from gym_plugin.errors import ConfigError, GymPluginError, MissingTokenIdsError, ProtocolError
from gym_plugin.nemo_rl.gym import (
    NemoGymDropIn,
    RolloutDataError,
    RolloutInfraError,
    is_infra_failure,
    nemo_rl_result,
    turn_flags,
)
from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.testing.background import BackgroundServer
from gym_plugin.testing.fake_openai import Behaviour, FakeOpenAIServer, ToolCall, Turn
from gym_plugin.models.tiny import build_tiny_tokenizer
from gym_plugin.net import free_port

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 600
IM_START, IM_END, USER, ASSISTANT, TOOL, TOOLS = 1, 2, 4, 5, 6, 8
GEN_PROMPT = [IM_START, ASSISTANT]
PREFIX = "timing/rollout"


def wid(word: str) -> int:
    return zlib.crc32(word.encode()) % VOCAB + 16


def words(text: str) -> list[int]:
    return [wid(w) for w in text.split()]


def logprob(t: int) -> float:
    return -0.1 * (t % 7 + 1)


CALC_SCRIPT = Behaviour(turns=[
    Turn(tool_calls=[ToolCall("multiply", {"a": 3, "b": 4})]),  # 3 * 4 = 12
    Turn(tool_calls=[ToolCall("add", {"a": 12, "b": 5})]),  # 12 + 5 = 17
    "The answer is \\boxed{17}.",
])
SCRIPT = [
    ("Compute", CALC_SCRIPT),
    ("SLOW", Behaviour(turns=["\\boxed{4}"], delay_s=1.0)),
    ("LONG", Behaviour(context_length_error=True)),  # vLLM's 400: no model output, no token ids (data)
    ("DOWN", Behaviour(fail_status=503, fail_times=99)),  # the endpoint keeps answering 503 (infrastructure)
    ("TOOLTEXT", "<tool_call> add {} </tool_call>"),  # a tool call written as text: never executed
]


def nemo_gym_config(base_url: str, **options) -> dict:
    """What NeMo-RL's spinup_nemo_gym_actor passes: model_name, base_urls, env.nemo_gym as
    initial_global_config_dict (here: our calculator YAML + an inline masking QA agent + NeMo-RL's own keys)."""
    return {
        "model_name": "fake-model",
        "base_urls": [base_url],
        "invalid_tool_call_patterns": None,
        "thinking_tags": None,
        "require_routed_experts": False,
        "routed_experts_dtype": "int16",
        "use_fastokens": False,
        "tokenizer_config": None,
        "initial_global_config_dict": {
            "config_paths": ["conf/gym/calculator.yaml"],  # relative: resolved against gym_plugin's checkout
            "gym_plugin": {"import_modules": ["gym_plugin.testing.masking"], **options},
            "qa": {"resources_servers": {"exact_match_masking": {}}},
            "qa_agent": {"responses_api_agents": {"simple_agent": {
                "resources_server": {"type": "resources_servers", "name": "qa"},
                "model_server": {"type": "responses_api_models", "name": "policy_model"}, "max_turns": 1}}},
            "collector": {"max_attempts": 1},  # a failing row fails at once
            "num_gpu_nodes": 0, "uv_cache_dir": "/nowhere",  # NeMo-RL's keys: not Gym config, ignored
        },
    }


def qa(text: str, expected: str = "4", rowidx: int = 0, **extra) -> dict:
    return {"responses_create_params": {"input": [{"role": "user", "content": text}]}, "expected_answer": expected,
            "agent_ref": {"name": "qa_agent"}, "_rowidx": rowidx, **extra}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def fake():
    with BackgroundServer(FakeOpenAIServer("fake", SCRIPT, port=free_port(), vocab_size=VOCAB,
                                           default="\\boxed{4}")) as f:
        yield f


@pytest.fixture(scope="module")
def dropin(fake, tokenizer):
    d = NemoGymDropIn(nemo_gym_config(fake.base_url))
    asyncio.run(d._spinup())
    d.set_tokenizer(tokenizer)
    yield d
    asyncio.run(d.shutdown())


async def stream(d: NemoGymDropIn, rows: list[dict], **kw) -> list[tuple]:
    return [item async for item in d.run_rollouts(rows, PREFIX, **kw)]


# ---- what NeMo-RL reads -----------------------------------------------------------------------------------------
async def test_single_turn_rows_stream_rowidx_results_and_timing_last(dropin, tokenizer):
    rows = [qa("What is 2+2?", rowidx=7), qa("What is 3+3?", "6", rowidx=3),
            qa("What is 2+2? once more", rowidx=5, flag_mask_sample=True)]
    out = await stream(dropin, rows)
    assert sorted(i for i, _, _ in out) == [3, 5, 7]  # NeMo-RL's _rowidx, not positions
    assert [t is None for _, _, t in out] == [True, True, False]  # timing only with the batch's last row
    timing = out[-1][2]
    assert set(timing) == {f"{PREFIX}/await_results", f"{PREFIX}/postprocess_results",
                           f"{PREFIX}/postprocess_results_pct"}
    by_idx = {i: r for i, r, _ in out}
    assert set(by_idx[7]) == {"message_log", "input_message_log", "full_result"}
    # rewards from the verifier: \boxed{4} == 4 -> 1, \boxed{4} != 6 -> 0
    assert [by_idx[i]["full_result"]["reward"] for i in (7, 3, 5)] == [1.0, 0.0, 1.0]

    log = by_idx[7]["message_log"]
    prompt = [IM_START, USER, *words("What is 2+2?"), IM_END, *GEN_PROMPT]
    gen = [wid("\\boxed{4}"), IM_END]
    assert [m["role"] for m in log] == ["user", "assistant"]
    assert log[0] == {"role": "user", "content": "", "token_ids": log[0]["token_ids"]}
    assert log[0]["token_ids"].tolist() == prompt and log[0]["token_ids"].dtype == torch.int64
    assert log[1]["token_ids"].tolist() == gen and log[1]["generation_logprobs"].dtype == torch.float32
    assert log[1]["generation_logprobs"].tolist() == pytest.approx([logprob(t) for t in gen])
    assert log[1]["content"] == "" and log[1]["is_invalid_tool_call"] is False
    assert log[1]["has_malformed_thinking"] is False
    assert by_idx[7]["input_message_log"] == log[:1]

    full = by_idx[7]["full_result"]
    item = [it for it in full["response"]["output"] if "generation_str" in it][0]
    assert not {"prompt_token_ids", "generation_token_ids", "generation_log_probs"} & set(item)
    assert item["prompt_str"] == tokenizer.decode(prompt) and item["generation_str"] == tokenizer.decode(gen)
    assert full["_rowidx"] == 7 and "_ng_task_index" not in full  # the row's own keys, not the collector's
    # the verifier's mask flag lands where NeMo-RL reads it; unflagged rows carry none
    assert by_idx[5]["full_result"]["instance_config"] == {"mask_sample": True}
    assert "instance_config" not in full


async def test_multi_turn_tool_rollout_is_one_spliced_sequence(dropin):
    row = {**calculator_row(3, 4, 5), "_rowidx": 0, "_ng_task_index": 42}
    ((idx, result, _),) = await stream(dropin, [row])
    assert idx == 0 and result["full_result"]["reward"] == 1.0  # (3 * 4) + 5 = 17 with both tools used
    assert result["full_result"]["_ng_task_index"] == 42  # NeMo-RL's prompt id survives
    log = result["message_log"]
    assert [m["role"] for m in log] == ["user", "assistant"] * 3
    call1 = ["<tool_call>", "multiply", '{"a":3,"b":4}', "</tool_call>"]
    call2 = ["<tool_call>", "add", '{"a":12,"b":5}', "</tool_call>"]
    gens = [[wid(w) for w in call1] + [IM_END], [wid(w) for w in call2] + [IM_END],
            words("The answer is \\boxed{17}.") + [IM_END]]
    assert [log[k]["token_ids"].tolist() for k in (1, 3, 5)] == gens
    for k in (1, 3, 5):
        assert log[k]["generation_logprobs"].tolist() == pytest.approx([logprob(t) for t in gens[k // 2]])
        # structured tool calls were executed: not invalid (NeMo-RL penalises only textual ones)
        assert log[k]["is_invalid_tool_call"] is False
    # between model calls: the tool result '{"result": 12}' (2 words), then the generation prompt
    assert log[2]["token_ids"].tolist() == [IM_START, TOOL, wid('{"result":'), wid("12}"), IM_END, *GEN_PROMPT]
    assert log[4]["token_ids"].tolist() == [IM_START, TOOL, wid('{"result":'), wid("17}"), IM_END, *GEN_PROMPT]
    prompt_text = row["responses_create_params"]["input"][0]["content"]
    first = log[0]["token_ids"].tolist()
    user_part = [IM_START, USER, *words(prompt_text), IM_END, *GEN_PROMPT]
    assert first[:2] == [IM_START, TOOLS] and first[-len(user_part):] == user_part
    # concatenated, the message log is exactly the last call's prompt + generation (= the fake's rendering)
    flat = torch.cat([m["token_ids"] for m in log]).tolist()
    assert flat[-len(gens[2]) - 7:] == [IM_START, TOOL, wid('{"result":'), wid("17}"), IM_END, *GEN_PROMPT,
                                        *gens[2]][-len(gens[2]) - 7:]
    assert len(flat) == sum(len(m["token_ids"]) for m in log)


async def test_textual_tool_call_is_flagged_invalid(dropin):
    ((_, result, _),) = await stream(dropin, [qa("TOOLTEXT please")])
    assert result["message_log"][1]["is_invalid_tool_call"] is True
    assert result["message_log"][1]["has_malformed_thinking"] is False


async def test_deduplicate_multimodal_flag_is_answered(dropin):
    ((_, result, _),) = await stream(dropin, [qa("What is 2+2?")], deduplicate_multimodal_data=True)
    assert result["_initial_multimodal_data_omitted"] is False  # text only: NeMo-RL reattaches nothing


# ---- failures: good rows first, then one typed failure -------------------------------------------------------------
async def test_failed_rows_are_never_yielded_and_raise_a_typed_failure_after_the_good_ones(dropin):
    rows = [qa("LONG question", rowidx=0), qa("DOWN question", rowidx=1), qa("What is 2+2?", rowidx=2)]
    got = []
    with pytest.raises(RolloutDataError) as info:  # a data failure among them: the batch is a data failure
        async for item in dropin.run_rollouts(rows, PREFIX):
            got.append(item)
    assert [i for i, _, _ in got] == [2]  # the good row was streamed; nothing for the failed ones
    msg = str(info.value)
    assert "2 of 3 NeMo-Gym rollouts failed (_rowidx [" in msg and "the other 1 were streamed" in msg
    assert "_rowidx 0 (agent qa_agent): no model call carries token ids" in msg
    assert "_rowidx 1 (agent qa_agent): http_status" in msg and "503" in msg

    with pytest.raises(RolloutInfraError, match=r"1 of 2 NeMo-Gym rollouts failed \(_rowidx \[4\]\)"):
        await stream(dropin, [qa("DOWN again", rowidx=4), qa("What is 2+2?", rowidx=6)])


def test_failure_classification_matches_nemo_rl_http_rule():
    assert is_infra_failure({"kind": "timeout"}) and is_infra_failure({"kind": "connection"})
    for status, infra in ((500, True), (503, True), (429, True), (408, True), (400, False), (404, False)):
        failure = {"kind": "http_status", "last_error": f"POST http://x/run answered HTTP {status}: ..."}
        assert is_infra_failure(failure) is infra
    for kind in ("verifier", "malformed_response", "agent", "invalid_row"):
        assert not is_infra_failure({"kind": kind})


async def test_rows_nemo_rl_cannot_map_back_are_refused(dropin):
    with pytest.raises(ProtocolError, match="no integer '_rowidx'"):
        await stream(dropin, [{k: v for k, v in qa("x").items() if k != "_rowidx"}])
    with pytest.raises(ProtocolError, match="must not be empty"):
        await stream(dropin, [])
    with pytest.raises(RolloutDataError, match="math_agnet"):  # unknown agent: the collector refuses the batch
        await stream(dropin, [{**qa("x"), "agent_ref": {"name": "math_agnet"}}])


# ---- concurrency and a policy that starts later -----------------------------------------------------------------
async def test_two_concurrent_calls_overlap(dropin):
    started = time.perf_counter()
    a, b = await asyncio.gather(stream(dropin, [qa("SLOW one", rowidx=0)]), stream(dropin, [qa("SLOW two", rowidx=0)]))
    wall = time.perf_counter() - started
    assert [r["full_result"]["reward"] for _, r, _ in a + b] == [1.0, 1.0]
    assert wall < 1.8, f"two 1-second rollouts took {wall:.2f} s together: the calls did not overlap"


async def test_waits_for_a_policy_endpoint_that_starts_later_and_times_out_clearly(tokenizer):
    port = free_port()
    d = NemoGymDropIn(nemo_gym_config(f"http://127.0.0.1:{port}/v1", policy_wait_s=20))
    await d._spinup()  # nothing listens yet: spinup must not probe (NeMo-RL starts vLLM's servers meanwhile)
    d.set_tokenizer(tokenizer)
    fake = BackgroundServer(FakeOpenAIServer("late", SCRIPT, port=port, vocab_size=VOCAB, default="\\boxed{4}"))
    timer = threading.Timer(1.5, fake.start)
    timer.start()
    try:
        started = time.perf_counter()
        out = await stream(d, [qa("What is 2+2?")])
        assert out[0][1]["full_result"]["reward"] == 1.0 and time.perf_counter() - started >= 1.0
    finally:
        timer.join()
        fake.stop()
        await d.shutdown()

    dead = f"http://127.0.0.1:{free_port()}/v1"
    d = NemoGymDropIn(nemo_gym_config(dead, policy_wait_s=1.5))
    await d._spinup()
    d.set_tokenizer(tokenizer)
    try:
        with pytest.raises(RolloutInfraError, match="did not answer GET /models within 1.5 s") as info:
            await stream(d, [qa("What is 2+2?")])
        assert dead in str(info.value) and "policy_wait_s" in str(info.value)
    finally:
        await d.shutdown()


# ---- lifecycle and config ---------------------------------------------------------------------------------------
async def test_health_check_and_lifecycle_errors(fake, tokenizer):
    d = NemoGymDropIn(nemo_gym_config(fake.base_url))
    with pytest.raises(GymPluginError, match="_spinup"):
        await d.health_check()
    await d._spinup()
    await d._spinup()  # idempotent
    try:
        await d.health_check()  # every server answers GET /health over HTTP
        with pytest.raises(GymPluginError, match="set_tokenizer"):
            await stream(d, [qa("What is 2+2?")])
        with pytest.raises(ProtocolError, match="GymEnvironment"):
            d.step([], [])
    finally:
        await d.shutdown()
    await d.shutdown()  # twice is fine
    with pytest.raises(GymPluginError, match="was shut down"):
        await stream(d, [qa("What is 2+2?")])


async def test_unsupported_nemo_gym_config_is_refused_with_every_problem():
    cfg = nemo_gym_config("http://127.0.0.1:9/v1", policy_wait_sec=5)
    cfg.update(base_urls=[], require_routed_experts=True, tokenizer_config={"name": "vlm"})
    with pytest.raises(ConfigError) as info:
        await NemoGymDropIn(cfg)._spinup()
    problems = info.value.problems
    assert len(problems) == 4
    assert any(p.startswith("NemoGymConfig.base_urls") for p in problems)
    assert any("router_replay" in p for p in problems) and any("multimodal" in p for p in problems)
    assert any("policy_wait_sec: unknown option. Did you mean 'policy_wait_s'?" in p for p in problems)


# ---- the conversion on hand-built records -----------------------------------------------------------------------
def _record(*calls, text: str = "x") -> dict:
    output = []
    for prompt, gen, lps in calls:
        output.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}],
                       "prompt_token_ids": prompt, "generation_token_ids": gen, "generation_log_probs": lps})
    return {"reward": 1.0, "response": {"output": output}}


def test_conversion_splices_and_rejects_drift_and_bad_token_fields(tokenizer):
    ok = nemo_rl_result(_record(([10, 11], [12, 13], [-0.1, -0.2]), ([10, 11, 12, 13, 14], [15], [-0.3])), tokenizer)
    # context [14] between the calls, nothing re-tokenized
    assert [m["token_ids"].tolist() for m in ok["message_log"]] == [[10, 11], [12, 13], [14], [15]]
    assert ok["message_log"][3]["generation_logprobs"].tolist() == pytest.approx([-0.3])
    # call 2's prompt [10, 11, 99, ...] should start with call 1's prompt + generation [10, 11, 12, 13]
    drift = _record(([10, 11], [12, 13], [-0.1, -0.2]), ([10, 11, 99, 13, 14], [15], [-0.3]))
    with pytest.raises(ProtocolError, match="first difference at token 2 of 4"):
        nemo_rl_result(drift, tokenizer, where="_rowidx 3")
    with pytest.raises(MissingTokenIdsError, match=r"want 2"):
        nemo_rl_result(_record(([10, 11], [12, 13], [-0.1])), tokenizer)
    with pytest.raises(ProtocolError, match="NaN generation log-probs"):
        nemo_rl_result(_record(([10, 11], [12, 13], [-0.1, float("nan")])), tokenizer)
    with pytest.raises(MissingTokenIdsError, match="no model call carries token ids"):
        nemo_rl_result({"reward": 0.0, "response": {"output": [{"type": "message", "content": []}]}}, tokenizer)


def test_turn_flags_follow_nemo_rl_rules():
    def msg(text):
        return {"type": "message", "content": [{"type": "output_text", "text": text}]}

    def reasoning(text):
        return {"type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}

    assert turn_flags(msg("The answer is 4.")) == (False, False)
    assert turn_flags(msg("<tool_call>{}</tool_call>")) == (True, False)  # a tool call nobody executed
    assert turn_flags(msg("<think>hmm</think> 4")) == (False, True)  # thinking leaked into the answer
    assert turn_flags(reasoning("<think>one pass</think>")) == (False, False)  # one pair is expected
    assert turn_flags(reasoning("<think>a</think><think>b</think>")) == (False, True)
    assert turn_flags({"type": "function_call", "name": "add", "arguments": "{}"}) == (False, False)
    assert turn_flags(msg("CALL add"), invalid_tool_call_patterns=["CALL "]) == (True, False)
    assert turn_flags(msg("<reason>x</reason>"), thinking_tags=["<reason>", "</reason>"]) == (False, True)


# ---- a real model: the message log is what NeMo-RL trains on ---------------------------------------------------------
async def test_message_log_logprobs_match_teacher_forcing_on_the_embedded_tiny_model(tokenizer):
    """NeMo-RL concatenates the message log's token_ids and trains on the assistant tokens against
    generation_logprobs: on a real (tiny, fp32) model served by the embedded policy, those log-probs must equal
    a teacher-forced forward pass over the concatenated ids at the assistant positions."""
    from gym_plugin.servers.embedded import EmbeddedPolicyServer
    from gym_plugin.models.tiny import build_tiny_model

    model = build_tiny_model(tokenizer)
    server = EmbeddedPolicyServer(model=model, tokenizer=tokenizer, served_model_name="tiny", port=free_port())
    rows = [{"responses_create_params": {"input": [{"role": "user", "content": "What is 2 + 3?"}],
                                         "max_output_tokens": 12, "temperature": 1.0},
             "expected_answer": "5", "agent_ref": {"name": "qa_agent"}, "_rowidx": i} for i in range(2)]
    with BackgroundServer(server) as policy:
        d = NemoGymDropIn({**nemo_gym_config(policy.base_url), "model_name": "tiny"})
        await d._spinup()
        d.set_tokenizer(tokenizer)
        try:
            out = await stream(d, rows)
        finally:
            await d.shutdown()
    assert sorted(i for i, _, _ in out) == [0, 1]
    for _, r, _ in out:
        log = r["message_log"]
        assert [m["role"] for m in log] == ["user", "assistant"]
        ids = torch.cat([m["token_ids"] for m in log])  # [T]
        n_prompt, n_gen = len(log[0]["token_ids"]), len(log[1]["token_ids"])
        assert 0 < n_gen <= 12
        with torch.no_grad():
            logits = model(ids[None]).logits[0].float()  # [T, V]
        # token t is predicted by position t - 1: the generation's log-probs come from rows n_prompt-1 .. T-2
        lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]  # [T - 1]
        teacher = lp[n_prompt - 1:]  # [G]
        assert teacher.shape == (n_gen,)
        assert (teacher - log[1]["generation_logprobs"]).abs().max().item() < 1e-4
        assert r["full_result"]["reward"] in (0.0, 1.0)
