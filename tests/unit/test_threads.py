"""gym_plugin.threads.in_fresh_thread: the work runs on a new thread that is gone afterwards; the loop keeps
running meanwhile; the work's result and exceptions come back to the caller."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gym_plugin.threads import in_fresh_thread


def test_result_comes_back_from_a_thread_that_has_ended_while_the_loop_ran():
    seen: dict = {}
    release = threading.Event()

    def work(a: int, b: int) -> int:
        seen["thread"] = threading.current_thread()
        release.wait(5)  # until the loop has shown it keeps running
        return a * b

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 3:
                    release.set()
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        try:
            result = await in_fresh_thread(work, 6, 7, name="probe-work")
        finally:
            tick.cancel()
        assert ticks >= 3  # the loop served other tasks while the work blocked its thread
        return result

    assert asyncio.run(main()) == 42
    assert seen["thread"] is not threading.main_thread()
    assert seen["thread"].name == "probe-work"
    assert not seen["thread"].is_alive()  # gone, with whatever thread-local state (OpenMP team) it had
    assert seen["thread"] not in threading.enumerate()


def test_an_exception_in_the_work_is_raised_to_the_caller_with_its_type():
    def work() -> None:
        raise KeyError("missing token ids")

    with pytest.raises(KeyError, match="missing token ids"):
        asyncio.run(in_fresh_thread(work))


def test_each_call_gets_a_new_thread():
    async def main() -> list[int]:
        return [await in_fresh_thread(threading.get_ident) for _ in range(2)] + [threading.get_ident()]

    first, second, loop_thread = asyncio.run(main())
    assert first != loop_thread and second != loop_thread
