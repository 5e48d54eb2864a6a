"""Run a server on an event loop of its own, in a background thread, reached over HTTP only (as a vLLM server
in another process would be): ``with BackgroundServer(FakeOpenAIServer(...)) as fake: fake.base_url``.

Tests of code that owns its own loop (a Ray actor, `GymIntegration`) use it for the policy endpoint, which
must not share that loop and must not be called in process (``register_local=False``)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gym_plugin.servers.base import Server


class BackgroundServer:
    """Start ``server`` (a gym_plugin Server, or anything with async ``start()`` / ``stop()`` such as the
    EmbeddedPolicyServer) on a private loop thread (``start()``), stop it and the thread (``stop()``); a context
    manager. Attribute access falls through to the server (``.base_url``, ``.requests``, ...)."""

    def __init__(self, server: Any):
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "BackgroundServer":
        self._loop = asyncio.new_event_loop()
        name = getattr(self.server, "name", type(self.server).__name__)
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"bg-{name}", daemon=True)
        self._thread.start()
        # A gym_plugin Server would also register for in-process calls; an HTTP-only peer must not.
        start = self.server.start(register_local=False) if isinstance(self.server, Server) else self.server.start()
        asyncio.run_coroutine_threadsafe(start, self._loop).result(timeout=120)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)
