"""Responses API <-> Chat Completions conversion (gym_plugin.responses): pure functions, hand-written cases."""

from __future__ import annotations

import json

import pytest

from gym_plugin.errors import ConfigError, ProtocolError
from gym_plugin.responses import (
    choice_to_output_items,
    content_text,
    create_params_to_chat,
    input_to_messages,
    output_text,
    tool_choice_to_chat,
    tools_to_chat,
)

TOK = {"prompt_token_ids": [1, 2], "generation_token_ids": [3, 4], "generation_log_probs": [-0.1, -0.2]}


def test_string_input_and_instructions():
    assert input_to_messages("hi") == [{"role": "user", "content": "hi"}]
    assert input_to_messages("hi", "be brief") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_content_parts_are_joined():
    assert content_text([{"type": "input_text", "text": "a"}, {"type": "output_text", "text": "b"}]) == "ab"
    assert content_text(None) == ""
    msgs = input_to_messages([{"type": "message", "role": "developer",
                               "content": [{"type": "input_text", "text": "rules"}]}])
    assert msgs == [{"role": "developer", "content": "rules"}]


def test_multi_turn_history_becomes_chat_messages_with_tokens_carried():
    # turn 1 of a rollout: text + one tool call (tokens on the function_call, the last item of the call),
    # then the tool result, then turn 2: two parallel tool calls (tokens on the second).
    inp = [
        {"role": "user", "content": "compute"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me"}]},
        {"type": "function_call", "call_id": "c1", "name": "multiply", "arguments": '{"a":3,"b":4}', **TOK},
        {"type": "function_call_output", "call_id": "c1", "output": '{"result": 12}'},
        {"type": "function_call", "call_id": "c2", "name": "add", "arguments": "{}"},
        {"type": "function_call", "call_id": "c3", "name": "add", "arguments": "{}",
         "prompt_token_ids": [9], "generation_token_ids": [8], "generation_log_probs": [-1.0]},
        {"type": "function_call_output", "call_id": "c2", "output": {"result": 1}},
        {"type": "reasoning", "summary": []},
    ]
    msgs = input_to_messages(inp)
    assert msgs == [
        {"role": "user", "content": "compute"},
        {"role": "assistant", "content": "let me",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "multiply", "arguments": '{"a":3,"b":4}'}}],
         "prompt_token_ids": [1, 2], "generation_token_ids": [3, 4]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"result": 12}'},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{}"}},
                        {"id": "c3", "type": "function", "function": {"name": "add", "arguments": "{}"}}],
         "prompt_token_ids": [9], "generation_token_ids": [8]},
        {"role": "tool", "tool_call_id": "c2", "content": '{"result": 1}'},  # non-string output JSON-encoded
    ]


def test_tokens_end_a_model_call():
    # two consecutive calls that each made one tool call (no tool output in between, e.g. a trimmed history):
    # the token fields on the first mark the end of its call, so the second starts a new assistant message.
    inp = [
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}", **TOK},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}", **TOK},
    ]
    assert [len(m["tool_calls"]) for m in input_to_messages(inp)] == [1, 1]
    assert [len(m["tool_calls"]) for m in input_to_messages(inp, carry_tokens=False)] == [1, 1]


def test_bad_items_raise_protocol_errors():
    with pytest.raises(ProtocolError, match="has type 'image_generation_call'"):
        input_to_messages([{"type": "image_generation_call"}])
    with pytest.raises(ProtocolError, match="has role 'robot'"):
        input_to_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ProtocolError, match="input item 0 is not an object"):
        input_to_messages(["hello"])
    with pytest.raises(ProtocolError, match="no 'input'"):
        create_params_to_chat({"temperature": 1.0}, "m")


def test_tools_and_tool_choice_conversion():
    tools = [{"type": "function", "name": "add", "description": "a+b",
              "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}, "strict": True}]
    assert tools_to_chat(tools) == [{"type": "function", "function": {
        "name": "add", "description": "a+b",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}, "strict": True}}]
    assert tools_to_chat(None) is None
    with pytest.raises(ProtocolError, match="only 'function' tools"):
        tools_to_chat([{"type": "web_search"}])
    assert tool_choice_to_chat({"type": "function", "name": "add"}) == {"type": "function", "function": {"name": "add"}}
    assert tool_choice_to_chat("required") == "required"


def test_create_params_sampling_mapping():
    params = {"input": "q", "model": "ignored", "temperature": 0.7, "top_p": 0.9, "max_output_tokens": 64,
              "tools": [{"type": "function", "name": "f", "parameters": {}}], "tool_choice": "auto",
              "parallel_tool_calls": False, "store": True, "metadata": {"k": "v"}, "top_k": 5, "seed": None}
    chat = create_params_to_chat(params, "served-model")
    assert chat == {
        "model": "served-model",
        "messages": [{"role": "user", "content": "q"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
        "tool_choice": "auto",
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "parallel_tool_calls": False,
        "top_k": 5,  # vLLM extra sampling param passed through; store/metadata dropped; seed None dropped
    }


def test_choice_to_output_items_puts_tokens_on_last_item():
    choice = {"message": {"role": "assistant", "content": "thinking",
                          "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}},
                                         {"id": "c2", "function": {"name": "g", "arguments": {"y": 2}}}]}}
    items = choice_to_output_items(choice, TOK)
    assert [it["type"] for it in items] == ["message", "function_call", "function_call"]
    assert items[0]["content"] == [{"type": "output_text", "text": "thinking", "annotations": []}]
    assert "prompt_token_ids" not in items[0] and "prompt_token_ids" not in items[1]
    assert {k: items[2][k] for k in TOK} == TOK
    assert items[1]["call_id"] == "c1" and items[1]["arguments"] == '{"x": 1}'
    assert items[2]["arguments"] == '{"y": 2}'  # dict arguments are JSON-encoded
    assert items[1]["id"] != items[2]["id"] and items[2]["status"] == "completed"


def test_choice_without_tool_calls_is_one_message_even_when_empty():
    items = choice_to_output_items({"message": {"role": "assistant", "content": None}}, None)
    assert len(items) == 1 and items[0]["content"][0]["text"] == ""
    assert output_text(items) == ""
    assert output_text([{"type": "function_call"}, *choice_to_output_items(
        {"message": {"content": "final"}}, None)]) == "final"
    with pytest.raises(ProtocolError, match="no 'message'"):
        choice_to_output_items({"finish_reason": "stop"}, None)


def test_round_trip_output_items_back_to_messages():
    choice = {"message": {"content": "x", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}}
    items = choice_to_output_items(choice, TOK)
    msgs = input_to_messages([{"role": "user", "content": "q"}, *items])
    assert msgs[1] == {"role": "assistant", "content": "x",
                       "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                       "prompt_token_ids": [1, 2], "generation_token_ids": [3, 4]}


def test_carry_tokens_off_leaves_history_messages_plain():
    inp = [{"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}", **TOK}]
    assert input_to_messages(inp, carry_tokens=False) == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


def test_forced_tool_constraint_is_vllms_hermes_structural_tag_and_parses_back():
    from gym_plugin.servers.policy.tokens import completion_message, forced_tool_constraint, is_constrained

    params = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = {"tools": [{"type": "function", "function": {"name": "add", "parameters": params, "strict": True}},
                      {"type": "function", "function": {"name": "neg", "parameters": params}}],
            "tool_choice": "required", "parallel_tool_calls": False}
    assert is_constrained(chat) and not is_constrained({**chat, "tool_choice": "auto"})

    def tag(name, schema, newline):  # one of vLLM's two Hermes tags per tool (with and without newlines)
        nl = "\n" if newline else ""
        return {"type": "tag", "begin": f'<tool_call>{nl}{{"name": "{name}", "arguments": ',
                "content": {"type": "json_schema", "json_schema": schema, "style": "json", "any_order": False,
                            "max_whitespace_cnt": None, "excludes": []},
                "end": f"}}{nl}</tool_call>"}

    def tags_format(tags, stop_after_first):
        return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "",
                                                     "at_least_one": True, "stop_after_first": stop_after_first}}

    # strict 'add' keeps its parameters schema; non-strict 'neg' takes any JSON arguments (vLLM, strict level auto)
    both = [tag("add", params, True), tag("add", params, False), tag("neg", True, True), tag("neg", True, False)]
    assert json.loads(forced_tool_constraint(chat)["structural_tag"]) == tags_format(both, True)
    assert json.loads(forced_tool_constraint({**chat, "parallel_tool_calls": True})["structural_tag"]) == \
        tags_format(both, False)
    named = forced_tool_constraint({**chat, "tool_choice": {"type": "function", "function": {"name": "neg"}}})
    assert json.loads(named["structural_tag"]) == tags_format([tag("neg", True, True), tag("neg", True, False)], True)
    assert forced_tool_constraint({**chat, "tool_choice": "auto"}) is None
    with pytest.raises(ProtocolError, match="'llama3_json'.*token_mode: chat"):
        forced_tool_constraint(chat, "llama3_json")
    with pytest.raises(ProtocolError, match="'mul', which is not among"):
        forced_tool_constraint({**chat, "tool_choice": {"type": "function", "function": {"name": "mul"}}})

    reply = {"choices": [{"text": '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>',
                          "token_ids": [5, 6, 2], "prompt_token_ids": [1, 2],
                          "logprobs": {"token_logprobs": [-0.5, -0.25, -0.125]}, "finish_reason": "stop"}]}
    choice, fields, _ = completion_message(reply, "http://b/v1", parse_tools=True)
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": '{"a": 2}'} and not choice["message"]["content"]
    assert fields == {"prompt_token_ids": [1, 2], "generation_token_ids": [5, 6, 2],
                      "generation_log_probs": [-0.5, -0.25, -0.125]}
    cut = {"choices": [{**reply["choices"][0], "text": '<tool_call>\n{"name": "add", "argu', "finish_reason": "length"}]}
    choice, _, _ = completion_message(cut, "http://b/v1", parse_tools=True)
    assert choice["message"]["content"] == '<tool_call>\n{"name": "add", "argu'  # kept, not lost


def test_token_in_mode_refuses_a_tool_call_parser_it_does_not_cover():
    from gym_plugin.servers.policy.config import PolicyModelConfig

    base = {"base_url": "http://127.0.0.1:8000/v1"}
    assert PolicyModelConfig(**base).check() == []  # hermes, the default
    for mode in ("auto", "completions"):
        with pytest.raises(ConfigError) as refused:
            PolicyModelConfig(**base, tool_call_parser="llama3_json", token_mode=mode)
        [problem] = refused.value.problems
        assert problem.startswith("tool_call_parser='llama3_json': token-in mode") and "token_mode: chat" in problem
    assert PolicyModelConfig(**base, tool_call_parser="llama3_json", token_mode="chat").check() == []
