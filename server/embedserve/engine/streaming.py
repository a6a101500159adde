"""A bounded window of concurrent answers over a stream of requests, with backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def windowed(
    items: AsyncIterator[T], answer: Callable[[T], Awaitable[R]], size: int
) -> AsyncIterator[tuple[T, R | Exception]]:
    """Answers items concurrently and yields each with its answer, or the exception answering
    it raised, as soon as it is done.

    At most `size` items are read and not yet yielded: reading stops while the window is full,
    so a fast sender is slowed by the transport's flow control rather than growing a queue. A
    failed read ends the stream with its exception once the answers in flight are yielded;
    closing the generator cancels them.
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

    async def read() -> None:
        try:
            async for item in items:
                await window.acquire()
                task = asyncio.create_task(run(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
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
