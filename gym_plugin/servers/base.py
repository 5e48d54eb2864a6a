"""The server framework: one base class for every server gym_plugin runs (head, agents, resource servers, the
policy model server, the embedded policy, the test fakes), and the `Directory` they find each other through.

A server is a small subclass that lists its routes as ``(method, path, handler)`` where a handler is
``async def handler(self, body, ctx) -> JSON`` (body: the parsed JSON request, read-only; ctx: session and
headers). `build_app()` wraps the handlers into an aiohttp app: JSON parsed once at the edge, typed errors
turned into one JSON error body (`gym_plugin.errors.error_body`: a `HandlerError` gives its status, type and
``param``; any other GymPluginError is a 400, anything else a 500), the bearer token checked
(`gym_plugin.servers.auth`), sessions carried by a cookie. `start()` binds 127.0.0.1 unless a host is configured
and registers the server in `gym_plugin.http.LOCAL_SERVERS`, so `gym_plugin.http.Transport` can call it directly
from the same process (`dispatch_local`) with the same results and errors as over HTTP.

A server class with a ``Config`` dataclass is built from a config section by `from_config` (the launcher and
the local ``policy_endpoint`` use it); servers of the config's three types register themselves under their
implementation name (`gym_plugin.servers.registry.register`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar, Mapping

from aiohttp import web

from gym_plugin.errors import ConfigError, GymPluginError, did_you_mean, error_body, truncate
from gym_plugin.http import LOCAL_SERVERS, SESSION_COOKIE, HTTPStatusError, Reply
from gym_plugin.net import is_loopback, local_host
from gym_plugin.servers.auth import bearer_auth_middleware, exposure_problem, exposure_warning

logger = logging.getLogger(__name__)

DEFAULT_CLIENT_MAX_SIZE = 64 * 1024 * 1024
"""Largest request body a server accepts (bytes); multi-turn rows with token ids can be a few MB."""


@dataclass
class RequestContext:
    """Per-request state a handler may read or set."""

    session_id: str | None = None
    """Session id sent by the caller (cookie over HTTP), or None."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Request headers (empty for direct calls unless given)."""
    new_session_id: str | None = None
    """Set by a handler to start a session; returned to the caller as a cookie / Reply.session_id."""

    def start_session(self) -> str:
        self.new_session_id = uuid.uuid4().hex
        return self.new_session_id


class HandlerError(GymPluginError):
    """Raised by a handler to answer with a given HTTP status, message and error type, optionally naming the request
    field at fault (``param``) and repeating the status in the body (``code``, as vLLM's errors do)."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None,
                 code: int | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.param = param
        self.code = code


Handler = Callable[[Any, RequestContext], Awaitable[Any]]


class Directory:
    """Server instance name -> base URL ('http://host:port') of the running server.

    Filled by whoever starts the servers (ports may be picked at start) or from the head server's config
    for servers in other processes. Servers resolve each other through it at request time.
    """

    def __init__(self, urls: dict[str, str] | None = None):
        self._urls: dict[str, str] = {}
        for k, v in (urls or {}).items():
            self.set(k, v)

    def set(self, name: str, url: str) -> None:
        self._urls[name] = url.rstrip("/")

    def url(self, name: str) -> str:
        try:
            return self._urls[name]
        except KeyError:
            raise ConfigError(
                f"server instance {name!r} is not configured (or not started). Known instances: "
                f"{sorted(self._urls)}.{did_you_mean(name, self._urls)} Fix the reference or add the server."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._urls)

    def __contains__(self, name: str) -> bool:
        return name in self._urls


class Server:
    """Base class of every gym_plugin server (head, agents, resource servers, policy model servers)."""

    server_type: ClassVar[str] = ""
    """NeMo Gym server type: 'responses_api_agents' | 'resources_servers' | 'responses_api_models' | ''."""
    Config: ClassVar[type | None] = None
    """The dataclass of its config section (None: the server takes no config)."""

    @classmethod
    def from_config(cls, name: str, config: Any, directory: Directory | None = None, *, host: str = "127.0.0.1",
                    port: int = 0) -> "Server":
        """The server of a config section (``config``: an instance of ``Config``). Subclasses whose constructor
        differs override this."""
        return cls(name, config, directory, host=host, port=port)  # type: ignore[call-arg]

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        """The event loop serving this server; direct calls are only made from this loop."""
        self._routes: dict[tuple[str, str], Handler] = {}
        for method, path, handler in self.routes():
            self._routes[(method.upper(), path)] = handler
        self._routes[("GET", "/health")] = self.health

    # ---- what subclasses implement -------------------------------------------------------------------
    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) triples served by this server (besides GET /health)."""
        return []

    async def on_start(self) -> None:
        """Hook run once before the server accepts requests (open clients, load models)."""

    async def on_stop(self) -> None:
        """Hook run once after the server stopped accepting requests (close clients)."""

    async def health(self, body: Any, ctx: RequestContext) -> dict:
        return {"status": "ok", "name": self.name}

    # ---- serving ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{local_host(self.host)}:{self.port}"

    def build_app(
        self, client_max_size: int = DEFAULT_CLIENT_MAX_SIZE, auth_token: str | None = None
    ) -> web.Application:
        """The aiohttp app; with `auth_token`, every route but /health requires 'Authorization: Bearer <token>'
        (gym_plugin.servers.auth). Bodies over `client_max_size` bytes are refused with HTTP 413."""
        middlewares = [bearer_auth_middleware(auth_token)] if auth_token else []
        app = web.Application(client_max_size=client_max_size, middlewares=middlewares)
        for (method, path), handler in self._routes.items():
            app.router.add_route(method, path, self._wrap(handler))
        return app

    def _wrap(self, handler: Handler):
        async def route(request: web.Request) -> web.StreamResponse:
            body: Any = None
            if request.method in ("POST", "PUT", "PATCH") and request.can_read_body:
                raw = await request.read()
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:  # JSONDecodeError, or bytes that are not UTF-8/16/32 (UnicodeDecodeError)
                    return web.json_response(
                        error_body(
                            f"{self.name}: request body of {request.method} {request.path} is not valid JSON: "
                            f"{truncate(raw.decode(errors='replace'), 200)}. Send a JSON object.",
                            "invalid_request_error",
                        ),
                        status=400,
                    )
            ctx = RequestContext(session_id=request.cookies.get(SESSION_COOKIE), headers=request.headers)
            try:
                result = await handler(body, ctx)
            except HandlerError as e:
                return web.json_response(error_body(str(e), e.error_type, e.param, e.code), status=e.status)
            except GymPluginError as e:
                return web.json_response(error_body(f"{type(e).__name__}: {e}", "invalid_request_error"), status=400)
            except Exception as e:  # a bug or an upstream failure: a 500 that says what, never a hang
                logger.exception("%s: %s %s failed", self.name, request.method, request.path)
                return web.json_response(error_body(f"{self.name}: {type(e).__name__}: {e}", "server_error"), status=500)
            if isinstance(result, web.StreamResponse):
                return result
            resp = web.json_response(result)
            if ctx.new_session_id is not None:
                resp.set_cookie(SESSION_COOKIE, ctx.new_session_id, httponly=True)
            return resp

        return route

    async def dispatch_local(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        session_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        """Call a route in process. Same semantics as HTTP: errors raise what the HTTP client would raise."""
        handler = self._routes.get((method.upper(), path.split("?", 1)[0]))
        url = f"{self.url}{path}"
        if handler is None:
            bare = path.split("?", 1)[0]
            if any(p == bare for _, p in self._routes):  # like aiohttp: the path exists with another method
                raise HTTPStatusError(f"{method} {url} answered HTTP 405: method not allowed on {self.name!r}",
                                      url, 405, "")
            raise HTTPStatusError(f"{method} {url} answered HTTP 404: no such route on {self.name!r}", url, 404, "")
        ctx = RequestContext(session_id=session_id, headers=headers or {})
        try:
            result = await handler(body, ctx)
        except HandlerError as e:
            raise HTTPStatusError(f"{method} {url} answered HTTP {e.status}: {e}", url, e.status, str(e)) from e
        except GymPluginError as e:
            msg = f"{type(e).__name__}: {e}"
            raise HTTPStatusError(f"{method} {url} answered HTTP 400: {msg}", url, 400, msg) from e
        except Exception as e:
            logger.exception("%s: %s %s failed", self.name, method, path)
            msg = f"{self.name}: {type(e).__name__}: {e}"
            raise HTTPStatusError(f"{method} {url} answered HTTP 500: {msg}", url, 500, msg) from e
        return Reply(status=200, data=result, session_id=ctx.new_session_id or session_id)

    async def start(
        self, host: str | None = None, port: int | None = None, register_local: bool = True,
        auth_token: str | None = None, allow_unauthenticated_network: bool = False,
    ) -> int:
        """Bind and serve; returns the bound port (port 0 picks a free one). With `auth_token`, HTTP callers must
        send it as a bearer token (in-process calls are not checked). A host other than loopback without
        `auth_token` raises ConfigError unless `allow_unauthenticated_network` (then a warning is logged)."""
        if host is not None:
            self.host = host
        if port is not None:
            self.port = port
        if not auth_token and not is_loopback(self.host):
            if not allow_unauthenticated_network:
                raise ConfigError(exposure_problem(
                    [(f"server {self.name!r}", self.host)], token_fix="pass auth_token (auth_token in the config)",
                    allow_fix="pass allow_unauthenticated_network=True (allow_unauthenticated_network: true in the "
                              "config)"))
            logger.warning(exposure_warning(f"server {self.name!r}", self.host))
        self.loop = asyncio.get_running_loop()
        self.auth_token = auth_token  # servers that call other servers of the config send it too (agent)
        await self.on_start()
        self._runner = web.AppRunner(self.build_app(auth_token=auth_token), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # noqa: SLF001 (bound port)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        if register_local:
            LOCAL_SERVERS[(local_host(self.host), self.port)] = self
        logger.info("%s (%s) listening on %s", self.name, type(self).__name__, self.url)
        return self.port

    async def stop(self) -> None:
        if LOCAL_SERVERS.get((local_host(self.host), self.port)) is self:
            del LOCAL_SERVERS[(local_host(self.host), self.port)]
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.on_stop()


async def serve_forever(servers: list[Server]) -> None:
    """Start the servers and wait until cancelled (Ctrl-C), then stop them."""
    for s in servers:
        await s.start()
    try:
        await asyncio.Event().wait()
    finally:
        for s in reversed(servers):
            await s.stop()
