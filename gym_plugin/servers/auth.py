"""Shared-secret bearer token between the collector and the servers.

`bearer_auth_middleware(token)` is an aiohttp middleware: every request except ``GET /health`` must carry
``Authorization: Bearer <token>``; otherwise the reply is HTTP 401 with a JSON error body (the same
`gym_plugin.errors.error_body` as every other error of our servers) and a ``WWW-Authenticate``
header. A client sends the token with `gym_plugin.http.bearer_headers`. The comparison is constant-time (`hmac.compare_digest`), so response timing does not leak how much of
a guess was right.

A server bound to an address other than loopback without a token is refused (`exposure_problem`): `Server.start`
raises, and the launcher checks every server of a config at once before binding any
(`gym_plugin.launch.check_network_exposure`), unless ``allow_unauthenticated_network`` is set, which logs
`exposure_warning` at every start.

In-process calls (`Server.dispatch_local`) do not pass through aiohttp and are not checked: a caller in the
same process already holds the server object (and the config with the token). The token protects the network
boundary only; it is not a substitute for TLS on untrusted networks (it travels in clear over http://).
"""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Iterable

from aiohttp import web

from gym_plugin.errors import ConfigError, error_body

ALLOW_KEY = "allow_unauthenticated_network"
"""The config key (a bool, default false) that lets servers listen on the network without auth_token."""

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


CONFIG_RISK = "the head server hands out the whole config, policy_api_key included"


def exposure_problem(binds: list[tuple[str, str]], token_fix: str = "set auth_token in the config",
                     allow_fix: str = f"set {ALLOW_KEY}: true in the config", risk: str = CONFIG_RISK) -> str:
    """Why the servers of ``binds`` ((what, host) pairs, hosts not loopback) may not listen without a token, and the
    two ways out."""
    where = ", ".join(f"{what} on {host!r}" for what, host in binds)
    return (f"{where}: {'an address' if len(binds) == 1 else 'addresses'} other machines can reach, and no "
            f"auth_token, so anyone who reaches {'it' if len(binds) == 1 else 'them'} could call every route (the head "
            f"server hands out the whole config, policy_api_key included). Either {token_fix} (a shared secret, e.g. "
            f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'`: every route but /health then needs it, "
            f"and the collector sends it), or {allow_fix} to serve without authentication anyway (a warning is "
            f"logged at every start); or bind 127.0.0.1.")


def exposure_warning(server: str, host: str) -> str:
    return (f"{server} listens on {host!r} without auth_token ({ALLOW_KEY} is set): anyone who reaches that address "
            f"can call every route and read the served config, secrets included.")
