"""Policy model server: Responses API in; OpenAI Completions (token ids) or Chat Completions out.

``POST /v1/responses`` takes Responses create params, sends one model call to one of the configured backends
asking for token ids and log-probs, and answers a Responses object whose output items carry
``prompt_token_ids``, ``generation_token_ids`` and ``generation_log_probs`` on the last item of the call
(protocol.md). ``POST /v1/chat/completions`` passes a chat request through to a backend unchanged.

Two ways to make the call (``token_mode``):

- ``completions`` (token-in/token-out): ``POST {base_url}/completions`` with ``prompt`` = token ids. The first
  call renders the conversation with the model's chat template (``chat_template.ChatRenderer``); call k+1
  sends call k's ``prompt_token_ids + generation_token_ids`` plus only the tokens of what was appended since
  (``tito.build_prompt``), so multi-turn rollouts never drift and the model's output is never re-tokenized.
  Tool calls are parsed from the generated text (``toolcalls.parse_tool_calls``, Hermes ``<tool_call>``
  blocks), as the embedded server does. Needs the model's tokenizer: ``tokenizer`` (an HF folder or hub id),
  or, when unset, the ``root`` the backend reports in ``GET /models`` (vLLM reports its ``--model``).
- ``chat``: ``POST {base_url}/chat/completions`` with token styles A/B (``token_style``). The backend
  re-renders the history each turn; the ids of earlier turns ride on history messages, which vLLM ignores, so
  multi-turn rollouts may drift (``process_rollouts`` detects and counts it).
- ``auto`` (default): ``completions`` for a backend whose ``GET /models`` says ``owned_by: vllm``, ``chat``
  otherwise (asked once per backend).

A call sampled under a constraint (``tool_choice: "required"`` or a named function, a ``response_format`` /
``text.format`` other than text, vLLM ``structured_outputs`` / ``guided_*``) reports log-probs of the
constrained distribution, not of the policy: its token-carrying item gets ``constrained: true``
(``process_rollouts`` leaves such tokens out of the loss by default). In completions mode ``tool_choice``
"required" / a named function is enforced as vLLM's chat route does it for ``--tool-call-parser hermes``, with the
same ``structured_outputs`` (vLLM's Hermes structural tag: ``<tool_call>{"name", "arguments"}</tool_call>`` blocks,
one per turn unless ``parallel_tool_calls``; ``tokens.forced_tool_constraint``), so such turns keep extending the
tokens too and read as any other Hermes output. Other parsers (``tool_call_parser``) need ``token_mode: chat``.

Policy version: a completion that carries ``policy_version`` (the embedded server) gives it; otherwise the
server asks ``GET {root}/weight_info`` (vLLM dev mode) before and after the call and reports the version the
call started with (``report_policy_version``; a backend without the route is asked once).

Backend choice: ``round_robin`` or ``least_busy`` (fewest requests in flight), made once per rollout: a caller
that sends the ``x-gym-plugin-route-key`` header (the agent sends one per rollout) gets the same backend for
every turn of that rollout, so a backend's prefix cache is reused and the backend is "chosen once per rollout"
as in NeMo Gym.

Failures: connection errors, timeouts, 429 and 5xx are retried (bounded, ``max_attempts``); when they run out
the server answers HTTP 502 whose message names the backend URL. A 400 about the context length becomes an
empty completion with ``incomplete_details: {"reason": "max_output_tokens"}`` (the agent then stops).
A reply without the token information that was asked for raises MissingTokenIdsError (HTTP 400) naming the
backend and the fix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar, Mapping

from gym_plugin.errors import (
    EndpointError,
    MalformedResponseError,
    MissingTokenIdsError,
    ProtocolError,
    truncate,
)
from gym_plugin.http import HTTPStatusError, RetryPolicy, Transport, bearer_headers, post_with_retries
from gym_plugin.protocol import CONSTRAINED_KEY, POLICY_VERSION_KEY, TOKEN_FIELDS, token_fields
from gym_plugin.responses import choice_to_output_items, create_params_to_chat, next_id
from gym_plugin.servers.base import Directory, HandlerError, RequestContext, Server
from gym_plugin.servers.policy.backends import BackendFacts
from gym_plugin.servers.policy.config import PolicyModelConfig
from gym_plugin.servers.registry import register
from gym_plugin.servers.policy.tokens import (
    completion_message,
    completion_payload,
    forced_tool_constraint,
    is_constrained,
)

logger = logging.getLogger(__name__)

ROUTE_KEY_HEADER = "x-gym-plugin-route-key"
"""Request header that pins all requests with the same value to one backend (one value per rollout)."""

_CONTEXT_LENGTH_MARKERS = ("maximum context length", "context_length_exceeded", "context length",
                           "maximum model length", "max_model_len")


def _root(base_url: str) -> str:
    """vLLM serves /tokenize, /weight_info, ... at the server root, not under /v1."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _tokenize_url(base_url: str) -> str:
    return f"{_root(base_url)}/tokenize"


def _is_context_length_error(e: HTTPStatusError) -> bool:
    if e.status != 400:
        return False
    body = e.body.lower() if e.body else str(e).lower()
    return any(m in body for m in _CONTEXT_LENGTH_MARKERS)


@register("responses_api_models", "vllm_model")
class PolicyModelServer(Server):
    """``responses_api_models / vllm_model``: see the module docstring."""

    server_type: ClassVar[str] = "responses_api_models"
    Config: ClassVar[type] = PolicyModelConfig

    def __init__(self, name: str, config: PolicyModelConfig, directory: Directory | None = None, *,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(name, host=host, port=port)
        self.config = config
        self.directory = directory
        self.base_urls = config.base_urls
        self._retry = RetryPolicy(max_attempts=config.max_attempts, backoff_s=config.backoff_s)
        self._in_flight = [0] * len(self.base_urls)
        self.requests_per_backend = [0] * len(self.base_urls)
        """Requests sent to each backend, /tokenize included (same order as base_urls)."""
        self._rr = 0
        self._sticky: dict[str, int] = {}
        self.transport: Transport | None = None
        style = config.token_style
        self._token_flags: dict[str, Any] = {"logprobs": True, "top_logprobs": 0} if style != "none" else {}
        if style == "A":
            self._token_flags["return_tokens_as_token_ids"] = True
        elif style == "B":
            self._token_flags["return_token_ids"] = True
        self.backends = BackendFacts(name, config, self.base_urls, self._transport, self._retry)
        """Token mode, model root (tokenizer), weight-version route of each backend: learned once, on first use."""
        self.stats: dict[str, int] = {"completions_calls": 0, "chat_calls": 0, "continued_prompts": 0,
                                      "continuation_fallbacks": 0, "constrained_calls": 0}
        """Counters: calls per mode, prompts built by extending earlier ids, fallbacks to a full render (the
        rollout will show as drift), calls sampled under a constraint."""

    def routes(self):
        return [
            ("POST", "/v1/responses", self.responses),
            ("POST", "/v1/chat/completions", self.chat_completions),
        ]

    async def on_start(self) -> None:
        self.transport = Transport(
            limit=self.config.connector_limit,
            limit_per_host=self.config.connector_limit_per_host,
            timeout_s=self.config.timeout_s,
            headers=bearer_headers(self.config.api_key),
        )

    async def on_stop(self) -> None:
        if self.transport is not None:
            await self.transport.close()

    # ---- backend choice -----------------------------------------------------------------------------------
    def _pick(self, route_key: str | None) -> int:
        if route_key is not None:
            idx = self._sticky.get(route_key)
            if idx is not None:
                return idx
        n = len(self.base_urls)
        if n == 1:
            idx = 0
        elif self.config.routing == "least_busy":
            inflight = self._in_flight
            idx = min(range(n), key=inflight.__getitem__)
        else:
            idx = self._rr % n
            self._rr += 1
        if route_key is not None and n > 1:
            sticky = self._sticky
            if len(sticky) >= self.config.max_sticky_rollouts:
                sticky.pop(next(iter(sticky)))  # dicts keep insertion order: forget the oldest rollout
            sticky[route_key] = idx
        return idx

    def _transport(self) -> Transport:
        if self.transport is None:
            raise HandlerError(503, f"policy model server {self.name!r} is not started (call start() first)")
        return self.transport

    # ---- routes ---------------------------------------------------------------------------------------------
    async def chat_completions(self, body: Any, ctx: RequestContext) -> Any:
        """Pass a chat completion request through to a backend (model name filled in when missing)."""
        if not isinstance(body, Mapping):
            raise ProtocolError(f"{self.name}: /v1/chat/completions expects a JSON object, got {truncate(body, 200)}")
        payload = dict(body)
        payload.setdefault("model", self.config.model)
        idx = self._pick(ctx.headers.get(ROUTE_KEY_HEADER))
        self._in_flight[idx] += 1
        try:
            reply, _ = await self._post_backend(idx, "/chat/completions", payload)
        finally:
            self._in_flight[idx] -= 1
        return reply

    async def responses(self, body: Any, ctx: RequestContext) -> dict:
        if not isinstance(body, Mapping):
            raise ProtocolError(f"{self.name}: /v1/responses expects Responses create params, got {truncate(body, 200)}")
        idx = self._pick(ctx.headers.get(ROUTE_KEY_HEADER))
        # In flight from the pick on (not only while posting): least_busy must see calls that are still
        # asking the backend's mode or version.
        self._in_flight[idx] += 1
        try:
            return await self._responses(body, idx)
        finally:
            self._in_flight[idx] -= 1

    async def _responses(self, body: Mapping[str, Any], idx: int) -> dict:
        mode = await self.backends.mode(idx)
        # Token ids of earlier turns ride on history messages only for token-aware backends (vLLM ignores
        # unknown message keys; a strict OpenAI-compatible server may reject them).
        chat = create_params_to_chat(body, self.config.model,
                                     carry_tokens=mode == "completions" or self.config.token_style != "none")
        constrained = is_constrained(chat, self.config.extra_body)
        if constrained:
            self.stats["constrained_calls"] += 1
        if mode == "completions":
            return await self._responses_completions(body, chat, idx, constrained)
        self.stats["chat_calls"] += 1
        if self._token_flags:
            chat.update(self._token_flags)
        if self.config.extra_body:
            chat.update(self.config.extra_body)
        base_url = self.base_urls[idx]
        version_before = await self.backends.version(idx)

        tokenize_task = None
        if self.config.token_style == "A":
            # Prompt ids come from a second call; run it alongside the completion.
            tok_body = {"model": chat["model"], "messages": chat["messages"]}
            if "tools" in chat:
                tok_body["tools"] = chat["tools"]
            tokenize_task = asyncio.ensure_future(self._post_backend(idx, None, tok_body, url=_tokenize_url(base_url)))
        try:
            completion, _ = await self._post_backend(idx, "/chat/completions", chat)
        except HTTPStatusError as e:
            if tokenize_task is not None:
                tokenize_task.cancel()
            if _is_context_length_error(e):
                return self._response(body, [], None, {"reason": "max_output_tokens"})
            raise
        except BaseException:
            if tokenize_task is not None:
                tokenize_task.cancel()
            raise

        if not isinstance(completion, Mapping) or not completion.get("choices"):
            if tokenize_task is not None:
                tokenize_task.cancel()
            raise HandlerError(
                502,
                f"policy model server {self.name!r}: backend {base_url}/chat/completions answered without "
                f"'choices': {truncate(completion, 300)}",
                "upstream_error",
            )
        choice = completion["choices"][0]
        token_fields = None
        if self.config.token_style != "none":
            prompt_ids = None
            if tokenize_task is not None:
                tok, _ = await tokenize_task
                prompt_ids = tok.get("tokens") if isinstance(tok, Mapping) else None
            token_fields = self._token_fields(completion, choice, base_url, prompt_ids)
            await self._mark_call(token_fields, completion, idx, version_before, constrained)
        return self._call_response(body, choice, token_fields, completion)

    async def _responses_completions(self, body: Mapping[str, Any], chat: dict, idx: int, constrained: bool) -> dict:
        """Token-in/token-out: the prompt as ids to /completions (see the module docstring)."""
        from gym_plugin.servers.policy.tito import ContinuationError, build_prompt

        self.stats["completions_calls"] += 1
        renderer = await self.backends.renderer(idx)
        tools = chat.get("tools")
        kwargs = chat.get("chat_template_kwargs") or self.config.extra_body.get("chat_template_kwargs")
        try:
            prompt = build_prompt(renderer, chat["messages"], tools, kwargs)
        except ContinuationError as e:
            # Not silent: counted, logged, and the rollout shows as drift in process_rollouts.
            self.stats["continuation_fallbacks"] += 1
            logger.warning("policy model server %r: %s; rendering the whole conversation instead", self.name, e)
            plain = [{k: v for k, v in m.items() if k not in TOKEN_FIELDS} for m in chat["messages"]]
            prompt = build_prompt(renderer, plain, tools, kwargs)
        if prompt.continued_from is not None:
            self.stats["continued_prompts"] += 1
        payload = completion_payload(chat, prompt.ids, self.config.extra_body)
        forced = forced_tool_constraint(chat, self.config.tool_call_parser)
        if forced is not None:  # as vLLM's chat route: the forced call wins over any other output format
            payload["structured_outputs"] = forced
            payload.pop("response_format", None)
        base_url = self.base_urls[idx]
        version_before = await self.backends.version(idx)
        try:
            completion, _ = await self._post_backend(idx, "/completions", payload)
        except HTTPStatusError as e:
            if _is_context_length_error(e):
                return self._response(body, [], None, {"reason": "max_output_tokens"})
            raise
        parse_tools = bool(tools) and chat.get("tool_choice") != "none"
        choice, token_fields, _ = completion_message(completion, base_url, parse_tools)
        await self._mark_call(token_fields, completion, idx, version_before, constrained)
        return self._call_response(body, choice, token_fields, completion)

    # ---- helpers --------------------------------------------------------------------------------------------
    async def _mark_call(self, token_fields: dict, completion: Mapping[str, Any], idx: int,
                         version_before: int | None, constrained: bool) -> None:
        """Add the call's policy version (the backend's reply, else asked of it) and the constrained flag to the
        token fields of its last output item."""
        version = completion.get("policy_version")
        if version is None:
            version = await self.backends.call_version(idx, version_before)
        if version is not None:
            token_fields[POLICY_VERSION_KEY] = version
        if constrained:
            token_fields[CONSTRAINED_KEY] = True

    def _call_response(self, body: Mapping[str, Any], choice: Mapping[str, Any], token_fields: dict | None,
                       completion: Mapping[str, Any]) -> dict:
        """The Responses object of one model call (incomplete when it stopped at max tokens)."""
        output = choice_to_output_items(choice, token_fields)
        incomplete = {"reason": "max_output_tokens"} if choice.get("finish_reason") == "length" else None
        return self._response(body, output, completion.get("usage"), incomplete)

    async def _post_backend(self, idx: int, path: str | None, payload: Any, url: str | None = None):
        base_url = self.base_urls[idx]
        url = url or f"{base_url}{path}"
        self.requests_per_backend[idx] += 1
        try:
            reply, attempts = await post_with_retries(self._transport(), url, payload, self._retry)
        except HTTPStatusError as e:
            if e.status >= 500 or e.status == 429:
                raise HandlerError(
                    502,
                    f"policy model server {self.name!r}: backend {url} failed after {getattr(e, 'attempts', 1)} "
                    f"attempt(s): HTTP {e.status}: {truncate(e.body, 300)}",
                    "upstream_error",
                ) from e
            raise
        except (EndpointError, MalformedResponseError) as e:
            # A reply that is not JSON (truncated, a proxy's HTML page) is the backend's failure, like a reset:
            # 502, so the caller retries it, not a 400 that blames the request.
            raise HandlerError(
                502,
                f"policy model server {self.name!r}: backend {url} failed after {getattr(e, 'attempts', 1)} "
                f"attempt(s): {e}",
                "upstream_error",
            ) from e
        return reply.data, attempts

    def _token_fields(self, completion: Mapping, choice: Mapping, base_url: str,
                      prompt_ids: list[int] | None) -> dict:
        style = self.config.token_style
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
        if style == "B":
            prompt_ids = completion.get("prompt_token_ids")
            gen_ids = choice.get("token_ids")
        else:
            gen_ids = None
            if content is not None:
                try:
                    # "token_id:123" -> 123 (vLLM's return_tokens_as_token_ids format)
                    gen_ids = [int(c["token"][9:]) for c in content]
                except (ValueError, KeyError, TypeError):
                    gen_ids = None
        missing = []
        if prompt_ids is None:
            missing.append("prompt token ids" + (" (/tokenize)" if style == "A" else " ('prompt_token_ids')"))
        if gen_ids is None:
            missing.append("generation token ids" + (" ('token_id:<int>' log-prob tokens)" if style == "A"
                                                     else " ('choices[0].token_ids')"))
        if content is None:
            missing.append("log-probs ('choices[0].logprobs.content')")
        if missing:
            fix = ("use a vLLM server (>= 0.10.2 supports return_token_ids), or set token_style: A for older vLLM"
                   if style == "B" else "use a vLLM server (it supports return_tokens_as_token_ids and /tokenize)")
            raise MissingTokenIdsError(
                f"policy model server {self.name!r}: backend {base_url} returned no {', no '.join(missing)} with "
                f"token_style {style!r}. Training needs them: {fix}; for evaluation only, set token_style: none."
            )
        gen_log_probs = [c["logprob"] for c in content]
        if len(gen_log_probs) != len(gen_ids):
            raise MalformedResponseError(
                f"backend {base_url}: {len(gen_ids)} generation token ids but {len(gen_log_probs)} log-probs"
            )
        return token_fields(prompt_ids, gen_ids, gen_log_probs)

    def _response(self, params: Mapping[str, Any], output: list, usage: Mapping | None,
                  incomplete: dict | None) -> dict:
        u = usage or {}
        in_tok = u.get("prompt_tokens", 0)
        out_tok = u.get("completion_tokens", 0)
        return {
            "id": next_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "model": self.config.model or params.get("model", ""),
            "status": "incomplete" if incomplete else "completed",
            "output": output,
            "usage": {"input_tokens": in_tok, "output_tokens": out_tok, "total_tokens": in_tok + out_tok},
            "incomplete_details": incomplete,
            "tool_choice": params.get("tool_choice", "auto"),
            "tools": params.get("tools") or [],
            "parallel_tool_calls": params.get("parallel_tool_calls", True),
        }

