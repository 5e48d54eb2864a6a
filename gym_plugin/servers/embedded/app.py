"""The embedded policy server: an OpenAI/vLLM-compatible HTTP front of ``GenerationEngine``.

Routes (what vLLM serves, so the policy model server talks to it unchanged):

- ``POST /v1/chat/completions``: sampling params ``temperature``, ``top_p``, ``top_k``, ``max_tokens``
  (or ``max_completion_tokens``), ``stop``, ``seed``, ``n``; ``logprobs``/``top_logprobs``;
  ``return_tokens_as_token_ids`` (style A: ``logprobs.content[i].token = "token_id:<id>"``) and
  ``return_token_ids`` (style B: top-level ``prompt_token_ids`` and ``choices[i].token_ids``); ``tools``
  rendered by the chat template and Hermes ``<tool_call>`` blocks parsed into ``message.tool_calls``.
  Every completion (and every choice) carries ``policy_version``.
- ``POST /v1/completions``: ``prompt`` as token ids (or a string), the same sampling params, ``logprobs`` (an
  int: alternatives per position, 0 = the sampled token's only; ``choices[i].logprobs.token_logprobs``),
  ``return_token_ids`` (``choices[i].token_ids`` and ``choices[i].prompt_token_ids``, as vLLM): the
  token-in/token-out route of the policy model server's ``token_mode: completions``.
- ``POST /tokenize`` (server root, like vLLM): ``{"model", "messages", "tools"?, "add_generation_prompt"?}``
  or ``{"prompt"}`` -> ``{"tokens", "count", "max_model_len"}``.
- ``GET /v1/models``, ``GET /health``, ``GET /policy_version``, ``POST /update_weights_from_path``
  (``{"path": "<file.safetensors or folder>"}`` -> ``{"policy_version"}``), ``GET /stats``.

A `Server` like every other gym_plugin server (routes, JSON parsing, bearer auth, in-process calls, the error
body): bad requests get HTTP 400 with OpenAI's ``{"error": {"message", "type": "BadRequestError", "param",
"code"}}`` (`InvalidRequestError`); a prompt plus ``max_tokens`` over the context gets vLLM's "maximum context
length" message. ``gym-plugin embedded`` (gym_plugin.cli) serves it from the command line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from gym_plugin import schema
from gym_plugin.errors import ConfigError, GymPluginError, ModelLoadError, ProtocolError, did_you_mean
from gym_plugin.models.chat_template import ChatRenderer
from gym_plugin.models.toolcalls import parse_tool_calls
from gym_plugin.servers.base import Directory, HandlerError, RequestContext, Server
from gym_plugin.servers.embedded.config import SCHEDULERS, EmbeddedPolicyConfig
from gym_plugin.servers.embedded.engine import GenerationEngine, GenerationResult, SamplingParams
from gym_plugin.servers.registry import POLICY_ENDPOINT, register

log = logging.getLogger(__name__)


class InvalidRequestError(HandlerError, ProtocolError):
    """A chat/tokenize request the server cannot serve: HTTP 400, type ``BadRequestError`` (vLLM's), ``param``
    naming the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, "BadRequestError", param, code=400)


def _server_error(message: str) -> HandlerError:
    return HandlerError(500, message, "InternalServerError", code=500)


def _object(body: Any) -> dict:
    """The request body as a JSON object (the server's routes take no other)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", param=None)
    return body


# ---------------------------------------------------------------------------------------------- prompts
class PromptRenderer(ChatRenderer):
    """Messages (+ tools) -> prompt token ids through the tokenizer's chat template (``chat_template``'s rule:
    gym_plugin's ChatML+Hermes template for tool conversations when the tokenizer's own ignores ``tools``, with
    the original template's default system text, so both render plain chats identically). A template error is
    a bad request (HTTP 400 naming ``messages``)."""

    def render_text(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        try:
            return super().render_text(messages, tools, add_generation_prompt, chat_template_kwargs)
        except ProtocolError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True,
               chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        """Prompt token ids, like vLLM: render with the template, then encode without extra special tokens."""
        return self.encode(self.render_text(messages, tools, add_generation_prompt, chat_template_kwargs))


def _message_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            else:
                raise InvalidRequestError(
                    f"{where}.content[{i}] has type {truncate_type(part)}; only text parts are supported by the "
                    "embedded policy (send plain strings or {'type': 'text', 'text': ...}).",
                    param=f"{where}.content",
                )
        return "".join(parts)
    raise InvalidRequestError(f"{where}.content must be a string, a list of text parts or null, got "
                              f"{type(content).__name__}.", param=f"{where}.content")


def truncate_type(part: Any) -> str:
    return repr(part.get("type")) if isinstance(part, dict) else type(part).__name__


_ROLES = ("system", "user", "assistant", "tool", "developer")


def normalize_messages(raw: Any) -> list[dict]:
    """Validate OpenAI chat messages and make them template-friendly (text contents; tool call arguments kept)."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError(
            "'messages' is required: a non-empty list like [{'role': 'user', 'content': 'Hi'}].", param="messages"
        )
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(f"{where} must be an object with 'role' and 'content'.", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"{where}.role is {role!r}; use one of {list(_ROLES)}.{did_you_mean(str(role), _ROLES)}",
                param=f"{where}.role",
            )
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role}
        content = _message_text(m.get("content"), where)
        tool_calls = m.get("tool_calls")
        if tool_calls:
            if role != "assistant" or not isinstance(tool_calls, list):
                raise InvalidRequestError(f"{where}.tool_calls must be a list on an assistant message.",
                                          param=f"{where}.tool_calls")
            for j, tc in enumerate(tool_calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidRequestError(
                        f"{where}.tool_calls[{j}] needs {{'type': 'function', 'function': {{'name', 'arguments'}}}}.",
                        param=f"{where}.tool_calls",
                    )
            msg["tool_calls"] = tool_calls
        elif content is None and role != "assistant":
            raise InvalidRequestError(f"{where}.content is required for role {role!r}.", param=f"{where}.content")
        msg["content"] = content if content is not None else ("" if not tool_calls else None)
        for key in ("name", "tool_call_id"):
            if key in m:
                msg[key] = m[key]
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------------- params
@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    messages: list[dict]
    """Normalized chat messages."""
    tools: list[dict] | None
    """OpenAI tool definitions (rendered into the prompt; enable tool-call parsing)."""
    params: SamplingParams
    """Sampling parameters for the engine (``max_tokens`` resolved)."""
    prompt_ids: list[int]
    """The rendered prompt."""
    logprobs: bool = False
    """Return ``choices[i].logprobs.content``."""
    top_logprobs: int = 0
    """Alternatives per position in ``top_logprobs``."""
    tokens_as_ids: bool = False
    """Style A: ``token`` fields are ``"token_id:<id>"``."""
    return_token_ids: bool = False
    """Style B: top-level ``prompt_token_ids`` and ``choices[i].token_ids``."""
    parse_tools: bool = False
    """Turn ``<tool_call>`` blocks into ``message.tool_calls``."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string in the text (vLLM option)."""
    skip_special_tokens: bool = True
    """Leave special tokens (eos) out of the text."""


def _number(body: dict, key: str, default, lo: float | None = None, hi: float | None = None,
            integer: bool = False, lo_open: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise InvalidRequestError(f"'{key}' must be {kind}, got {value!r}.", param=key)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidRequestError(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {value!r}.", param=key)
    if hi is not None and value > hi:
        raise InvalidRequestError(f"'{key}' must be <= {hi}, got {value!r}.", param=key)
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{key}' must be true or false, got {value!r}.", param=key)
    return value


# ---------------------------------------------------------------------------------------------- server
@register(POLICY_ENDPOINT, "embedded")
class EmbeddedPolicyServer(Server):
    """An OpenAI/vLLM-compatible policy server around a local HF causal LM, in this process.

    Build it from a config (the model is loaded by ``gym_plugin.models.load_policy_model``), with config
    fields as keyword overrides (``EmbeddedPolicyServer(model="tiny", max_batch_size=8)``), or hand it a
    ``model`` module and its ``tokenizer`` directly (e.g. a copy of the trainer's model). ``start()`` binds the port and
    starts the generation thread; ``update_weights(state_dict)`` swaps weights between batches.
    """

    Config: ClassVar[type] = EmbeddedPolicyConfig

    @classmethod
    def from_config(cls, name: str, config: EmbeddedPolicyConfig, directory: Directory | None = None, *,
                    host: str = "127.0.0.1", port: int = 0) -> "EmbeddedPolicyServer":
        """``policy_endpoint: {impl: embedded, ...}``: the server of that section (its model loaded now)."""
        return cls(config, host=host, port=port)

    def __init__(self, config: EmbeddedPolicyConfig | None = None, *, model=None, tokenizer=None, **overrides):
        cfg = config or EmbeddedPolicyConfig()
        if isinstance(model, (str, Path)):  # a model spec ("tiny", "smollm2", a folder), not a module
            overrides["model"], model = str(model), None
        if overrides:  # ConfigError naming every unknown or mistyped option (gym_plugin.schema)
            cfg = schema.build(EmbeddedPolicyConfig, {**{f.name: getattr(cfg, f.name) for f in fields(cfg)},
                                                      **overrides}, "EmbeddedPolicyServer", noun="option")
        self.config = cfg
        if cfg.scheduler not in SCHEDULERS:
            raise ConfigError(f"EmbeddedPolicyServer: scheduler={cfg.scheduler!r} is not one of {list(SCHEDULERS)}."
                              f"{did_you_mean(str(cfg.scheduler), SCHEDULERS)}")
        if (model is None) != (tokenizer is None):
            raise ModelLoadError("Pass both model= and tokenizer= to EmbeddedPolicyServer, or neither.")
        given = model is not None
        if not given:
            from gym_plugin.models import load_policy_model

            from gym_plugin.devices import resolve_device

            device = resolve_device(cfg.device, key="device")  # before the load: a wrong device fails at once
            model, tokenizer = load_policy_model(cfg.model, cfg.dtype)
            model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = PromptRenderer(tokenizer)
        self.engine = GenerationEngine(
            model, tokenizer, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
            batch_max_wait_ms=cfg.batch_max_wait_ms,
            num_threads=cfg.num_threads, prefix_cache_tokens=cfg.prefix_cache_tokens,
            continuous=cfg.scheduler == "continuous", packed_weights=cfg.packed_weights,
        )
        mpe = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = int(cfg.max_model_len or min(int(mpe), 8192))
        if given:  # cfg.model did not pick this module: name it after its own path, if any
            own = Path(getattr(model, "name_or_path", "") or "embedded-policy").name
            self.served_model_name = cfg.served_model_name or own
            self.model_aliases = {self.served_model_name}
            self.model_root = getattr(model, "name_or_path", "") or None
        else:
            self.served_model_name = cfg.served_model_name or _default_served_name(cfg.model)
            self.model_aliases = {self.served_model_name, str(cfg.model)}
            self.model_root = str(cfg.model)
        """What GET /v1/models reports as ``root`` (like vLLM's --model): where the tokenizer can be loaded from
        (a model spec or folder), None for a module built in code."""
        # "policy_endpoint": its instance name in launcher listings (``gym-plugin serve`` prints each server's).
        super().__init__(POLICY_ENDPOINT, host=cfg.host, port=cfg.port)

    # ------------------------------------------------------------------ lifecycle (Server.start / stop)
    async def on_start(self) -> None:
        """Start the generation thread before the port is bound."""
        self.engine.start()

    async def on_stop(self) -> None:
        """After the HTTP server closed: stop the engine (waits for the batch in progress)."""
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)
        log.info("embedded policy %s stopped", self.served_model_name)

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, the OpenAI base URL."""
        if self._runner is None:
            raise RuntimeError("EmbeddedPolicyServer.base_url is known only after await start()")
        return f"{self.url}/v1"

    @property
    def policy_version(self) -> int:
        """The weights version new requests are generated with (0 at start, +1 per update)."""
        return self.engine.policy_version

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        """Start counting from ``version`` (a trainer resuming from a checkpoint of that version)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"policy_version must be an integer >= 0, got {version!r}")
        self.engine.policy_version = version

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Copy ``state_dict`` into the served model between batches; returns the new ``policy_version``.

        Blocks while a batch is being generated; that batch finishes (and reports) the old version.
        """
        return self.engine.update_weights(state_dict)

    def exclusive_weights(self):
        """Context manager: no batch is generated inside it (a trainer stepping the served module itself)."""
        return self.engine.exclusive_weights()

    async def update_weights_async(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """``update_weights`` without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.update_weights, state_dict)

    # ------------------------------------------------------------------ routes
    def routes(self):
        return [
            ("GET", "/v1/models", self.models),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/completions", self.completions),
            ("POST", "/tokenize", self.tokenize),
            ("GET", "/policy_version", self.get_policy_version),
            ("POST", "/update_weights_from_path", self.update_weights_from_path),
            ("GET", "/stats", self.stats),
        ]

    async def health(self, body: Any, ctx: RequestContext) -> dict:
        return {"status": "ok"}

    async def models(self, body: Any, ctx: RequestContext) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.served_model_name, "object": "model", "created": 0, "owned_by": "gym_plugin",
                      "root": self.model_root, "max_model_len": self.max_model_len}],
        }

    async def get_policy_version(self, body: Any, ctx: RequestContext) -> dict:
        return {"policy_version": self.policy_version}

    async def stats(self, body: Any, ctx: RequestContext) -> dict:
        s = self.engine.stats
        return {
            "perf/batches": s.batches, "perf/rows": s.rows, "perf/generated_tokens": s.generated_tokens,
            "perf/max_rows_in_batch": s.max_rows_in_batch, "perf/busy_s": s.busy_s,
            "perf/packs": s.packs, "perf/pack_s": s.pack_s,
            "perf/prefix_cache_hits": self.engine.prefix_cache.hits,
            "perf/prefix_cache_hit_tokens": self.engine.prefix_cache.hit_tokens,
            "policy_version": self.policy_version,
        }

    async def update_weights_from_path(self, body: Any, ctx: RequestContext) -> dict:
        path = _object(body).get("path")
        if not isinstance(path, str) or not path:
            raise InvalidRequestError("'path' is required: a .safetensors file or a folder of them.", "path")
        try:
            version = await asyncio.get_running_loop().run_in_executor(
                None, self.engine.update_weights_from_path, path
            )
        except ModelLoadError as exc:
            raise InvalidRequestError(str(exc), "path") from exc
        return {"policy_version": version}

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name not in self.model_aliases:
            raise InvalidRequestError(
                f"The model {name!r} is not served here; this server serves {self.served_model_name!r}."
                f"{did_you_mean(str(name), self.model_aliases)} Set 'model' to {self.served_model_name!r}.",
                param="model",
            )

    def _tools(self, body: dict) -> list[dict] | None:
        tools = body.get("tools")
        if tools is None:
            return None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise InvalidRequestError("'tools' must be a list of {'type': 'function', 'function': {...}}.", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function")
            if t.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
                raise InvalidRequestError(
                    f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}.",
                    param=f"tools[{i}]",
                )
        return tools or None

    async def tokenize(self, body: Any, ctx: RequestContext) -> dict:
        body = _object(body)
        self._check_model(body)
        if "prompt" in body and "messages" not in body:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise InvalidRequestError("'prompt' must be a string.", "prompt")
            add_special = _bool(body, "add_special_tokens", True)
            tokens = self.tokenizer.encode(prompt, add_special_tokens=add_special)
        else:
            messages = normalize_messages(body.get("messages"))
            tokens = self.renderer.render(
                messages, self._tools(body), _bool(body, "add_generation_prompt", True),
                body.get("chat_template_kwargs"),
            )
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}

    def parse_chat_request(self, body: dict) -> ChatRequest:
        """Validate a chat-completions body into a ``ChatRequest`` (raises InvalidRequestError)."""
        self._check_model(body)
        if body.get("stream"):
            raise InvalidRequestError("'stream' is not supported by the embedded policy; set stream to false.",
                                      "stream")
        messages = normalize_messages(body.get("messages"))
        tools = self._tools(body)
        logprobs = _bool(body, "logprobs", False)
        top_logprobs = int(_number(body, "top_logprobs", 0, lo=0, hi=20, integer=True))
        if top_logprobs and not logprobs:
            raise InvalidRequestError("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        tool_choice = body.get("tool_choice", "auto")
        if tool_choice not in (None, "auto", "none", "required") and not isinstance(tool_choice, dict):
            raise InvalidRequestError(f"'tool_choice' {tool_choice!r} is not supported; use 'auto' or 'none'.",
                                      "tool_choice")
        prompt_ids = self.renderer.render(
            messages, tools, _bool(body, "add_generation_prompt", True), body.get("chat_template_kwargs")
        )
        return self._request(body, prompt_ids, messages=messages, tools=tools, logprobs=logprobs,
                             top_logprobs=top_logprobs, parse_tools=bool(tools) and tool_choice != "none")

    def parse_completion_request(self, body: dict) -> ChatRequest:
        """Validate a ``/v1/completions`` body (``prompt``: token ids or a string; ``logprobs``: an int, the
        number of alternatives, 0 = the sampled token's only) into a ``ChatRequest`` without messages."""
        self._check_model(body)
        if body.get("stream"):
            raise InvalidRequestError("'stream' is not supported by the embedded policy; set stream to false.",
                                      "stream")
        for key in ("structured_outputs", "response_format", "guided_json", "guided_regex", "guided_choice",
                    "guided_grammar"):
            if body.get(key) is not None:
                raise InvalidRequestError(f"'{key}' (constrained decoding) is not supported by the embedded policy; "
                                          "leave it out, or serve the model with vLLM.", key)
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=_bool(body, "add_special_tokens", True))
        elif (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt)):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"'prompt' has token ids outside the vocabulary [0, {vocab}): "
                                          f"{bad[:5]}.", "prompt")
            prompt_ids = list(prompt)
        else:
            raise InvalidRequestError("'prompt' must be a non-empty string or a non-empty list of token ids "
                                      "(one prompt per request).", "prompt")
        logprobs = body.get("logprobs")
        top = 0 if logprobs is None else int(_number(body, "logprobs", 0, lo=0, hi=20, integer=True))
        return self._request(body, prompt_ids, messages=[], tools=None, logprobs=logprobs is not None,
                             top_logprobs=top, parse_tools=False)

    def _request(self, body: dict, prompt_ids: list[int], *, messages: list[dict], tools: list[dict] | None,
                 logprobs: bool, top_logprobs: int, parse_tools: bool) -> ChatRequest:
        """Sampling params and the token budget of a chat or completions body, for ``prompt_ids``."""
        for key in ("frequency_penalty", "presence_penalty"):
            if _number(body, key, 0.0) != 0:
                raise InvalidRequestError(f"'{key}' is not supported by the embedded policy; leave it at 0.", key)
        temperature = float(_number(body, "temperature", 1.0, lo=0.0))
        top_p = float(_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True))
        top_k = int(_number(body, "top_k", 0, lo=-1, integer=True))
        n = int(_number(body, "n", 1, lo=1, hi=128, integer=True))
        seed = _number(body, "seed", None, integer=True)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("'stop' must be a non-empty string or a list of non-empty strings.", "stop")
        stop_token_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_token_ids, list) or not all(isinstance(t, int) for t in stop_token_ids):
            raise InvalidRequestError("'stop_token_ids' must be a list of integers.", "stop_token_ids")
        room = self.max_model_len - len(prompt_ids)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if max_tokens is None:
            if room < 1:
                raise InvalidRequestError(self._too_long(len(prompt_ids), 1), "messages" if messages else "prompt")
            max_tokens = min(self.config.default_max_tokens, room)
        else:
            max_tokens = int(_number({key: max_tokens}, key, None, lo=1, integer=True))
            if max_tokens > room:
                raise InvalidRequestError(self._too_long(len(prompt_ids), max_tokens), key)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=seed, n=n,
            stop=tuple(stop), stop_token_ids=tuple(stop_token_ids), ignore_eos=_bool(body, "ignore_eos", False),
            top_logprobs=top_logprobs,
        )
        return ChatRequest(
            messages=messages, tools=tools, params=params, prompt_ids=prompt_ids, logprobs=logprobs,
            top_logprobs=top_logprobs, tokens_as_ids=_bool(body, "return_tokens_as_token_ids", False),
            return_token_ids=_bool(body, "return_token_ids", False),
            parse_tools=parse_tools,
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
            skip_special_tokens=_bool(body, "skip_special_tokens", True),
        )

    def _too_long(self, prompt_len: int, max_tokens: int) -> str:
        # vLLM's wording, which clients (NeMo Gym's model server) match to turn it into finish_reason=length.
        return (
            f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )

    async def chat_completions(self, body: Any, ctx: RequestContext) -> dict:
        return await self._generate(self.parse_chat_request(_object(body)), self.completion_payload)

    async def completions(self, body: Any, ctx: RequestContext) -> dict:
        return await self._generate(self.parse_completion_request(_object(body)), self.text_completion_payload)

    async def _generate(self, chat: ChatRequest, payload) -> dict:
        fut = self.engine.submit(chat.prompt_ids, chat.params)
        try:
            results = await asyncio.wrap_future(fut)
        except GymPluginError as exc:
            raise _server_error(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged by the engine
            raise _server_error(f"generation failed: {type(exc).__name__}: {exc}") from exc
        return payload(chat, results)

    def _text(self, chat: ChatRequest, res: GenerationResult) -> str:
        text = self.tokenizer.decode(res.token_ids, skip_special_tokens=chat.skip_special_tokens)
        if isinstance(res.stop_reason, str):
            cut = text.find(res.stop_reason)
            if cut >= 0:
                text = text[: cut + (len(res.stop_reason) if chat.include_stop_str_in_output else 0)]
        return text

    def text_completion_payload(self, chat: ChatRequest, results: list[GenerationResult]) -> dict:
        """The OpenAI text_completion object, with vLLM's token fields (``choices[i].token_ids`` and
        ``prompt_token_ids`` when asked) and ``policy_version``."""
        text_of = self.engine.token_text
        choices = []
        for i, res in enumerate(results):
            choice: dict[str, Any] = {"index": i, "text": self._text(chat, res), "logprobs": None,
                                      "finish_reason": res.finish_reason, "stop_reason": res.stop_reason,
                                      "policy_version": res.policy_version}
            if chat.logprobs:
                tokens = [self._token_str(chat, t) for t in res.token_ids]
                choice["logprobs"] = {
                    "tokens": tokens, "token_logprobs": list(res.logprobs),
                    "top_logprobs": [{text_of(t): v for t, v in res.top_logprobs[k]} if chat.top_logprobs
                                     else {tokens[k]: res.logprobs[k]} for k in range(len(tokens))],
                }
            if chat.return_token_ids:
                choice["token_ids"] = res.token_ids
                choice["prompt_token_ids"] = chat.prompt_ids
            choices.append(choice)
        completion_tokens = sum(len(r.token_ids) for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.served_model_name, "choices": choices,
            "usage": {"prompt_tokens": len(chat.prompt_ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(chat.prompt_ids) + completion_tokens},
            "policy_version": results[0].policy_version,
        }

    def completion_payload(self, chat: ChatRequest, results: list[GenerationResult]) -> dict:
        """The OpenAI chat.completion object (with vLLM's token fields and ``policy_version``)."""
        choices = []
        for i, res in enumerate(results):
            text = self._text(chat, res)
            message: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": []}
            finish = res.finish_reason
            if chat.parse_tools:
                parsed = parse_tool_calls(text)
                if parsed.tool_calls:
                    message["content"] = parsed.content
                    message["tool_calls"] = parsed.tool_calls
                    finish = "tool_calls"
            choice: dict[str, Any] = {
                "index": i,
                "message": message,
                "logprobs": {"content": self._logprob_entries(chat, res)} if chat.logprobs else None,
                "finish_reason": finish,
                "stop_reason": res.stop_reason,
                "policy_version": res.policy_version,
            }
            if chat.return_token_ids:
                choice["token_ids"] = res.token_ids
            choices.append(choice)
        completion_tokens = sum(len(r.token_ids) for r in results)
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(chat.prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(chat.prompt_ids) + completion_tokens,
            },
            # All rows of a request share one batch, hence one version.
            "policy_version": results[0].policy_version,
        }
        if chat.return_token_ids:
            payload["prompt_token_ids"] = chat.prompt_ids
        return payload

    def _token_str(self, chat: ChatRequest, token_id: int) -> str:
        return f"token_id:{token_id}" if chat.tokens_as_ids else self.engine.token_text(token_id)

    def _logprob_entries(self, chat: ChatRequest, res: GenerationResult) -> list[dict]:
        text_of = self.engine.token_text
        entries = []
        for step, (tid, lp) in enumerate(zip(res.token_ids, res.logprobs)):
            top = []
            if chat.top_logprobs:
                top = [{"token": self._token_str(chat, t), "logprob": v, "bytes": list(text_of(t).encode())}
                       for t, v in res.top_logprobs[step]]
            entries.append({"token": self._token_str(chat, tid), "logprob": lp,
                            "bytes": list(text_of(tid).encode()), "top_logprobs": top})
        return entries


def _default_served_name(spec: str) -> str:
    if spec == "smollm2":
        return "SmolLM2-135M-Instruct"
    if spec == "tiny":
        return "tiny"
    return Path(spec).expanduser().name or spec
