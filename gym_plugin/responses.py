"""Responses API <-> Chat Completions conversion (pure functions, no I/O).

The policy model server speaks the OpenAI Responses API to agents and Chat Completions to the backend (vLLM or
any OpenAI-compatible endpoint). This module maps one onto the other:

- `input_to_messages`: Responses ``input`` items -> chat ``messages``. Consecutive assistant output items of one
  model call (a ``message`` and/or ``function_call`` items) become ONE assistant message with ``content`` and
  ``tool_calls``; ``function_call_output`` items become ``role: tool`` messages. When an assistant item carries
  the prompt / generation token ids (`gym_plugin.protocol.TOKEN_FIELDS`: an earlier turn of this rollout), they are
  passed on, on the assistant message, so a token-aware backend can splice the exact prefix instead of re-rendering it
  (protocol.md, "Token continuity"); backends that do not know these keys ignore them.
- `create_params_to_chat`: Responses create params -> chat completion create params (sampling, tools, ...).
- `choice_to_output_items`: one chat completion choice -> Responses output items; the token fields go on the
  LAST item of the call (protocol.md: all three or none).

Everything here runs once per model call on the hot path: no deep copies, no regexes, no pydantic.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Mapping

from gym_plugin.errors import ProtocolError, truncate
from gym_plugin.protocol import GENERATION_TOKEN_IDS, PROMPT_TOKEN_IDS

_ids = itertools.count(1)
"""Cheap unique ids for output items and responses within this process (uuid4 costs ~2 us each)."""


def next_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):x}"


# Responses create params copied as they are into the chat request.
_PASSTHROUGH = ("temperature", "top_p", "parallel_tool_calls", "seed", "stop", "frequency_penalty",
                "presence_penalty", "top_k", "min_p", "repetition_penalty", "user")
# Responses create params that have no chat counterpart (or that the server handles itself): dropped.
_DROPPED = frozenset(("input", "instructions", "model", "tools", "tool_choice", "max_output_tokens",
                      "text", "reasoning", "store", "stream", "metadata", "previous_response_id",
                      "include", "truncation", "background", "service_tier", "prompt", "max_tool_calls",
                      "top_logprobs", "conversation", "prompt_cache_key", "safety_identifier"))


def content_text(content: Any) -> str:
    """Text of a message content: a string, or a list of parts (input_text / output_text / text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if text is None and part.get("type") == "refusal":
                    text = part.get("refusal")
                if text is not None:
                    parts.append(text)
        return "".join(parts)
    raise ProtocolError(f"message content must be a string or a list of parts, got {truncate(content, 200)}")


def _assistant_message(content: str | None) -> dict:
    return {"role": "assistant", "content": content}


def input_to_messages(inp: str | list, instructions: str | None = None, carry_tokens: bool = True) -> list[dict]:
    """Responses ``input`` (a string or a list of items) -> chat messages.

    ``carry_tokens``: pass earlier turns' token ids on history assistant messages (off for backends that
    reject unknown message keys). Raises ProtocolError on an item it cannot place (says which item and what
    is accepted).
    """
    carry = _carry_tokens if carry_tokens else _no_carry
    messages: list[dict] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
        return messages
    if not isinstance(inp, list):
        raise ProtocolError(f"Responses 'input' must be a string or a list of items, got {truncate(inp, 200)}")

    # The assistant message being built from consecutive output items of one model call (None between calls).
    current: dict | None = None
    for i, item in enumerate(inp):
        if not isinstance(item, Mapping):
            raise ProtocolError(f"input item {i} is not an object: {truncate(item, 200)}")
        kind = item.get("type")
        if kind is None or kind == "message":
            role = item.get("role")
            if role == "assistant":
                # A model call has at most one message item and it comes before the call's tool calls, so an
                # assistant message item always starts a new assistant chat message.
                current = _assistant_message(content_text(item.get("content")))
                messages.append(current)
                carry(item, current)
                if PROMPT_TOKEN_IDS in item:
                    current = None  # token fields sit on the last item of a model call: the call ends here
                continue
            if role not in ("user", "system", "developer", "tool"):
                raise ProtocolError(
                    f"input item {i} has role {role!r}; expected 'user', 'system', 'developer' or 'assistant'"
                )
            current = None
            msg = {"role": role, "content": content_text(item.get("content"))}
            if role == "tool" and "tool_call_id" in item:
                msg["tool_call_id"] = item["tool_call_id"]
            messages.append(msg)
        elif kind == "function_call":
            if current is None:
                current = _assistant_message(None)
                messages.append(current)
            current.setdefault("tool_calls", []).append(
                {
                    "id": item.get("call_id") or item.get("id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
                }
            )
            carry(item, current)
            if PROMPT_TOKEN_IDS in item:
                current = None
        elif kind == "function_call_output":
            current = None
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        elif kind == "reasoning":
            # Reasoning summaries are not replayed to the model (chat templates of most models drop them).
            continue
        else:
            raise ProtocolError(
                f"input item {i} has type {kind!r}; supported: 'message', 'function_call', "
                f"'function_call_output', 'reasoning'"
            )
    return messages


def _no_carry(item: Mapping[str, Any], message: dict) -> None:
    return None


def _carry_tokens(item: Mapping[str, Any], message: dict) -> None:
    """Pass an earlier turn's token ids on the assistant message (token continuity, see module doc)."""
    prompt_ids = item.get(PROMPT_TOKEN_IDS)
    if prompt_ids is not None:
        message[PROMPT_TOKEN_IDS] = prompt_ids
        message[GENERATION_TOKEN_IDS] = item.get(GENERATION_TOKEN_IDS)


def tools_to_chat(tools: list | None) -> list[dict] | None:
    """Responses function tools (flat) -> chat tools (``{"type": "function", "function": {...}}``)."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ProtocolError(f"tools[{i}] is not an object: {truncate(tool, 200)}")
        if "function" in tool:  # already in chat format
            out.append(dict(tool))
            continue
        if tool.get("type", "function") != "function":
            raise ProtocolError(
                f"tools[{i}] has type {tool.get('type')!r}; only 'function' tools can be sent to a chat backend"
            )
        fn = {"name": tool.get("name")}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_to_chat(choice: Any) -> Any:
    """'auto' | 'none' | 'required' pass; ``{"type": "function", "name": x}`` -> chat's nested form."""
    if isinstance(choice, Mapping) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def create_params_to_chat(params: Mapping[str, Any], model: str, carry_tokens: bool = True) -> dict:
    """Responses create params -> chat completion create params (without token/logprob flags).

    ``max_output_tokens`` becomes ``max_tokens``; unknown keys that are not Responses-only are passed through
    (vLLM accepts extra sampling params such as ``top_k``).
    """
    if "input" not in params:
        raise ProtocolError(
            f"Responses create params have no 'input': {truncate(dict(params), 200)}; "
            'send e.g. {"input": [{"role": "user", "content": "..."}]}'
        )
    chat: dict[str, Any] = {
        "model": model or params.get("model") or "",
        "messages": input_to_messages(params["input"], params.get("instructions"), carry_tokens),
    }
    tools = tools_to_chat(params.get("tools"))
    if tools:
        chat["tools"] = tools
        if params.get("tool_choice") is not None:
            chat["tool_choice"] = tool_choice_to_chat(params["tool_choice"])
    if params.get("max_output_tokens") is not None:
        chat["max_tokens"] = params["max_output_tokens"]
    for key, value in params.items():
        if key in _DROPPED or value is None:
            continue
        chat[key] = value
    return chat


def choice_to_output_items(choice: Mapping[str, Any], token_fields: Mapping[str, Any] | None) -> list[dict]:
    """One chat completion choice -> Responses output items.

    A message item is produced when the model wrote text or made no tool call; each tool call becomes a
    ``function_call`` item. ``token_fields`` (`gym_plugin.protocol.token_fields`) are put on the last item.
    """
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise ProtocolError(f"chat completion choice has no 'message' object: {truncate(dict(choice), 300)}")
    text = message.get("content")
    tool_calls = message.get("tool_calls") or ()
    items: list[dict] = []
    if text or not tool_calls:
        items.append(
            {
                "id": next_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text or "", "annotations": []}],
            }
        )
    for call in tool_calls:
        fn = call.get("function") or {}
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            args = json.dumps(args)
        items.append(
            {
                "type": "function_call",
                "call_id": call.get("id") or next_id("call"),
                "name": fn.get("name", ""),
                "arguments": args,
                "id": next_id("fc"),
                "status": "completed",
            }
        )
    if token_fields:
        items[-1].update(token_fields)
    return items


def output_text(output: list[Mapping[str, Any]]) -> str:
    """Text of the last assistant message item in a Responses ``output`` list ('' when there is none)."""
    for item in reversed(output):
        if item.get("type") == "message" and item.get("role", "assistant") == "assistant":
            return content_text(item.get("content"))
    return ""
