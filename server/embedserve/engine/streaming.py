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

    clock = _IdleClock(idle_s, lambda: reader.cancel())

    def answered(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not tasks:
            clock.nothing_in_flight()

    async def read() -> None:
        iterator = aiter(items)
        try:
            while True:
                clock.waiting(in_flight=bool(tasks))
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    break
                finally:
                    clock.stop()
                await window.acquire()
                task = asyncio.create_task(run(item))
                tasks.add(task)
                task.add_done_callback(answered)
            if tasks:
                await asyncio.gather(*tasks)
        except Exception:  # a failed read: the answers in flight still go out, then the error
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
        except asyncio.CancelledError:
            if clock.rang:
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


class _IdleClock:
    """Rings (calls `ring` once) when the reader has waited `idle_s` for the next item with no
    answer in flight. A timer rather than wait_for around each read, which would run every read
    in a task of its own."""

    def __init__(self, idle_s: float, ring: Callable[[], object]) -> None:
        self._idle_s = idle_s
        self._ring = ring
        self._waiting = False
        self._timer: asyncio.TimerHandle | None = None
        self.rang = False

    def waiting(self, in_flight: bool) -> None:
        """The reader waits for the next item; the clock runs unless answers are in flight."""
        self._waiting = True
        if not in_flight:
            self.nothing_in_flight()

    def nothing_in_flight(self) -> None:
        """The last answer in flight is done: the clock runs if the reader waits."""
        if self._idle_s and self._waiting and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._idle_s, self._rings)

    def stop(self) -> None:
        """An item came (or the stream ended): the clock stops."""
        self._waiting = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rings(self) -> None:
        self.rang = True
        self._ring()
