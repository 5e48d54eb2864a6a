"""Hermes/Qwen-style tool calls: the ChatML+tools chat template and the parser for generated text.

A model trained in the Hermes/Qwen convention answers a tool call with blocks like::

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

``parse_tool_calls`` turns such text into OpenAI ``tool_calls``; ``CHATML_TOOLS_TEMPLATE`` is the Jinja chat
template that renders ``tools`` into the system turn, assistant ``tool_calls`` back into these blocks and
``role: tool`` messages into ``<tool_response>`` blocks. It is used by the tiny test tokenizer and as the
fallback for tokenizers whose own template ignores ``tools`` (SmolLM2's plain ChatML template does).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# ChatML with Hermes-style tools. Written for gym_plugin; the wording of the tool instructions follows the
# common Hermes convention so that models trained on it recognise the format.
# - tools: listed as JSON (one per line) inside <tools></tools> in the system turn (a default system text is
#   used when the conversation has none);
# - assistant tool_calls: one <tool_call> block each, arguments rendered as JSON (a JSON string is used as is);
# - tool messages: a user turn holding a <tool_response> block (consecutive ones are grouped in one turn).
# transformers compiles templates with trim_blocks (the newline right after a block tag is dropped), so
# newlines that follow a tag are written as {{ '\\n' }}.
def chatml_tools_template(default_system: str = "You are a helpful assistant.", always_system: bool = False) -> str:
    """The ChatML+Hermes tools template; ``always_system`` adds ``default_system`` to conversations without
    a system message even when there are no tools (SmolLM2's own template does that)."""
    return (
    "{% set default_system = " + json.dumps(default_system) + " %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}{{ default_system }}{% endif %}{{ '\\n\\n' }}"
    "# Tools\n\nYou can call the functions below. Their signatures are given inside <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages and messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    + ("{% else %}<|im_start|>system\n{{ default_system }}<|im_end|>\n" if always_system else "")
    + "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "<|im_start|>assistant{{ '\\n' }}{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for tc in message['tool_calls'] %}"
    "{% set fn = tc['function'] if tc.get('function') else tc %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ fn["name"] }}", "arguments": '
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}{% else %}{{ fn['arguments'] | tojson }}{% endif %}"
    "}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] if message['content'] is not none else '' }}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHATML_TOOLS_TEMPLATE = chatml_tools_template()
"""The template of the tiny test tokenizer: a default system turn only when there are tools."""

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass
class ParsedToolCalls:
    """The result of parsing one generation for tool calls."""

    content: str | None
    """The text outside the valid ``<tool_call>`` blocks (stripped), or None when nothing is left."""
    tool_calls: list[dict] = field(default_factory=list)
    """OpenAI-style ``[{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}]``."""


def parse_tool_calls(text: str) -> ParsedToolCalls:
    """Split generated ``text`` into plain content and OpenAI tool calls.

    A block counts as a tool call only when its body is a JSON object with a string ``name``; its
    ``arguments`` (object, or a JSON string holding one; missing = {}) become a JSON string. Blocks that do
    not parse stay in ``content`` untouched, so a malformed call is visible to the verifier instead of lost.
    """
    calls: list[dict] = []
    kept: list[str] = []
    pos = 0
    for match in _BLOCK.finditer(text):
        call = _parse_block(match.group(1))
        if call is None:
            continue  # stays in the content via the slices below
        kept.append(text[pos : match.start()])
        pos = match.end()
        calls.append(call)
    if not calls:
        return ParsedToolCalls(content=text, tool_calls=[])
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return ParsedToolCalls(content=content or None, tool_calls=calls)


def _parse_block(body: str) -> dict | None:
    try:
        obj = json.loads(body.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, ValueError):
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def template_renders_tools(tokenizer) -> bool:
    """True when ``tokenizer``'s chat template puts ``tools`` into the prompt.

    Checked by rendering one conversation with and without a tool whose name is unlikely to appear by
    chance; a template that ignores ``tools`` renders both the same.
    """
    if not getattr(tokenizer, "chat_template", None):
        return False
    msgs = [{"role": "user", "content": "hi"}]
    tool = {
        "type": "function",
        "function": {"name": "zz_probe_tool_q7", "description": "probe", "parameters": {"type": "object"}},
    }
    try:
        with_tools = tokenizer.apply_chat_template(msgs, tools=[tool], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template failure means it cannot render tools
        return False
    return "zz_probe_tool_q7" in with_tools
