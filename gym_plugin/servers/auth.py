"""Shared-secret bearer token between the collector and the servers.

`bearer_auth_middleware(token)` is an aiohttp middleware: every request except ``GET /health`` must carry
``Authorization: Bearer <token>``; otherwise the reply is HTTP 401 with a JSON error body (the same
`gym_plugin.errors.error_body` as every other error of our servers) and a ``WWW-Authenticate``
header. A client sends the token with `gym_plugin.http.bearer_headers`. The comparison is constant-time (`hmac.compare_digest`), so response timing does not leak how much of
a guess was right.

In-process calls (`Server.dispatch_local`) do not pass through aiohttp and are not checked: a caller in the
same process already holds the server object (and the config with the token). The token protects the network
boundary only; it is not a substitute for TLS on untrusted networks (it travels in clear over http://).
"""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Iterable

from aiohttp import web

from gym_plugin.errors import ConfigError, error_body

OPEN_PATHS = ("/health",)
"""Paths served without a token (liveness probes)."""

AUTH_SCHEME = "Bearer"


def _unauthorized(message: str) -> web.Response:
    return web.json_response(
        error_body(message, "authentication_error"),
        status=401,
        headers={"WWW-Authenticate": AUTH_SCHEME},
    )


def bearer_auth_middleware(
    token: str, open_paths: Iterable[str] = OPEN_PATHS
) -> Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[web.StreamResponse]]:
    """aiohttp middleware requiring ``Authorization: Bearer <token>`` on every path but `open_paths`."""
    if not isinstance(token, str) or not token.strip():
        raise ConfigError(
            f"auth_token must be a non-empty string, got {token!r:.20}. "
            f"Set auth_token to a shared secret (e.g. the output of `python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))'`) or remove it to run without authentication."
        )
    expected = token.encode("utf-8")
    open_set = frozenset(open_paths)

    @web.middleware
    async def bearer_auth(request: web.Request, handler) -> web.StreamResponse:
        if request.path in open_set:
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            return _unauthorized(
                f"{request.method} {request.path} needs an 'Authorization: Bearer <token>' header: this server "
                f"was started with auth_token. Configure the same auth_token on the client."
            )
        scheme, _, given = header.partition(" ")
        # compare_digest on bytes of possibly different lengths is still constant-time in the content.
        if scheme.lower() != AUTH_SCHEME.lower() or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            return _unauthorized(
                f"{request.method} {request.path}: the bearer token is wrong. Configure the server's auth_token "
                f"on the client."
            )
        return await handler(request)

    return bearer_auth
