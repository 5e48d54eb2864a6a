"""Addresses, one definition each: hosts that mean this machine, free ports, and "a URL or a list of URLs".

Everything that binds, names or compares a local address goes through `local_host`; everything that needs an
unused port through `free_port`; every config value that takes one base URL or several through `url_list`
(normalize) and `url_problems` (validate).
"""

from __future__ import annotations

import re
import socket
from typing import Any

from gym_plugin.errors import truncate

LOOPBACK = "127.0.0.1"
_THIS_MACHINE = frozenset({"", "0.0.0.0", "::", "localhost", "::1", "[::1]"})
_HTTP_URL = re.compile(r"^https?://[^/\s]+")


def local_host(host: str) -> str:
    """The address a client on this machine connects to for ``host``: a wildcard bind address ('0.0.0.0', '::')
    or a loopback alias ('localhost', '::1') is 127.0.0.1, so local lookups and URLs agree; others unchanged."""
    return LOOPBACK if host in _THIS_MACHINE else host


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable from this machine only: 'localhost', 127.0.0.0/8, ::1. A wildcard ('0.0.0.0',
    '::', '') or any other address or name is reachable from the network."""
    import ipaddress

    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: loopback only if every address it resolves to is
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (bound and released; a race with other processes is possible)."""
    with socket.socket() as sock:
        sock.bind((local_host(host), 0))
        return int(sock.getsockname()[1])


def url_list(value: Any) -> list[str]:
    """One base URL or a list of them -> a list, trailing '/' removed (None -> [])."""
    if value is None:
        return []
    urls = [value] if isinstance(value, str) else list(value)
    return [u.rstrip("/") if isinstance(u, str) else u for u in urls]


def url_problems(value: Any, key: str) -> list[str]:
    """Every problem of a config value that must be an http(s) URL or a non-empty list of them (``key`` names it
    in the messages)."""
    if isinstance(value, str):
        urls = [value]
    elif isinstance(value, (list, tuple)) and value:
        urls = list(value)
    else:
        return [f"{key}: {truncate(value, 80)} must be an http(s) URL or a non-empty list of them, e.g. "
                "'http://127.0.0.1:8000/v1'"]
    where = (lambda i: key) if isinstance(value, str) else (lambda i: f"{key}[{i}]")
    return [f"{where(i)}: {u!r} is not an http(s) URL; expected e.g. 'http://127.0.0.1:8000/v1'"
            for i, u in enumerate(urls) if not isinstance(u, str) or not _HTTP_URL.match(u)]
