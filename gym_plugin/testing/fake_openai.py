"""A scripted, fast, OpenAI-compatible fake endpoint (what vLLM looks like to the policy model server).

`FakeOpenAIServer` answers ``POST /v1/chat/completions``, ``POST /tokenize`` and ``GET /v1/models`` with token
ids and log-probs in both vLLM styles (protocol.md):

- style A (``return_tokens_as_token_ids: true``): ``choices[0].logprobs.content[i].token == "token_id:<int>"``;
  prompt ids from ``POST /tokenize``;
- style B (``return_token_ids: true``): top-level ``prompt_token_ids`` and ``choices[0].token_ids``.

Tokenization is deterministic and *prefix-consistent*, like a real chat template: the prompt is a sequence of
segments ``[IM_START, role] + word ids + [IM_END]`` (one id per whitespace-separated word, crc32-hashed), the
generation prompt is ``[IM_START, ASSISTANT]`` and a generation is ``word ids + [IM_END]``. So the prompt of
turn k+1 starts with exactly turn k's prompt + generation, as a real model server's would, and
process_rollouts sees realistic multi-turn data. Segment ids are cached per (role, text).

What the fake says is SCRIPTED: ``script`` is one behaviour for every request, a list of ``(marker, behaviour)`` rules (the first rule whose
marker is a substring of the last user message wins) or a callable ``(messages, body) -> behaviour``; a
behaviour is a `Behaviour`, a `Turn`, or a plain string (the reply text). A `Behaviour` gives one `Turn` per
assistant turn (reply text and/or tool calls), and can fail with an HTTP status N times per prompt, delay,
answer malformed JSON, drop the connection, or answer vLLM's context-length 400.

``requests`` counts requests per route (tests assert that both of two base_urls were used).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

from aiohttp import web

from gym_plugin.errors import EndpointUnreachableError, MalformedResponseError, truncate
from gym_plugin.responses import content_text
from gym_plugin.servers.base import Directory, HandlerError, RequestContext, Server
from gym_plugin.servers.registry import POLICY_ENDPOINT, register

IM_START, IM_END = 1, 2
ROLE_IDS = {"system": 3, "user": 4, "assistant": 5, "tool": 6, "developer": 7, "tools": 8}
WORD_ID_BASE = 16
"""Ids below this are special tokens; word ids are crc32(word) % vocab + WORD_ID_BASE."""
LOG_PROBS = (-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7)
"""The log-prob the fake reports for generated token id t is LOG_PROBS[t % 7]."""


@dataclass
class ToolCall:
    """One tool call the fake model makes."""

    name: str
    """Function name."""
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    """Arguments: a dict (sent as compact JSON) or a raw string (e.g. deliberately broken JSON)."""


@dataclass
class Turn:
    """What the fake model generates in one assistant turn."""

    text: str = ""
    """Reply text (may be empty when the turn only calls tools)."""
    tool_calls: Sequence[ToolCall | tuple] = ()
    """Tool calls, as ToolCall or (name, arguments) tuples."""
    finish_reason: str | None = None
    """Defaults to 'tool_calls' when there are tool calls, else 'stop'."""


@dataclass
class Behaviour:
    """How the fake answers one request. Failure counters are kept per (behaviour object, last user text)."""

    turns: Sequence[Turn | str] = ("OK",)
    """Reply of assistant turn k (k = assistant messages already in the history); the last one repeats."""
    fail_status: int = 0
    """HTTP status of the failures (e.g. 503); 0 = never fail."""
    fail_times: int = 0
    """How many requests for the same prompt fail with ``fail_status`` before it answers (a 5xx burst)."""
    delay_s: float = 0.0
    """Seconds to wait before answering."""
    malformed: bool = False
    """Answer HTTP 200 with a body that is not JSON."""
    drop_connection: bool = False
    """Close the connection without answering (in process: raise EndpointUnreachableError)."""
    context_length_error: bool = False
    """Answer vLLM's HTTP 400 'maximum context length' error."""


ScriptEntry = Union[Behaviour, Turn, str]
Script = Union[ScriptEntry, Sequence[tuple[str, ScriptEntry]], Callable[[list, dict], ScriptEntry], None]


class _DropConnection(web.StreamResponse):
    """Returned by a handler to make aiohttp close the socket without writing a reply."""

    async def prepare(self, request):  # type: ignore[override]
        if request.transport is not None:
            request.transport.close()
        raise ConnectionResetError("fake endpoint dropped the connection on purpose")


@dataclass
class FakeOpenAIConfig:
    """``policy_endpoint: {impl: fake_openai, ...}``: the options of `FakeOpenAIServer` (its constructor's keywords)."""

    script: Any = None
    """What it answers: a reply text, a `Behaviour`, rules or a callable (see the module docstring); None: ``default``."""
    model: str | None = None
    """The one model name it serves (others get 404, as from vLLM); None: any name, and /v1/models lists none."""
    default: Any = "OK"
    """The answer when no rule of ``script`` matches."""
    token_ids: bool = True
    """False: ignore return_token_ids / return_tokens_as_token_ids (a backend that has no token ids)."""
    policy_version: int | None = None
    """Added as a top-level 'policy_version' to every completion when not None (like the embedded server)."""
    max_model_len: int = 32768
    """Context length: longer prompts + max_tokens get vLLM's context-length 400."""
    vocab_size: int = 50000
    """Word ids are crc32(word) % vocab_size + WORD_ID_BASE."""


@register(POLICY_ENDPOINT, "fake_openai")
class FakeOpenAIServer(Server):
    """Scripted OpenAI-compatible endpoint. Its base_url for clients is ``server.base_url`` (``.../v1``)."""

    server_type = ""
    Config = FakeOpenAIConfig

    @classmethod
    def from_config(cls, name: str, config: FakeOpenAIConfig, directory: Directory | None = None, *,
                    host: str = "127.0.0.1", port: int = 0) -> "FakeOpenAIServer":
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(name, options.pop("script"), host=host, port=port, **options)

    def __init__(
        self,
        name: str = "fake_openai",
        script: Script = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str | None = None,
        default: ScriptEntry = "OK",
        token_ids: bool = True,
        policy_version: int | None = None,
        max_model_len: int = 32768,
        vocab_size: int = 50000,
    ):
        super().__init__(name, host=host, port=port)
        # Config overrides parse `default=4` as an int: a number means its text.
        script = str(script) if isinstance(script, (int, float)) and not isinstance(script, bool) else script
        default = str(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else default
        self.script = script
        self.model = model
        """The one model name it serves (a request for another gets 404, as from vLLM); None: any name, and
        ``/v1/models`` lists none."""
        self.default = default
        self.token_ids = token_ids
        """False makes the fake ignore return_token_ids / return_tokens_as_token_ids (a non-vLLM backend)."""
        self.policy_version = policy_version
        """Added as top-level 'policy_version' to every completion when not None (like the embedded server)."""
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.requests: Counter[str] = Counter()
        """Requests served, per route path ('/v1/chat/completions', '/tokenize', ...)."""
        self.last_request: dict | None = None
        """Body of the last chat completion request (to inspect what the policy server sent)."""
        self._seg_cache: dict[tuple[str, str], list[int]] = {}
        self._fail_counts: Counter[tuple[int, str]] = Counter()
        self._completion_ids = 0

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def routes(self):
        return [
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/tokenize", self.tokenize),
            ("GET", "/v1/models", self.models),
        ]

    # ---- tokenization ----------------------------------------------------------------------------------
    def _words(self, text: str) -> list[int]:
        v, base = self.vocab_size, WORD_ID_BASE
        return [zlib.crc32(w.encode()) % v + base for w in text.split()]

    def _segment(self, role: str, text: str) -> list[int]:
        key = (role, text)
        ids = self._seg_cache.get(key)
        if ids is None:
            if len(self._seg_cache) > 200_000:  # bounded: a long benchmark must not grow memory forever
                self._seg_cache.clear()
            ids = [IM_START, ROLE_IDS.get(role, 9), *self._words(text), IM_END]
            self._seg_cache[key] = ids
        return ids

    @staticmethod
    def _body_text(message: Mapping[str, Any]) -> str:
        """What an assistant message 'says', tool calls included, as the template would render it."""
        text = content_text(message.get("content"))
        for call in message.get("tool_calls") or ():
            fn = call.get("function") or {}
            text += f" <tool_call> {fn.get('name')} {fn.get('arguments')} </tool_call>"
        return text

    def prompt_ids(self, messages: list, tools: list | None = None) -> list[int]:
        """Token ids of the rendered prompt, generation prompt included."""
        ids: list[int] = []
        if tools:
            ids += self._segment("tools", json.dumps(tools, sort_keys=True))
        for m in messages:
            role = m.get("role", "user")
            text = self._body_text(m) if role == "assistant" else content_text(m.get("content"))
            ids += self._segment(role, text)
        ids += (IM_START, ROLE_IDS["assistant"])
        return ids

    # ---- scripting -------------------------------------------------------------------------------------
    def _behaviour(self, messages: list, body: dict) -> tuple[ScriptEntry, str]:
        last_user = ""
        for m in reversed(messages):
            if m.get("role") == "user":
                last_user = content_text(m.get("content"))
                break
        script = self.script
        if isinstance(script, (Behaviour, Turn, str)):
            return script, last_user
        if callable(script):
            return script(messages, body), last_user
        if script:
            for marker, entry in script:
                if marker in last_user:
                    return entry, last_user
        return self.default, last_user

    # ---- routes ----------------------------------------------------------------------------------------
    async def models(self, body: Any, ctx: RequestContext) -> dict:
        self.requests["/v1/models"] += 1
        served = [] if self.model is None else [{"id": self.model, "object": "model", "owned_by": "gym_plugin"}]
        return {"object": "list", "data": served}

    async def tokenize(self, body: Any, ctx: RequestContext) -> dict:
        self.requests["/tokenize"] += 1
        if not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
            raise HandlerError(400, f"/tokenize expects {{'model', 'messages'}}, got {truncate(body, 200)}")
        ids = self.prompt_ids(body["messages"], body.get("tools"))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    async def chat_completions(self, body: Any, ctx: RequestContext):
        self.requests["/v1/chat/completions"] += 1
        self.last_request = body
        if not isinstance(body, Mapping) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise HandlerError(400, f"'messages' must be a non-empty list, got {truncate(body, 200)}")
        if self.model is not None and body.get("model") not in (None, self.model):
            raise HandlerError(404, f"The model `{body['model']}` does not exist.")
        messages = body["messages"]
        entry, last_user = self._behaviour(messages, body)
        behaviour = entry if isinstance(entry, Behaviour) else None
        if behaviour is not None:
            if behaviour.delay_s:
                await asyncio.sleep(behaviour.delay_s)
            if behaviour.fail_times and behaviour.fail_status:
                key = (id(behaviour), last_user)
                if self._fail_counts[key] < behaviour.fail_times:
                    self._fail_counts[key] += 1
                    raise HandlerError(
                        behaviour.fail_status,
                        f"scripted failure {self._fail_counts[key]}/{behaviour.fail_times}",
                        "server_error",
                    )
            if behaviour.drop_connection:
                return _DropConnection()
            if behaviour.malformed:
                return web.Response(text='{"choices": [ this is not json', content_type="application/json")

        prompt = self.prompt_ids(messages, body.get("tools"))
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        if (behaviour is not None and behaviour.context_length_error) or len(prompt) + max_tokens > self.max_model_len:
            # vLLM's wording, which the policy model server recognises.
            raise HandlerError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                "BadRequestError",
            )

        turn = self._turn(entry, messages)
        return self._completion(body, prompt, turn)

    def _turn(self, entry: ScriptEntry, messages: list) -> Turn:
        if isinstance(entry, str):
            return Turn(text=entry)
        if isinstance(entry, Turn):
            return entry
        k = sum(1 for m in messages if m.get("role") == "assistant")
        t = entry.turns[min(k, len(entry.turns) - 1)]
        return Turn(text=t) if isinstance(t, str) else t

    def _completion(self, body: Mapping[str, Any], prompt: list[int], turn: Turn) -> dict:
        tool_calls = []
        self._completion_ids += 1
        n = self._completion_ids
        for j, call in enumerate(turn.tool_calls):
            name, args = (call.name, call.arguments) if isinstance(call, ToolCall) else call
            args_str = args if isinstance(args, str) else json.dumps(args, separators=(",", ":"))
            tool_calls.append(
                {"id": f"call_{n:x}_{j}", "type": "function", "function": {"name": name, "arguments": args_str}}
            )
        message: dict[str, Any] = {"role": "assistant", "content": turn.text or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        gen_text = self._body_text(message)
        words = gen_text.split()
        gen_ids = self._words(gen_text) + [IM_END]
        # Deterministic log-probs in [-0.7, -0.1]: a function of the token id only (LOG_PROBS[id % 7]).
        logprobs = [LOG_PROBS[t % 7] for t in gen_ids]
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": turn.finish_reason or ("tool_calls" if tool_calls else "stop"),
        }
        want_ids = self.token_ids
        if body.get("logprobs"):
            if want_ids and body.get("return_tokens_as_token_ids"):
                tokens = [f"token_id:{t}" for t in gen_ids]
            else:
                tokens = [*words, "<|im_end|>"]
            choice["logprobs"] = {
                "content": [
                    {"token": tok, "logprob": lp, "bytes": None, "top_logprobs": []}
                    for tok, lp in zip(tokens, logprobs)
                ]
            }
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{n:x}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model") or self.model or "fake-model",
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(gen_ids),
                "total_tokens": len(prompt) + len(gen_ids),
            },
        }
        if want_ids and body.get("return_token_ids"):
            reply["prompt_token_ids"] = prompt
            choice["token_ids"] = gen_ids
        if self.policy_version is not None:
            reply["policy_version"] = self.policy_version
        return reply

    # ---- in-process calls: make the special replies behave as they do over HTTP -------------------------
    async def dispatch_local(self, method, path, body, *, session_id=None, headers=None):
        reply = await super().dispatch_local(method, path, body, session_id=session_id, headers=headers)
        data = reply.data
        if isinstance(data, web.StreamResponse):
            url = f"{self.url}{path}"
            if isinstance(data, _DropConnection):
                raise EndpointUnreachableError(
                    f"Connection to {url} broke: the fake endpoint dropped it (scripted).", url=url
                )
            raise MalformedResponseError(
                f"{method} {url} answered HTTP 200 with a body that is not JSON: {truncate(data.text, 300)}"
            )
        return reply

