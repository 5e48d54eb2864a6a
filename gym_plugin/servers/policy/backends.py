"""What the policy model server learns about each backend once, on first use (``BackendFacts``).

- token mode (``token_mode: auto``): ``GET {base_url}/models``; ``owned_by: vllm`` -> ``completions``, anything
  else -> ``chat``; concurrent first calls share one ask, a failed ask (retried like any backend request) is
  asked again by the next call;
- the model root (``root`` of ``GET /models``): where the tokenizer + chat template load from when the config
  sets no ``tokenizer``; the renderer is loaded once, off the event loop;
- the weight version (``GET {root}/weight_info``, vLLM dev mode): asked around each call; a backend without the
  route costs one request in all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping

from gym_plugin.errors import ConfigError, EndpointError
from gym_plugin.http import HTTPStatusError, RetryPolicy, Transport
from gym_plugin.servers.base import HandlerError
from gym_plugin.servers.policy.config import PolicyModelConfig
from gym_plugin.servers.policy.tokens import backend_identity

logger = logging.getLogger("gym_plugin.servers.policy.server")


def _root(base_url: str) -> str:
    """vLLM serves /weight_info at the server root, not under /v1."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


class BackendFacts:
    """Per-backend facts of one policy model server (same order as its ``base_urls``): ``name`` (for messages),
    its ``config``, ``transport`` (its client, once started) and ``retry`` policy."""

    def __init__(self, name: str, config: PolicyModelConfig, base_urls: list[str], transport: Callable[[], Transport],
                 retry: RetryPolicy):
        self.name, self.config, self.base_urls, self._transport, self._retry = name, config, base_urls, transport, retry
        n = len(base_urls)
        self.modes: list[str | None] = [None if config.token_mode == "auto" else config.token_mode] * n
        """Resolved token mode of each backend ('completions' | 'chat'); None until asked (auto)."""
        self.roots: list[str | None] = [None] * n
        """The model 'root' each backend reported in GET /models (the tokenizer source when none is set)."""
        self._mode_tasks: dict[int, asyncio.Future] = {}
        self._renderer_task: asyncio.Future | None = None
        self._tokenizer_note = f"tokenizer={config.tokenizer!r}"
        self._has_version_route: list[bool | None] = [None if config.report_policy_version else False] * n
        """Whether each backend serves GET /weight_info (None: not known yet; the first ask finds out)."""
        self._version_probe: dict[int, asyncio.Future] = {}

    async def mode(self, idx: int) -> str:
        """'completions' or 'chat' for backend ``idx``."""
        return self.modes[idx] or await self._resolve_mode(idx)

    async def _resolve_mode(self, idx: int) -> str:
        """auto: ask the backend once (GET /models) whether it is vLLM; concurrent first calls share the ask."""
        task = self._mode_tasks.get(idx)
        if task is None:
            task = self._mode_tasks[idx] = asyncio.ensure_future(self._ask_mode(idx))
        try:
            return await asyncio.shield(task)
        except BaseException:
            if task.done():
                self._mode_tasks.pop(idx, None)  # a failed ask is retried by the next call
            raise

    async def _ask_mode(self, idx: int) -> str:
        url = f"{self.base_urls[idx]}/models"
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self._transport().get(url, timeout_s=min(self.config.timeout_s, 30.0))
                owned_by, root = backend_identity(reply.data)
                break
            except HTTPStatusError as e:
                if e.status < 500 and e.status != 429:  # no /models route: not vLLM
                    owned_by, root = None, None
                    break
                error: EndpointError = e
            except EndpointError as e:
                error = e
            if attempt >= self._retry.max_attempts:
                raise HandlerError(
                    502, f"policy model server {self.name!r}: backend {url} failed after {attempt} attempt(s): "
                         f"{error} (token_mode=auto asks GET /models which backend this is; set token_mode: "
                         "completions or chat to skip the question)", "upstream_error") from error
            await asyncio.sleep(self._retry.delay(attempt))
        if self.roots[idx] is None:
            self.roots[idx] = root
        mode = "completions" if owned_by == "vllm" and self.config.token_style != "none" else "chat"
        self.modes[idx] = mode
        logger.info("policy model server %r: backend %s is %s -> token_mode %s", self.name, self.base_urls[idx],
                    owned_by, mode)
        return mode

    async def renderer(self, idx: int):
        """The ChatRenderer of ``tokenizer`` (or the backend's model root), loaded once off the event loop."""
        if self._renderer_task is None:
            source, key = self.config.tokenizer, "tokenizer"
            if not source:
                if self.roots[idx] is None:
                    try:
                        reply = await self._transport().get(f"{self.base_urls[idx]}/models", timeout_s=30.0)
                        self.roots[idx] = backend_identity(reply.data)[1]
                    except EndpointError:
                        pass
                source = self.roots[idx]
                self._tokenizer_note = (
                    f"tokenizer is unset, so the model root {source!r} that {self.base_urls[idx]}/models reported "
                    "was used" if source else f"tokenizer is unset and {self.base_urls[idx]}/models reported no "
                    "model root")
            self._renderer_task = asyncio.ensure_future(asyncio.to_thread(_load_renderer, source, "tokenizer"))
        try:
            return await asyncio.shield(self._renderer_task)
        except ConfigError as e:
            raise HandlerError(500, f"policy model server {self.name!r}: token_mode=completions needs the policy "
                                    f"model's tokenizer and chat template ({self._tokenizer_note}): {e} Or set "
                                    "token_mode: chat.", "config_error") from e

    async def version(self, idx: int) -> Any:
        """The backend's weight version (``GET {root}/weight_info``), or None (no route / asked not to).

        Until the first answer says whether the route exists, concurrent calls wait for that one ask instead of
        each sending their own (a backend without it costs one request in all)."""
        known = self._has_version_route[idx]
        if known is False:
            return None
        if known is None:
            probe = self._version_probe.get(idx)
            if probe is None:
                probe = self._version_probe[idx] = asyncio.ensure_future(self._ask_version(idx))
                return await asyncio.shield(probe)
            await asyncio.shield(probe)
            if not self._has_version_route[idx]:
                return None
        return await self._ask_version(idx)

    async def _ask_version(self, idx: int) -> Any:
        try:
            reply = await self._transport().get(f"{_root(self.base_urls[idx])}/weight_info", timeout_s=10.0)
        except HTTPStatusError as e:
            if e.status in (404, 405):
                self._has_version_route[idx] = False  # not vLLM dev mode: stop asking
            return None
        except EndpointError:
            return None
        finally:
            self._version_probe.pop(idx, None)
        self._has_version_route[idx] = True
        value = reply.data.get("weight_version") if isinstance(reply.data, Mapping) else None
        return _version_value(value)

    async def call_version(self, idx: int, before: Any) -> Any:
        """The version a call started with; a call that straddled a weight update reports the older one."""
        if before is None:
            return None
        after = await self.version(idx)
        if after is not None and after != before:
            logger.warning("policy model server %r: backend %s changed weights during a call (%s -> %s)",
                           self.name, self.base_urls[idx], before, after)
        return before


def _version_value(value: Any) -> Any:
    """vLLM reports versions as strings ('default' before any update, then what the trainer set): numeric ones
    become ints (the recipe compares them), 'default' becomes 0, anything else stays a string."""
    if value is None or value == "default":
        return 0 if value == "default" else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _load_renderer(source: str | None, key: str):
    from gym_plugin.models.chat_template import ChatRenderer, load_tokenizer

    return ChatRenderer(load_tokenizer(source or "", key=key))
