"""Helpers of the policy model server's token-in/token-out mode (pure functions, no I/O).

- ``is_constrained``: was this call sampled under a grammar (tool_choice required / named, response format,
  vLLM structured outputs)? Its log-probs are then those of the constrained distribution.
- ``completion_payload``: the chat request the server built -> a ``/completions`` request with token ids.
- ``forced_tool_constraint``: ``tool_choice`` required / named -> the ``structured_outputs`` vLLM's chat route
  would use (its Hermes structural tag), for /completions.
- ``completion_message``: a ``/completions`` reply -> (assistant message with parsed tool calls, token fields,
  finish_reason), checking that the ids and log-probs are there.
- ``backend_identity``: ``GET /models`` reply -> (owned_by, root) of the first model.
"""

from __future__ import annotations

import json
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


TOOL_CALL_PARSERS = ("hermes",)
"""vLLM ``--tool-call-parser`` values whose forced-call constraint token-in mode builds (and whose ``<tool_call>``
format it parses)."""

# vLLM 0.32's Hermes structural tag (vllm/tool_parsers/structural_tag_registry.py, _hermes_tool_tags): each tool may
# be written with or without newlines inside the <tool_call> block; the arguments are the JSON after '"arguments": '.
_HERMES_FORMATS = (('<tool_call>\n{"name": "', '}\n</tool_call>'), ('<tool_call>{"name": "', '}</tool_call>'))
_HERMES_ARGUMENTS = '", "arguments": '


def _json_schema_format(schema: Any) -> dict:
    """xgrammar's JSONSchemaFormat as vLLM dumps it (its defaults written out)."""
    return {"type": "json_schema", "json_schema": schema, "style": "json", "any_order": False,
            "max_whitespace_cnt": None, "excludes": []}


def hermes_structural_tag(functions: list[tuple[str, Any]], stop_after_first: bool) -> dict:
    """vLLM's Hermes structural tag for ``functions`` ((name, arguments schema) pairs; ``True`` = any JSON): one
    or more ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks and nothing else, only the first when
    ``stop_after_first``."""
    tags = [{"type": "tag", "begin": begin + name + _HERMES_ARGUMENTS, "content": _json_schema_format(schema),
             "end": end} for name, schema in functions for begin, end in _HERMES_FORMATS]
    return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "",
                                                 "at_least_one": True, "stop_after_first": stop_after_first}}


def forced_tool_constraint(chat: Mapping[str, Any], parser: str = "hermes") -> dict | None:
    """The ``structured_outputs`` a ``/completions`` call needs to honour ``tool_choice`` ``"required"`` or a named
    function exactly as vLLM 0.32's chat route does with ``--tool-call-parser hermes`` (and
    ``VLLM_ENFORCE_STRICT_TOOL_CALLING``, on by default; ``--tool-strict-level auto``): a structural tag
    (`hermes_structural_tag`) over the request's function tools, or only the named one; several calls per turn for
    ``"required"`` unless ``parallel_tool_calls`` is false, one for a named function. A tool's arguments follow its
    ``parameters`` schema when it is ``strict: true``, else any JSON (vLLM: ``resolve_tool_strictness``). The
    generation is then Hermes text, parsed like any other (`gym_plugin.models.toolcalls`).

    None for any other ``tool_choice`` (the model decides). ProtocolError for a parser other than
    `TOOL_CALL_PARSERS` or a named function that is not among the tools.
    """
    choice = chat.get("tool_choice")
    if choice != "required" and not isinstance(choice, Mapping):
        return None
    if parser not in TOOL_CALL_PARSERS:
        raise ProtocolError(
            f"tool_choice {truncate(choice, 80)} in token-in mode needs the constraint vLLM builds for its tool call "
            f"parser, and gym_plugin builds it for {list(TOOL_CALL_PARSERS)} only, not {parser!r}. Serve the model "
            "with --tool-call-parser hermes, or set token_mode: chat (vLLM then builds it itself).")
    functions: dict[str, Any] = {}
    for tool in chat.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, Mapping) and tool.get("type", "function") == "function" \
            else None
        if isinstance(fn, Mapping) and fn.get("name"):
            params = fn.get("parameters")
            functions[fn["name"]] = params if fn.get("strict") is True and params is not None else True
    if not functions:
        return None
    if isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), Mapping) \
            else choice.get("name")
        if name not in functions:
            raise ProtocolError(f"tool_choice names function {name!r}, which is not among the request's tools "
                                f"{sorted(functions)}")
        tag = hermes_structural_tag([(name, functions[name])], stop_after_first=True)
    else:
        tag = hermes_structural_tag(list(functions.items()),
                                    stop_after_first=chat.get("parallel_tool_calls") is False)
    return {"structural_tag": json.dumps(tag)}


def completion_message(completion: Any, base_url: str, parse_tools: bool) -> tuple[dict, dict, str | None]:
    """A ``/completions`` reply -> (chat-style choice ``{"message", "finish_reason"}``, token fields, text).

    ``parse_tools``: read ``<tool_call>`` blocks from the text (forced calls are such blocks too).

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
    if parse_tools:
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
