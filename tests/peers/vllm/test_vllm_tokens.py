"""Against the real vLLM 0.32 (CPU build) serving SmolLM2: token ids and log-probs in every mode, multi-turn drift.

1. Single-turn collect through the policy model server in chat style A, chat style B and token-in/token-out
   completions: every generated token's log-prob is within 1e-3 of a teacher-forced HF forward pass over the
   same ids (SmolLM2 fp32, the same weights), and the prompt ids are the template's rendering.
2. The calculator task with ``tool_choice: "required"`` (SmolLM2-135M does not call tools on its own), 8 rollouts
   of several model calls each: token-in/token-out mode gives 0 drift; chat mode on the same rows drifts, and
   process_rollouts counts exactly the rollouts whose turns do not extend each other. Every call is marked
   constrained (log-probs of the grammar-constrained distribution) and masked out of the loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gym_plugin.models.chat_template import ChatRenderer, load_tokenizer
from gym_plugin.integration import GymIntegration
from gym_plugin.process import process_rollouts
from gym_plugin.protocol import DRIFT, parse_rollout, splice_offsets
from gym_plugin.servers.resources.calculator import calculator_row

pytestmark = pytest.mark.vllm

ROOT_CONF = Path(__file__).resolve().parents[3] / "conf" / "gym"
SINGLE = ["What is the capital of France? Reply with only the city name.",
          "What is 12 + 30? Reply with only the number.",
          "Name a primary color.",
          "Say hello in Spanish."]
CALC = [(3, 4, 5), (12, 7, 9), (6, 8, 2), (5, 5, 5), (9, 3, 4), (2, 11, 7), (4, 6, 1), (7, 7, 3)]


@pytest.fixture(scope="module")
def hf_model(vllm_server):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(vllm_server.model_dir, dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module")
def tokenizer(vllm_server):
    return load_tokenizer(str(vllm_server.model_dir))


def gym_for(vllm_server, config: str, **policy):
    overrides = [f"policy_model.responses_api_models.vllm_model.{k}={v}" for k, v in policy.items()]
    return GymIntegration("smollm2", [vllm_server.base_url], f"{ROOT_CONF}/{config}", head_server_port=0,
                          overrides=overrides)


def token_calls(record: dict) -> list[dict]:
    return [it for it in record["response"]["output"] if "generation_token_ids" in it]


def forward_logprobs(model, prompt: list[int], gen: list[int]) -> list[float]:
    ids = prompt + gen
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [logp[len(prompt) + i - 1, t].item() for i, t in enumerate(gen)]


@pytest.mark.parametrize("mode,style", [("chat", "A"), ("chat", "B"), ("completions", "B")])
def test_single_turn_log_probs_match_a_teacher_forced_forward(vllm_server, hf_model, tokenizer, mode, style):
    rows = [{"responses_create_params": {"input": [{"role": "user", "content": q}], "temperature": 1.0,
                                         "max_output_tokens": 24, "seed": i},
             "expected_answer": "x", "agent_ref": {"name": "exact_match_agent"}} for i, q in enumerate(SINGLE)]
    gym = gym_for(vllm_server, "exact_match.yaml", token_mode=mode, token_style=style, tokenizer="smollm2")
    try:
        records = gym.collect(rows)
    finally:
        gym.shutdown()
    renderer = ChatRenderer(tokenizer)
    worst = 0.0
    for row, record in zip(rows, records):
        assert record.get("failure") is None, record.get("failure")
        [call] = token_calls(record)
        # the prompt is the template's rendering (vLLM's with our --chat-template, or ours in completions mode)
        assert call["prompt_token_ids"] == renderer.encode(renderer.render_text(
            row["responses_create_params"]["input"], None, True))
        assert call["policy_version"] == 0  # /weight_info: 'default' (or '0' after a restore)
        forward = forward_logprobs(hf_model, call["prompt_token_ids"], call["generation_token_ids"])
        worst = max(worst, max(abs(a - b) for a, b in zip(call["generation_log_probs"], forward)))
    print(f"\n[vllm] {mode}/{style}: max |log-prob - HF forward| = {worst:.2e} over {len(rows)} rollouts",
          file=sys.stderr)
    assert worst < 1e-3


def calculator_rows() -> list[dict]:
    rows = [calculator_row(a, b, c) for a, b, c in CALC]
    for row in rows:
        # one call per turn, room for the JSON; required: SmolLM2-135M does not call tools by itself
        row["responses_create_params"].update(temperature=1.0, max_output_tokens=200, tool_choice="required",
                                              parallel_tool_calls=False)
    return rows


def drifted(record: dict) -> bool:
    """Some call's prompt does not extend the tokens before it (the splice process_rollouts uses)."""
    return DRIFT in splice_offsets(parse_rollout(record).calls)


def test_calculator_multi_turn_token_in_mode_never_drifts_chat_mode_does(vllm_server, tokenizer):
    results = {}
    for mode in ("completions", "chat"):
        gym = gym_for(vllm_server, "calculator.yaml", token_mode=mode, tokenizer="smollm2")
        try:
            records = gym.collect(calculator_rows())
        finally:
            gym.shutdown()
        assert all(r.get("failure") is None for r in records), [r.get("failure") for r in records]
        tool_calls = [sum(it["type"] == "function_call" for it in r["response"]["output"]) for r in records]
        assert len(records) == 8 and max(tool_calls) >= 2, tool_calls
        assert all(c.get("constrained") for r in records for c in token_calls(r))
        batch = process_rollouts(records, tokenizer, advantage_mode=None)
        # the metric counts exactly the rollouts whose prompts do not extend the earlier turns
        assert batch.metrics["rollout/drift_count"] == sum(map(drifted, records))
        assert batch.metrics["rollout/num_constrained_calls"] == sum(len(token_calls(r)) for r in records)
        assert batch.num_trained_tokens == 0  # every call was sampled under the tool-call grammar: masked
        results[mode] = (batch.metrics["rollout/drift_count"], sum(tool_calls))
        if mode == "completions":
            for r in records:  # turn k+1's prompt starts with turn k's prompt + generation, ids unchanged
                calls = token_calls(r)
                for prev, nxt in zip(calls, calls[1:]):
                    head = prev["prompt_token_ids"] + prev["generation_token_ids"]
                    assert nxt["prompt_token_ids"][: len(head)] == head
    print(f"\n[vllm] calculator, 8 rollouts: token-in drift {results['completions'][0]:.0f} "
          f"({results['completions'][1]} tool calls), chat drift {results['chat'][0]:.0f} "
          f"({results['chat'][1]} tool calls)", file=sys.stderr)
    assert results["completions"][0] == 0
    assert results["chat"][0] >= 1  # vLLM re-renders the history; observed 8 of 8 here
