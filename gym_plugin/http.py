"""JSON over HTTP, or a direct call when the target server lives in this process.

`Transport` is the one place that talks HTTP as a client. It owns one `aiohttp.ClientSession` (created lazily on
the running loop), bounded by the connector limits, and sends JSON POST/GET requests with explicit timeouts.
When the target `host:port` belongs to a server started in this process (`LOCAL_SERVERS`, filled by
`gym_plugin.servers.base.Server.start`), the call goes straight to the server's handler: same inputs, same outputs, same errors, no sockets. The HTTP
path stays the one used for servers in other processes or on other hosts.

`post_with_retries` adds bounded retries with exponential backoff on connection errors, timeouts and 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol
from urllib.parse import urlsplit

import aiohttp

from gym_plugin.errors import (
    EndpointError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    MalformedResponseError,
    truncate,
)
from gym_plugin.net import local_host

logger = logging.getLogger(__name__)

SESSION_COOKIE = "gym_plugin_session"
"""Cookie that carries a resource-server session over HTTP (in-process calls pass the id directly)."""



class LocalServer(Protocol):
    """What `Transport` needs of a server in this process to call it directly (`gym_plugin.servers.base.Server`)."""

    name: str
    loop: asyncio.AbstractEventLoop | None

    async def dispatch_local(self, method: str, path: str, body: Any, *, session_id: str | None = None,
                             headers: Mapping[str, str] | None = None) -> "Reply": ...


LOCAL_SERVERS: dict[tuple[str, int], LocalServer] = {}
"""Servers started in this process, by (`local_host`, port): a request to that address is a direct call."""


def bearer_headers(token: str | None) -> dict[str, str]:
    """The headers of a client of servers started with ``token`` (or of an endpoint with that API key); {} for none."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def split_url(url: str) -> tuple[str, int, str]:
    """'http://h:p/a/b' -> ('h', p, '/a/b'). Raises ValueError on URLs without a host."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"URL {url!r} has no host; expected e.g. 'http://127.0.0.1:8000/v1'")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return local_host(parts.hostname), port, path


@dataclass
class Reply:
    """What a POST/GET returned."""

    status: int
    """HTTP status (200 for a successful direct call)."""
    data: Any
    """Parsed JSON body (dict, list or str)."""
    session_id: str | None = None
    """Session id the server set (cookie over HTTP), else the one sent."""


@dataclass
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter."""

    max_attempts: int = 3
    """Total attempts including the first (>= 1)."""
    backoff_s: float = 0.2
    """Delay before the 2nd attempt; doubles each time."""
    max_backoff_s: float = 5.0
    """Cap on one delay."""
    retry_statuses: tuple[int, ...] = (500, 502, 503, 504)
    """HTTP statuses worth retrying (plus 429)."""

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        return base * (0.5 + random.random() / 2)


class HTTPStatusError(EndpointError):
    """A non-2xx reply; ``status`` and ``body`` (truncated text) tell what the server said."""

    def __init__(self, message: str, url: str, status: int, body: str):
        super().__init__(message, url=url, status=status)
        self.body = body


@dataclass
class Transport:
    """JSON client with connection limits, timeouts and in-process shortcuts. One per collector/server."""

    limit: int = 100
    """Max open connections in total (aiohttp TCPConnector limit; 0 = unlimited)."""
    limit_per_host: int = 0
    """Max open connections per host (0 = unlimited)."""
    timeout_s: float = 300.0
    """Default total timeout of one request, seconds."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Headers sent with every HTTP request (e.g. Authorization)."""
    allow_local: bool = True
    """Call servers of this process directly instead of over HTTP."""
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.limit, limit_per_host=self.limit_per_host)
            # DummyCookieJar: sessions are threaded explicitly (SESSION_COOKIE), never shared across rollouts.
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), headers=dict(self.headers)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _local(self, url: str):
        if not self.allow_local or not LOCAL_SERVERS:
            return None, ""
        host, port, path = split_url(url)
        server = LOCAL_SERVERS.get((host, port))
        # Only call directly on the server's own loop: its clients and locks belong to that loop.
        if server is None or server.loop is not asyncio.get_running_loop():
            return None, path
        return server, path

    async def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        session_id: str | None = None,
        cookies: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One request, no retries. Raises EndpointUnreachableError / EndpointTimeoutError /
        HTTPStatusError (non-2xx) / MalformedResponseError (body not JSON)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        server, path = self._local(url)
        if server is not None:
            try:
                return await asyncio.wait_for(
                    server.dispatch_local(method, path, body, session_id=session_id, headers=headers), timeout
                )
            except asyncio.TimeoutError as e:
                raise EndpointTimeoutError(
                    f"{method} {url} did not answer within {timeout:g} s (in-process server {server.name!r}). "
                    f"Raise the timeout or look at why the server is slow.",
                    url=url,
                ) from e
        sess = await self.session()
        req_cookies = dict(cookies or {})
        if session_id is not None:
            req_cookies[SESSION_COOKIE] = session_id
        try:
            async with sess.request(
                method,
                url,
                json=body,
                cookies=req_cookies or None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                text = await resp.text()
                new_session = resp.cookies.get(SESSION_COOKIE)
                status = resp.status
        except asyncio.TimeoutError as e:
            raise EndpointTimeoutError(
                f"{method} {url} did not answer within {timeout:g} s. Raise the timeout or check the server.",
                url=url,
            ) from e
        except aiohttp.ClientConnectorError as e:
            raise EndpointUnreachableError(
                f"Cannot connect to {url}: {e.os_error or e}. Is the server running and is the URL right?",
                url=url,
            ) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
            raise EndpointUnreachableError(
                f"Connection to {url} broke: {type(e).__name__}: {e}. The server may have crashed or restarted.",
                url=url,
            ) from e
        if status >= 300:
            raise HTTPStatusError(
                f"{method} {url} answered HTTP {status}: {truncate(text, 300)}", url=url, status=status, body=text
            )
        try:
            data = json.loads(text) if text else None
        except json.JSONDecodeError as e:
            raise MalformedResponseError(
                f"{method} {url} answered HTTP {status} with a body that is not JSON: {truncate(text, 300)}"
            ) from e
        return Reply(status=status, data=data, session_id=new_session.value if new_session else session_id)

    async def post(self, url: str, body: Any, **kwargs: Any) -> Reply:
        return await self.request("POST", url, body, **kwargs)

    async def get(self, url: str, **kwargs: Any) -> Reply:
        return await self.request("GET", url, None, **kwargs)


def is_retryable(exc: BaseException, policy: RetryPolicy) -> bool:
    if isinstance(exc, HTTPStatusError):
        return exc.status in policy.retry_statuses or exc.status == 429
    return isinstance(exc, (EndpointUnreachableError, EndpointTimeoutError))


async def post_with_retries(
    transport: Transport,
    url: str,
    body: Any,
    policy: RetryPolicy,
    **kwargs: Any,
) -> tuple[Reply, int]:
    """POST with bounded retries on connection errors, timeouts, 429 and 5xx.

    Returns (reply, attempts). A non-retryable error (4xx, malformed body) is raised at once, unchanged;
    when retries run out, the last error is raised with ``attempts`` set on it.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await transport.post(url, body, **kwargs), attempt
        except EndpointError as e:
            if not is_retryable(e, policy) or attempt >= policy.max_attempts:
                e.attempts = attempt  # type: ignore[attr-defined]
                raise
            delay = policy.delay(attempt)
            logger.warning("POST %s failed (attempt %d/%d): %s; retrying in %.2fs", url, attempt,
                           policy.max_attempts, e, delay)
            await asyncio.sleep(delay)
