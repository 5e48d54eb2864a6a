"""Token-in/token-out prompts (gym_plugin.servers.policy.tito) and the chat-template rule (gym_plugin.models.chat_template), with the
tiny test tokenizer (ChatML + Hermes tools template, eos = <|im_end|> = id 2, <|im_start|> = id 1)."""

from __future__ import annotations

import copy

import pytest

from gym_plugin.models.chat_template import ChatRenderer, load_tokenizer, served_chat_template, tools_fallback_template
from gym_plugin.errors import ConfigError
from gym_plugin.models.tiny import build_tiny_tokenizer
from gym_plugin.servers.policy.tito import ContinuationError, build_prompt, last_token_turn
from gym_plugin.models.toolcalls import CHATML_TOOLS_TEMPLATE, chatml_tools_template

TOOLS = [{"type": "function", "function": {"name": "add", "description": "a+b",
                                           "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok):
    return ChatRenderer(tok)


def test_fresh_prompt_is_the_rendered_conversation(renderer, tok):
    msgs = [{"role": "user", "content": "hi"}]
    p = build_prompt(renderer, msgs)
    assert p.continued_from is None and p.appended == len(p.ids)
    assert p.ids == tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def test_next_prompt_extends_the_previous_ids_with_only_the_appended_text(renderer, tok):
    prev_prompt = [1, 620, 201, 5, 6]  # whatever the previous call reported: taken as is
    # the model's own tokens, split in a way the tokenizer would never produce ('a', 'b' instead of 'ab'),
    # ending with its stop token <|im_end|> = 2
    prev_gen = [67, 68, 2]
    msgs = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "prompt_token_ids": prev_prompt, "generation_token_ids": prev_gen,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "7"},
    ]
    p = build_prompt(renderer, msgs, TOOLS)
    # After the model's <|im_end|> ChatML writes "\n"; then the tool turn and the generation prompt.
    appended = tok.encode("\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n"
                          "<|im_start|>assistant\n", add_special_tokens=False)
    assert appended == [201, 1, 522, 201, 30, 270, 65, 444, 32, 201, 25, 201, 295, 270, 65, 444, 32, 2, 201, 1,
                        620, 201]
    assert p.ids == prev_prompt + prev_gen + appended
    assert p.continued_from == 1 and p.appended == 22


def test_generation_cut_by_length_gets_the_templates_turn_end(renderer, tok):
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ab", "prompt_token_ids": [9], "generation_token_ids": [67, 68]},
        {"role": "user", "content": "more"},
    ]
    p = build_prompt(renderer, msgs)
    # the model never wrote <|im_end|>: it comes from the template, as scaffolding after the generation
    assert p.ids == [9, 67, 68] + tok.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n",
                                             add_special_tokens=False)


def test_the_last_token_carrying_turn_is_extended(renderer):
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x", "prompt_token_ids": [9], "generation_token_ids": [2]},
        {"role": "user", "content": "r"},
        {"role": "assistant", "content": "y", "prompt_token_ids": [9, 2, 7], "generation_token_ids": [8, 2]},
        {"role": "user", "content": "s"},
    ]
    assert last_token_turn(msgs) == 3
    assert build_prompt(renderer, msgs).ids[:5] == [9, 2, 7, 8, 2]


def test_template_that_rewrites_history_cannot_be_continued(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = "{{ messages | length }}" + CHATML_TOOLS_TEMPLATE  # the count changes with every turn
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "x", "prompt_token_ids": [9], "generation_token_ids": [2]},
            {"role": "user", "content": "r"}]
    with pytest.raises(ContinuationError, match="rewrites earlier turns"):
        build_prompt(ChatRenderer(odd), msgs)


def test_tools_fallback_template_rule(tok):
    assert tools_fallback_template(tok) is None  # the tiny template renders tools itself
    assert served_chat_template(tok) == CHATML_TOOLS_TEMPLATE
    plain = copy.deepcopy(tok)
    plain.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # no default system turn in that template: ours adds one only when there are tools
    assert tools_fallback_template(plain) == chatml_tools_template(always_system=False)
    r = ChatRenderer(plain)
    text = r.render_text([{"role": "user", "content": "hi"}], TOOLS)
    assert '"name": "add"' in text and text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert r.render_text([{"role": "user", "content": "hi"}], None) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_load_tokenizer_names_the_key_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer is not set"):
        load_tokenizer("")
    with pytest.raises(ConfigError, match=r"policy\.tokenizer='.*nothing-here'.*Hugging Face folder"):
        load_tokenizer(str(tmp_path / "nothing-here"), key="policy.tokenizer")
    assert load_tokenizer("tiny").eos_token == "<|im_end|>"
