"""A bounded window of concurrent answers over a stream of requests, with backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from embedserve.errors import ShuttingDownError, StreamIdleError

T = TypeVar("T")
R = TypeVar("R")


class StreamDrain:
    """The server's shutdown as its open streams see it. Once `begin(grace_s)` is called, each
    stream (`windowed` with this drain) stops reading requests, answers those it has read, and
    ends with ShuttingDownError (UNAVAILABLE), on which a client (bulk_embed) sends what is
    unanswered again on a new stream, which a load balancer routes to a replica that serves; a
    stream still answering `grace_s` later ends so too, dropping its answers in flight. Ended
    this way, rather than cancelled by gRPC at the end of the grace period, a stream tells its
    client, through Envoy too, that re-sending is safe (a cancelled one reads as CANCELLED, or
    as INTERNAL through a proxy)."""

    def __init__(self) -> None:
        self._streams: set[_StreamStop] = set()
        self._deadline: float | None = None  # the event loop's time at which the grace ends

    def begin(self, grace_s: float) -> None:
        """Asks every open stream, and every stream opened from now on, to end (in the loop)."""
        self._deadline = asyncio.get_running_loop().time() + grace_s
        for stream in list(self._streams):
            stream.request(self._deadline)

    def _join(self, stream: _StreamStop) -> None:
        self._streams.add(stream)
        if self._deadline is not None:
            stream.request(self._deadline)

    def _leave(self, stream: _StreamStop) -> None:
        self._streams.discard(stream)


class _StreamStop:
    """One stream's part of a StreamDrain: whether it was asked to end and whether its grace ran
    out; it cancels the stream's reader while that waits to read (or for room in the window),
    and at the deadline wherever it is."""

    def __init__(self) -> None:
        self.requested = False
        self.expired = False
        self.reading = False  # the reader waits for the next item or for room in the window
        self.reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def request(self, deadline: float) -> None:
        if self.requested:
            return
        self.requested = True
        if self.reading and self.reader is not None:
            self.reader.cancel()
        self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self.reader is not None:
            self.reader.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _shutting_down() -> ShuttingDownError:
    return ShuttingDownError(
        "the server is shutting down: this stream ends here, every request it answered is complete; send "
        "the others again on a new stream (a load balancer routes it to a replica that serves)"
    )


async def windowed(
    items: AsyncIterator[T],
    answer: Callable[[T], Awaitable[R]],
    size: int,
    idle_s: float = 0.0,
    drain: StreamDrain | None = None,
) -> AsyncIterator[tuple[T, R | Exception]]:
    """Answers items concurrently and yields each with its answer, or the exception answering
    it raised, as soon as it is done.

    At most `size` items are read and not yet yielded: reading stops while the window is full,
    so a fast sender is slowed by the transport's flow control rather than growing a queue. A
    failed read ends the stream with its exception once the answers in flight are yielded;
    closing the generator cancels them. With `idle_s`, a wait of that long for the next item while
    no answer is in flight ends the stream with StreamIdleError. Once `drain` begins, reading
    stops and the stream ends with ShuttingDownError after the answers in flight (StreamDrain).
    """
    window = asyncio.Semaphore(size)
    done: asyncio.Queue[tuple[T, R | Exception] | None] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    stop = _StreamStop()

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

    async def read_items() -> None:
        iterator = aiter(items)
        while not stop.requested:
            clock.waiting(in_flight=bool(tasks))
            stop.reading = True
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            finally:
                clock.stop()
            await window.acquire()  # a drain that cancels it here leaves the item unanswered: re-sent
            stop.reading = False
            task = asyncio.create_task(run(item))
            tasks.add(task)
            task.add_done_callback(answered)

    async def read() -> None:
        try:
            try:
                await read_items()
            except asyncio.CancelledError:
                if clock.rang:
                    raise StreamIdleError(
                        f"no request came on this stream for {idle_s:g} s while none was being answered "
                        "(STREAM_IDLE_TIMEOUT): the server closed it; open a new stream when there is work"
                    ) from None
                if not stop.requested:
                    raise
                # The drain cancelled the read in progress; what was read is still answered.
            except Exception:  # a failed read: the answers in flight still go out, then the error
                stop.reading = False
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                raise
            stop.reading = False
            if tasks and not stop.expired:
                await asyncio.gather(*tasks)
            if stop.requested:
                raise _shutting_down()
        except asyncio.CancelledError:
            if stop.expired:  # the grace period ran out with answers in flight
                raise _shutting_down() from None
            raise
        finally:
            done.put_nowait(None)

    reader = asyncio.create_task(read())
    stop.reader = reader
    if drain is not None:
        drain._join(stop)
    try:
        while (entry := await done.get()) is not None:
            yield entry
            window.release()
        await reader  # re-raises a failed read (e.g. the client broke the stream)
    finally:
        if drain is not None:
            drain._leave(stop)
        stop.close()
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
