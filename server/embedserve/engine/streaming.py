"""A bounded window of concurrent answers over a stream of requests, with backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from embedserve.errors import StreamIdleError

T = TypeVar("T")
R = TypeVar("R")


async def windowed(
    items: AsyncIterator[T], answer: Callable[[T], Awaitable[R]], size: int, idle_s: float = 0.0
) -> AsyncIterator[tuple[T, R | Exception]]:
    """Answers items concurrently and yields each with its answer, or the exception answering
    it raised, as soon as it is done.

    At most `size` items are read and not yet yielded: reading stops while the window is full,
    so a fast sender is slowed by the transport's flow control rather than growing a queue. A
    failed read ends the stream with its exception once the answers in flight are yielded;
    closing the generator cancels them. With `idle_s`, a wait of that long for the next item while
    no answer is in flight ends the stream with StreamIdleError.
    """
    window = asyncio.Semaphore(size)
    done: asyncio.Queue[tuple[T, R | Exception] | None] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def run(item: T) -> None:
        try:
            outcome: R | Exception = await answer(item)
        except Exception as exc:
            outcome = exc
        done.put_nowait((item, outcome))

    # The idle clock: armed while the reader waits for an item and no answer is in flight; when
    # it rings, the reader is cancelled and ends the stream with StreamIdleError. (A timer rather
    # than wait_for around each read, which would run every read in a task of its own.)
    loop = asyncio.get_running_loop()
    idle: dict[str, asyncio.TimerHandle | bool] = {"waiting": False, "rang": False}

    def ring() -> None:
        idle["rang"] = True
        reader.cancel()

    def arm() -> None:
        if idle_s and idle["waiting"] and not tasks and "timer" not in idle:
            idle["timer"] = loop.call_later(idle_s, ring)

    def disarm() -> None:
        timer = idle.pop("timer", None)
        if isinstance(timer, asyncio.TimerHandle):
            timer.cancel()

    def answered(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        arm()

    async def read() -> None:
        iterator = aiter(items)
        try:
            while True:
                idle["waiting"] = True
                arm()
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    break
                finally:
                    idle["waiting"] = False
                    disarm()
                await window.acquire()
                task = asyncio.create_task(run(item))
                tasks.add(task)
                task.add_done_callback(answered)
            if tasks:
                await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            if idle["rang"]:
                raise StreamIdleError(
                    f"no request came on this stream for {idle_s:g} s while none was being answered "
                    "(STREAM_IDLE_TIMEOUT): the server closed it; open a new stream when there is work"
                ) from None
            raise
        finally:
            done.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (entry := await done.get()) is not None:
            yield entry
            window.release()
        await reader  # re-raises a failed read (e.g. the client broke the stream)
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
