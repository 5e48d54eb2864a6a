"""The policy model server's token modes against a real embedded server (tiny model) on 127.0.0.1.

- completions: turn k+1's prompt is turn k's prompt + generation ids + only the appended tokens (hand-worked
  below), the model's ids are never re-tokenized, and process_rollouts sees no drift;
- chat: the backend re-renders the history, the same conversation drifts, and the drift is counted;
- auto picks chat for a backend that is not vLLM; constrained calls are marked and go through chat;
- the embedded server's /v1/completions log-probs match a teacher-forced forward pass.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from gym_plugin.models.chat_template import ChatRenderer
from gym_plugin.servers.base import Directory
from gym_plugin.http import HTTPStatusError, Transport
from gym_plugin.process import process_rollouts
from gym_plugin.servers.embedded import EmbeddedPolicyServer
from gym_plugin.servers.policy.config import PolicyModelConfig
from gym_plugin.servers.policy.server import PolicyModelServer
from gym_plugin.models.tiny import build_tiny_model, build_tiny_tokenizer

TOOLS = [{"type": "function", "name": "add", "description": "Add two integers.",
          "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                                "parameters": TOOLS[0]["parameters"]}}]
USER = {"role": "user", "content": "What is 3 + 4? Use the tool."}


def run(test, **policy_kw):
    """Embedded tiny server + a policy model server in front of it; ``await test(policy, transport, tok, model)``."""

    async def main():
        tok = build_tiny_tokenizer()
        model = build_tiny_model(tok)
        backend = EmbeddedPolicyServer(model=model, tokenizer=tok, served_model_name="tiny", batch_wait_ms=1.0)
        await backend.start()
        policy = PolicyModelServer("policy", PolicyModelConfig(base_url=backend.base_url, model="tiny",
                                                               **policy_kw), Directory())
        await policy.start(register_local=False)
        transport = Transport(allow_local=False)
        try:
            return await test(policy, transport, tok, model)
        finally:
            await transport.close()
            await policy.stop()
            await backend.stop()

    return asyncio.run(main())


async def respond(policy, transport, **params) -> dict:
    params.setdefault("max_output_tokens", 6)
    params.setdefault("temperature", 1.0)
    reply = await transport.post(f"{policy.url}/v1/responses", params)
    return reply.data


def token_item(response: dict) -> dict:
    [item] = [it for it in response["output"] if "prompt_token_ids" in it]
    assert item is response["output"][-1]  # protocol: the token fields sit on the last item of the call
    return item


def second_turn_input(first_prompt: list[int]) -> list[dict]:
    """The agent's input for turn 2: the user, turn 1's tool call (with ids the tokenizer would never produce
    for its text: 'a' 'b' instead of 'ab', then <|im_end|> = 2) and the tool's output."""
    return [USER,
            {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 3, "b": 4}',
             "prompt_token_ids": first_prompt, "generation_token_ids": [67, 68, 2],
             "generation_log_probs": [-0.5, -0.5, -0.1]},
            {"type": "function_call_output", "call_id": "c1", "output": "7"}]


def test_completions_mode_extends_the_previous_tokens():
    async def test(policy, transport, tok, model):
        r1 = await respond(policy, transport, input=[USER], tools=TOOLS)
        first = token_item(r1)
        expected_first = ChatRenderer(tok).encode(ChatRenderer(tok).render_text([USER], CHAT_TOOLS, True))
        assert first["prompt_token_ids"] == expected_first
        assert len(first["generation_token_ids"]) == len(first["generation_log_probs"]) >= 1
        assert first["policy_version"] == 0  # from the embedded backend's completion

        r2 = await respond(policy, transport, input=second_turn_input(expected_first), tools=TOOLS)
        second = token_item(r2)
        appended = tok.encode("\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n"
                              "<|im_start|>assistant\n", add_special_tokens=False)
        assert second["prompt_token_ids"] == expected_first + [67, 68, 2] + appended
        assert policy.stats["completions_calls"] == 2 and policy.stats["continued_prompts"] == 1
        assert policy.stats["chat_calls"] == 0 and policy.stats["continuation_fallbacks"] == 0

        record = {"response": {"output": second_turn_input(expected_first)[1:] + r2["output"]}, "reward": 1.0,
                  "_ng_task_index": 0}
        batch = process_rollouts([record], tok, advantage_mode=None)
        assert batch.metrics["rollout/drift_count"] == 0
        # the row is exactly what was sampled: turn 1's ids, the tool turn, turn 2's generation
        assert batch.input_ids[0].tolist() == second["prompt_token_ids"] + second["generation_token_ids"]

    run(test, token_mode="completions", tokenizer="tiny")


def test_chat_mode_same_conversation_drifts_and_is_counted():
    async def test(policy, transport, tok, model):
        renderer = ChatRenderer(tok)
        first_prompt = renderer.encode(renderer.render_text([USER], CHAT_TOOLS, True))
        r2 = await respond(policy, transport, input=second_turn_input(first_prompt), tools=TOOLS)
        second = token_item(r2)
        # the backend re-rendered turn 1's tool call from its JSON: not the ids the model produced
        assert second["prompt_token_ids"][: len(first_prompt)] == first_prompt
        assert second["prompt_token_ids"][len(first_prompt): len(first_prompt) + 3] != [67, 68, 2]
        record = {"response": {"output": second_turn_input(first_prompt)[1:] + r2["output"]}, "reward": 1.0,
                  "_ng_task_index": 0}
        batch = process_rollouts([record], tok, advantage_mode=None)
        assert batch.metrics["rollout/drift_count"] == 1 and len(batch) == 2  # split into its two segments
        assert policy.stats["chat_calls"] == 1 and policy.stats["completions_calls"] == 0

    run(test, token_mode="chat")


def test_auto_picks_chat_for_a_backend_that_is_not_vllm():
    async def test(policy, transport, tok, model):
        await asyncio.gather(*(respond(policy, transport, input=[USER]) for _ in range(3)))
        assert policy.backends.modes == ["chat"] and policy.stats["chat_calls"] == 3

    run(test)  # token_mode defaults to auto; the embedded server says owned_by 'gym_plugin'


def test_constrained_call_is_marked():
    async def test(policy, transport, tok, model):
        r = await respond(policy, transport, input=[USER], tools=TOOLS, tool_choice="required")
        assert token_item(r)["constrained"] is True
        free = await respond(policy, transport, input=[USER], tools=TOOLS, tool_choice="auto")
        assert "constrained" not in token_item(free)
        assert policy.stats["constrained_calls"] == 1 and policy.stats["chat_calls"] == 2

    run(test, token_mode="chat")


def test_completions_mode_forces_tool_calls_with_structured_outputs():
    """tool_choice=required in completions mode becomes vLLM's structured_outputs (the Hermes structural tag vLLM's
    chat route uses); the embedded server cannot constrain decoding and says so instead of ignoring it."""
    async def test(policy, transport, tok, model):
        with pytest.raises(HTTPStatusError) as ei:
            await respond(policy, transport, input=[USER], tools=TOOLS, tool_choice="required")
        assert ei.value.status == 400 and "'structured_outputs' (constrained decoding) is not supported" in ei.value.body

    run(test, token_mode="completions", tokenizer="tiny")


def test_missing_tokenizer_is_a_clear_error():
    async def test(policy, transport, tok, model):
        with pytest.raises(HTTPStatusError) as ei:
            await respond(policy, transport, input=[USER])
        # the tiny model is built in code: the backend reports no root, so nothing says where the tokenizer is
        message = ei.value.body  # the whole reply (str() cuts it)
        assert ei.value.status == 500 and "tokenizer is not set" in message, message
        assert "reported no model root" in message and "token_mode: chat" in message

    run(test, token_mode="completions")


def test_embedded_completions_route_log_probs_match_a_forward_pass():
    async def test(policy, transport, tok, model):
        prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        backend_url = policy.base_urls[0]
        reply = (await transport.post(f"{backend_url}/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 3, "logprobs": 0,
            "return_token_ids": True})).data
        choice = reply["choices"][0]
        assert choice["prompt_token_ids"] == prompt
        ids = prompt + choice["token_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        forward = [logp[len(prompt) + i - 1, t].item() for i, t in enumerate(choice["token_ids"])]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(forward, abs=1e-4)
        assert len(choice["logprobs"]["tokens"]) == len(choice["token_ids"])

    run(test, token_mode="chat")
