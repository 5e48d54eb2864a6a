"""Helpers of the policy model server's token-in/token-out mode (pure functions, no I/O).

- ``is_constrained``: was this call sampled under a grammar (tool_choice required / named, response format,
  vLLM structured outputs)? Its log-probs are then those of the constrained distribution.
- ``completion_payload``: the chat request the server built -> a ``/completions`` request with token ids.
- ``forced_tool_constraint``: ``tool_choice`` required / named -> vLLM ``structured_outputs`` for /completions.
- ``completion_message``: a ``/completions`` reply -> (assistant message with parsed tool calls, token fields,
  finish_reason), checking that the ids and log-probs are there.
- ``backend_identity``: ``GET /models`` reply -> (owned_by, root) of the first model.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Mapping

from gym_plugin.errors import MalformedResponseError, MissingTokenIdsError, ProtocolError, truncate
from gym_plugin.models.toolcalls import parse_tool_calls
from gym_plugin.protocol import token_fields

# Request keys that make the backend constrain sampling (vLLM's names; guided_* are older vLLM spellings).
_CONSTRAINT_KEYS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                    "guided_decoding_backend", "guided_whitespace_pattern")
# Chat-only keys that a /completions request must not carry (the prompt is already rendered).
_CHAT_ONLY = frozenset(("messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template",
                        "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
                        "documents", "reasoning_effort", "return_tokens_as_token_ids", "top_logprobs",
                        "logprobs", "return_token_ids", "max_completion_tokens", "text"))


def is_constrained(chat: Mapping[str, Any], extra_body: Mapping[str, Any] | None = None) -> bool:
    """True when the backend samples this chat request under a constraint (see the module doc).

    ``tool_choice: "auto"`` is not a constraint (the model decides, and the parser reads its text);
    ``"required"`` and a named function are (vLLM enforces them with a JSON grammar).
    """
    for source in (chat, extra_body or {}):
        choice = source.get("tool_choice")
        if choice == "required" or isinstance(choice, Mapping):
            return True
        fmt = source.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") not in (None, "text"):
            return True
        text = source.get("text")
        fmt = text.get("format") if isinstance(text, Mapping) else None
        if isinstance(fmt, Mapping) and fmt.get("type") not in (None, "text"):
            return True
        if any(source.get(k) is not None for k in _CONSTRAINT_KEYS):
            return True
    return False


def completion_payload(chat: Mapping[str, Any], prompt_ids: list[int],
                       extra_body: Mapping[str, Any] | None = None) -> dict:
    """``/completions`` request: the prompt as token ids, the chat request's sampling params, one log-prob per
    generated token (``logprobs: 0`` = the sampled token's only) and ``return_token_ids``.

    ``max_tokens`` is always sent (null = the rest of the context): vLLM's completions default is 16.
    """
    payload: dict[str, Any] = {"model": chat.get("model", ""), "prompt": prompt_ids,
                               "max_tokens": chat.get("max_tokens", chat.get("max_completion_tokens"))}
    for source in (chat, extra_body or {}):
        for key, value in source.items():
            if key not in _CHAT_ONLY and key not in ("model", "prompt", "max_tokens"):
                payload[key] = value
    payload["logprobs"] = 0
    payload["return_token_ids"] = True
    return payload


def forced_tool_constraint(chat: Mapping[str, Any]) -> tuple[dict | None, str | None]:
    """How a ``/completions`` call honours ``tool_choice`` ``"required"`` or a named function, the way vLLM's chat
    route does it: ``(structured_outputs, forced_name)``.

    - ``"required"``: the generation is a JSON array of ``{"name", "parameters"}`` objects, one schema per tool
      (vLLM's own schema for it: ``tool_parsers.utils._get_json_schema_from_tools``), at most one item when
      ``parallel_tool_calls`` is false;
    - a named function: the generation is that function's arguments object (its parameters schema);
    - anything else: ``(None, None)`` (the model decides; tool calls are parsed from ``<tool_call>`` blocks).
    """
    choice = chat.get("tool_choice")
    functions = {}
    for tool in chat.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and fn.get("name"):
            functions[fn["name"]] = json.loads(json.dumps(fn.get("parameters") or {"type": "object", "properties": {}}))
    if not functions:
        return None, None
    defs: dict[str, Any] = {}
    for params in functions.values():
        defs.update(params.pop("$defs", None) or {})
    if choice == "required":
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
             "required": ["name", "parameters"]} for name, params in functions.items()]}}
        if chat.get("parallel_tool_calls") is False:
            schema["maxItems"] = 1
    elif isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), Mapping) \
            else choice.get("name")
        if name not in functions:
            raise ProtocolError(f"tool_choice names function {name!r}, which is not among the request's tools "
                                f"{sorted(functions)}")
        schema = functions[name]
        if defs:
            schema = {**schema, "$defs": defs}
        return {"json": schema}, name
    else:
        return None, None
    if defs:
        schema["$defs"] = defs
    return {"json": schema}, None


def _forced_calls(text: str, forced_name: str | None) -> list[dict] | None:
    """Tool calls of a generation constrained by ``forced_tool_constraint`` (None when it is not valid JSON, e.g.
    cut by max_tokens: the text is then kept as the message content)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if forced_name is not None:
        pairs = [(forced_name, value)] if isinstance(value, dict) else []
    else:
        pairs = [(v.get("name"), v.get("parameters", {})) for v in value if isinstance(v, dict)] \
            if isinstance(value, list) else []
    if not pairs or not all(isinstance(n, str) and isinstance(a, dict) for n, a in pairs):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}} for n, a in pairs]


def completion_message(completion: Any, base_url: str, parse_tools: bool, forced: bool = False,
                       forced_name: str | None = None) -> tuple[dict, dict, str | None]:
    """A ``/completions`` reply -> (chat-style choice ``{"message", "finish_reason"}``, token fields, text).

    ``parse_tools``: read ``<tool_call>`` blocks from the text; ``forced``: the text is the JSON that
    ``forced_tool_constraint`` asked for (``forced_name`` for a named function).

    Raises MissingTokenIdsError when ids or log-probs are missing (the backend is not vLLM >= 0.10.2) and
    MalformedResponseError when their lengths disagree.
    """
    choices = completion.get("choices") if isinstance(completion, Mapping) else None
    if not choices or not isinstance(choices[0], Mapping):
        raise MalformedResponseError(f"backend {base_url}/completions answered without 'choices': "
                                     f"{truncate(completion, 300)}")
    choice = choices[0]
    prompt_ids = choice.get("prompt_token_ids")
    if prompt_ids is None:
        prompt_ids = completion.get("prompt_token_ids")
    gen_ids = choice.get("token_ids")
    logprobs = choice.get("logprobs")
    lps = logprobs.get("token_logprobs") if isinstance(logprobs, Mapping) else None
    missing = [what for what, value in (("prompt token ids ('choices[0].prompt_token_ids')", prompt_ids),
                                        ("generation token ids ('choices[0].token_ids')", gen_ids),
                                        ("log-probs ('choices[0].logprobs.token_logprobs')", lps))
               if value is None]
    if missing:
        raise MissingTokenIdsError(
            f"backend {base_url}/completions returned no {', no '.join(missing)} for a token-id prompt with "
            "return_token_ids and logprobs=0. Use a vLLM server (>= 0.10.2), or set token_mode: chat for a "
            "backend without token-in/token-out completions."
        )
    if len(lps) != len(gen_ids) or any(lp is None for lp in lps):
        raise MalformedResponseError(f"backend {base_url}/completions: {len(gen_ids)} generation token ids but "
                                     f"log-probs {truncate(lps, 200)}")
    text = choice.get("text") or ""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if forced:
        calls = _forced_calls(text, forced_name)
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
    elif parse_tools:
        parsed = parse_tool_calls(text)
        if parsed.tool_calls:
            message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
    fields = token_fields(prompt_ids, gen_ids, lps)
    return {"message": message, "finish_reason": choice.get("finish_reason")}, fields, text


def backend_identity(reply: Any) -> tuple[str | None, str | None]:
    """(owned_by, root) of the first model in a ``GET /models`` reply ((None, None) when it has none)."""
    data = reply.get("data") if isinstance(reply, Mapping) else None
    if not data or not isinstance(data[0], Mapping):
        return None, None
    first = data[0]
    return first.get("owned_by"), first.get("root")
