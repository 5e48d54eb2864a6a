"""Hermes tool-call parsing and the ChatML+tools template."""

from __future__ import annotations

import json

from gym_plugin.models.tiny import build_tiny_tokenizer
from gym_plugin.models.toolcalls import chatml_tools_template, parse_tool_calls, template_renders_tools


def test_plain_text_has_no_tool_calls():
    parsed = parse_tool_calls("The answer is 4.")
    assert parsed.content == "The answer is 4." and parsed.tool_calls == []


def test_one_call_with_text_around():
    text = 'Let me compute.\n<tool_call>\n{"name": "calc", "arguments": {"expression": "2+2"}}\n</tool_call>'
    parsed = parse_tool_calls(text)
    assert parsed.content == "Let me compute."
    assert len(parsed.tool_calls) == 1
    call = parsed.tool_calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "calc"
    # arguments travel as a JSON string, as in OpenAI's API
    assert json.loads(call["function"]["arguments"]) == {"expression": "2+2"}


def test_two_calls_only_calls_gives_none_content_and_distinct_ids():
    text = (
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert parsed.content is None
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["a", "b"]
    # a JSON-string argument is decoded and re-encoded as a JSON string
    assert json.loads(parsed.tool_calls[1]["function"]["arguments"]) == {"y": 2}
    assert parsed.tool_calls[0]["id"] != parsed.tool_calls[1]["id"]


def test_missing_arguments_default_to_empty_object():
    parsed = parse_tool_calls('<tool_call>{"name": "now"}</tool_call>')
    assert parsed.tool_calls[0]["function"]["arguments"] == "{}"


def test_invalid_json_stays_plain_content():
    text = 'x <tool_call>{"name": "calc", "arguments": {oops}</tool_call> y'
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == [] and parsed.content == text


def test_invalid_block_kept_valid_block_parsed():
    bad = "<tool_call>not json</tool_call>"
    text = bad + ' <tool_call>{"name": "ok", "arguments": {}}</tool_call>'
    parsed = parse_tool_calls(text)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["ok"]
    assert parsed.content == bad


def test_block_without_name_or_with_non_object_arguments_is_not_a_call():
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>').tool_calls == []
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>').tool_calls == []
    assert parse_tool_calls("<tool_call>[1, 2]</tool_call>").tool_calls == []


def test_unclosed_block_is_plain_content():
    text = '<tool_call>{"name": "calc", "arguments": {}}'
    assert parse_tool_calls(text).tool_calls == []


def test_template_detection():
    tok = build_tiny_tokenizer()
    assert template_renders_tools(tok)
    # A plain ChatML template that ignores tools (what SmolLM2 ships).
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
    )
    assert not template_renders_tools(tok)


def test_always_system_template_adds_default_system():
    tok = build_tiny_tokenizer()
    tok.chat_template = chatml_tools_template(default_system="I am Smol.", always_system=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nI am Smol.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_roundtrip_parsed_calls_render_back_as_the_generated_block():
    # The model's block, parsed, then rendered in the history by the template: same text (token continuity
    # across turns depends on it).
    tok = build_tiny_tokenizer()
    generated = '<tool_call>\n{"name": "calc", "arguments": {"expression": "2+2"}}\n</tool_call>'
    parsed = parse_tool_calls(generated)
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n" + generated + "<|im_end|>\n")
