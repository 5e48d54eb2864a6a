"""Forced tool calls (``tool_choice: "required"`` / a named function) in token-in mode are what vLLM 0.32's chat
route makes of the same request with ``--tool-call-parser hermes`` (``VLLM_ENFORCE_STRICT_TOOL_CALLING`` on, its
default):

1. the constraint: `forced_tool_constraint` gives, key for key, the structural tag vLLM's own parser puts on the
   chat request (vLLM's code, no server);
2. the rollouts: the calculator rows with ``tool_choice: "required"`` through the real server, in token-in and in
   chat mode: the same tool calls per model call and the same share of incomplete rollouts (within 10 %), and no
   drift in token-in mode. Measured (2-core machine, 16 rows x 2, max_output_tokens 96): both modes 192 model calls,
   each exactly one call, 0 of 32 rollouts incomplete; median 39 (token-in) and 35 (chat) generated tokens per call;
   drift 0 (token-in) and 31 of 32 (chat). (The JSON-array constraint this replaced: several calls per turn and
   17 of 32 incomplete.)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from gym_plugin.integration import GymIntegration
from gym_plugin.protocol import DRIFT, parse_rollout, splice_offsets
from gym_plugin.responses import tools_to_chat
from gym_plugin.servers.policy.tokens import forced_tool_constraint
from gym_plugin.servers.resources.calculator import CALCULATOR_TOOLS, calculator_row

pytestmark = pytest.mark.vllm

ROOT_CONF = Path(__file__).resolve().parents[3] / "conf" / "gym"
LOOSE = {"type": "function", "function": {"name": "lookup", "description": "Find a word.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
CALC_CHAT = tools_to_chat(CALCULATOR_TOOLS)  # strict: true, as a row's Responses tools become chat tools


def vllms_structural_tag(tools: list[dict], tool_choice, parallel_tool_calls: bool | None) -> dict:
    """The structural tag vLLM 0.32's chat route puts on a request (its hermes parser's adjust_request)."""
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager

    from gym_plugin.models import ensure_smollm2

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    parser_cls = ParserManager.get_parser(tool_parser_name="hermes", enable_auto_tools=True)
    kwargs = {} if parallel_tool_calls is None else {"parallel_tool_calls": parallel_tool_calls}
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                    tool_choice=tool_choice, **kwargs)
    request = parser_cls(tokenizer, request.tools).adjust_request(request)
    return json.loads(request.structured_outputs.structural_tag)


@pytest.mark.parametrize("tools, tool_choice, parallel", [
    (CALC_CHAT, "required", None),
    (CALC_CHAT, "required", False),
    (CALC_CHAT + [LOOSE], "required", True),
    (CALC_CHAT + [LOOSE], {"type": "function", "function": {"name": "multiply"}}, None),
    (CALC_CHAT + [LOOSE], {"type": "function", "function": {"name": "lookup"}}, False),
], ids=["required", "required-single", "required-loose-tool", "named-strict", "named-loose"])
def test_token_in_constraint_is_vllms_own(tools, tool_choice, parallel):
    chat = {"tools": tools, "tool_choice": tool_choice}
    if parallel is not None:
        chat["parallel_tool_calls"] = parallel
    ours = json.loads(forced_tool_constraint(chat)["structural_tag"])
    assert ours == vllms_structural_tag(tools, tool_choice, parallel)


# ---- the real server -----------------------------------------------------------------------------------------------
ROWS = [(a, b, c) for a, b, c in zip((3, 12, 6, 5, 9, 2, 4, 7, 8, 11, 13, 3, 6, 14, 5, 9),
                                     (4, 7, 8, 5, 3, 11, 6, 7, 9, 2, 3, 15, 6, 4, 12, 8),
                                     (5, 9, 2, 5, 4, 7, 1, 3, 6, 8, 2, 9, 4, 1, 7, 3))]
REPEATS = 2
MAX_OUTPUT_TOKENS = 96  # the budget under which the old JSON-array constraint cut 17 of 32 rollouts


def forced_rows() -> list[dict]:
    rows = [calculator_row(a, b, c) for a, b, c in ROWS]
    for row in rows:  # SmolLM2-135M does not call tools on its own
        row["responses_create_params"].update(temperature=1.0, max_output_tokens=MAX_OUTPUT_TOKENS,
                                              tool_choice="required")
    return rows


def calls_per_model_call(record: dict) -> list[int]:
    """Tool calls of each model call (a model call's items end with the one carrying its token ids)."""
    counts, current = [], 0
    for item in record["response"]["output"]:
        current += item.get("type") == "function_call"
        if "generation_token_ids" in item:
            counts.append(current)
            current = 0
    return counts


def test_forced_calls_token_in_and_chat_mode_agree(vllm_server):
    stats = {}
    for mode in ("completions", "chat"):
        gym = GymIntegration("smollm2", [vllm_server.base_url], f"{ROOT_CONF}/calculator.yaml", head_server_port=0,
                             overrides=[f"policy_model.responses_api_models.vllm_model.token_mode={mode}",
                                        "policy_model.responses_api_models.vllm_model.tokenizer=smollm2"])
        try:
            records = gym.collect(forced_rows(), repeats=REPEATS)
        finally:
            gym.shutdown()
        assert len(records) == len(ROWS) * REPEATS
        assert all(r.get("failure") is None for r in records), [r["failure"] for r in records if r.get("failure")]
        per_call = [n for r in records for n in calls_per_model_call(r)]
        rollouts = [parse_rollout(r) for r in records]
        stats[mode] = {
            "mean_calls": statistics.mean(per_call), "one_call_share": per_call.count(1) / len(per_call),
            "no_call": per_call.count(0), "incomplete": sum(r.incomplete for r in rollouts),
            "drift": sum(DRIFT in splice_offsets(r.calls) for r in rollouts), "model_calls": len(per_call),
            "median_tokens": statistics.median(len(c.generation) for r in rollouts for c in r.calls),
            "reward": statistics.mean(r["reward"] for r in records)}
        print(f"\n[vllm] forced calls, {mode}: {stats[mode]}", file=sys.stderr)
    ours, theirs = stats["completions"], stats["chat"]
    n = len(ROWS) * REPEATS
    assert ours["drift"] == 0
    assert ours["no_call"] == 0  # every completed turn is a call, as the constraint demands
    assert abs(ours["mean_calls"] - theirs["mean_calls"]) <= 0.1 * max(ours["mean_calls"], theirs["mean_calls"])
    assert abs(ours["one_call_share"] - theirs["one_call_share"]) <= 0.1
    assert abs(ours["incomplete"] - theirs["incomplete"]) <= 0.1 * n
