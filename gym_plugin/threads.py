"""Blocking torch work off the event loop, in a thread that ends with it.

``asyncio.to_thread`` runs work on a pool thread that lives on, and with it the OpenMP team torch opened for
that thread. Beside the embedded engine's generation thread (a team of its own) there are then more OpenMP
threads than cores, and libgomp puts its idle threads to sleep almost at once ("throttled" spinning), so every
parallel op pays a wake-up: measured on 2 cores, 32 x 48-token collections right after a training step ran 4.5 ->
6.0 s when the step had run on a pool thread, 3-10% slower when it ran on a thread that had ended.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


async def in_fresh_thread(fn: Callable[..., T], *args: Any, name: str = "gym-plugin-work") -> T:
    """``fn(*args)`` in a new thread named ``name``, awaited; the thread (and its OpenMP team) is gone when this
    returns. An exception ``fn`` raises is raised here."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the awaiting coroutine)
            loop.call_soon_threadsafe(lambda e=exc: done.done() or done.set_exception(e))
        else:
            loop.call_soon_threadsafe(lambda r=result: done.done() or done.set_result(r))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    result = await done
    thread.join()  # it has returned: ends at once, and its OpenMP threads with it
    return result
