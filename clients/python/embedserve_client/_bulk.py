"""bulk_embed's machinery: batches of the caller's iterable streamed through one or several
EmbedStream calls at once, answers put back in input order, transient failures retried with only
the unanswered batches re-sent, and inputs the server rejects raised or skipped by their position
in the whole iterable."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from tqdm import tqdm

from embedserve_client._pb.embedserve.v1 import embedding_service_pb2 as pb
from embedserve_client._pb.embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from embedserve_client._vectors import Vectors, decode
from embedserve_client.errors import InvalidArgumentError, error_for, from_rpc_error, from_status_number

OnInvalid = Literal["raise", "skip"]
Skipped = list[tuple[int, InvalidArgumentError]]

# Failures of the stream itself after which re-opening it can succeed: the server is restarting
# or busy, or the connection broke. grpc-core reports a connection cut mid-message as INTERNAL
# ("Internal error from Core"); the server's own failures arrive in-band, per request, and are
# never retried. Re-sending is safe: answers are matched by request id, and max_retries bounds it.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL})
# The server names a rejected input by its position in the request, at the start of the message
# ("inputs[3] is an empty string: ...", "inputs[3] has 900 tokens but ..."), and reports the
# first one only; the proto's Error has no field for it.
_NAMED_INPUT = re.compile(r"inputs\[(\d+)\] (.*)", re.DOTALL)
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class _RetryableError(Exception):
    """The stream broke in a way that re-opening it can mend."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _GaveUpError(Exception):
    """A stream failed `max_retries` times in a row: `error` is what the run raises if no other
    stream is left to carry on."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Batch:
    """One request of the stream: its texts, where they start in the caller's iterable, the ones
    left out of what is sent since they were rejected, and the answer once there is one."""

    start: int
    texts: list[str]
    end: int = -1  # texts[:end] are wanted: all, or those before the input that stops the run
    stop: InvalidArgumentError | None = None  # the error raised once texts[:end] are yielded
    rejected: dict[int, InvalidArgumentError] = field(default_factory=dict)  # skipped positions
    kept: list[int] = field(default_factory=list)  # positions of the texts sent, in order
    message: pb.EmbedStreamRequest | None = None
    results: list[Vectors | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.end = len(self.texts)

    def reject(self, position: int, error: InvalidArgumentError, skip: bool) -> None:
        """Leaves texts[position] out: skipped, or the end of what the run yields."""
        if skip:
            self.rejected[position] = error
        else:
            self.end, self.stop = position, error

    def answer(self, vectors: Iterable[Vectors]) -> None:
        """Lays the vectors of the texts sent out by position, None where one was skipped."""
        self.results = [None] * self.end
        for position, vector in zip(self.kept, vectors, strict=True):
            self.results[position] = vector


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Cuts an iterable into lists of `size`, lazily."""
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _unsendable(text: str) -> str | None:
    """Why protobuf cannot send the value as a string field, or None if it can."""
    try:
        pb.EmbedRequest(inputs=[text])
    except (TypeError, ValueError) as exc:
        if isinstance(text, str):
            return f"is not valid Unicode ({exc}): replace lone surrogates, e.g. decode with errors='replace'"
        return f"is a {type(text).__name__}, not a str: every input must be text"
    return None


class _Work:
    """The batches of one run and where each one is: waiting to be sent (lowest id first, so that
    a batch given back by a broken stream, which holds up the output, goes out before new ones),
    sent on one stream and unanswered (in that stream's `sent`), or answered and waiting until the
    ones before it are yielded. A batch is in one place at a time, so each is answered once
    however many streams break. New batches are cut only while fewer than `held` are held
    (waiting, sent or answered early; the one being yielded is not) and the stream asking holds
    fewer than `window`."""

    def __init__(
        self,
        build: Callable[[list[str]], pb.EmbedRequest],
        texts: Iterable[str],
        *,
        batch_size: int,
        window: int,
        held: int,
        skip: bool,
    ) -> None:
        self._build, self._skip = build, skip
        self._batches = _batched(texts, batch_size)
        self._window, self._held = window, held
        self._unanswered: dict[int, _Batch] = {}  # request id -> batch: waiting or sent
        self._waiting: list[int] = []  # a heap of the ids of the batches to send
        self._answered: dict[int, _Batch] = {}  # answers that arrived before an earlier one
        self._next_id = self._next_start = self._next_out = 0
        self._exhausted = False  # no more batches to cut: the iterable ended, or the run stops
        self.changed = asyncio.Event()  # set when a batch moves; waiters clear it (see wait)
        self.finished = asyncio.Event()  # set once `complete`

    @property
    def complete(self) -> bool:
        """Every batch there will be is answered."""
        return self._exhausted and not self._unanswered

    async def wait(self) -> None:
        """Waits until a batch moves. The caller checks what it waits for first, with no await
        between that check and this call, so that no move is missed."""
        self.changed.clear()
        await self.changed.wait()

    async def pause(self, seconds: float) -> None:
        """Sleeps `seconds`, less if the run completes meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.finished.wait(), seconds)

    def _moved(self) -> None:
        self.changed.set()
        if self.complete:
            self.finished.set()

    def take(self, sent: set[int]) -> pb.EmbedStreamRequest | None:
        """The next message for the stream holding `sent` to send, its id added to `sent`: a
        waiting batch, else a new one if the bounds allow; None if there is none now."""
        while len(sent) < self._window:
            if self._waiting:
                rid = heapq.heappop(self._waiting)
            elif self._exhausted or self._next_id - self._next_out >= self._held:
                return None
            elif (cut := self._cut()) is not None:
                rid = cut
            else:
                continue  # a batch rejected whole, or the end of the iterable
            sent.add(rid)  # before writing: a failed write is given back
            message = self._unanswered[rid].message
            assert message is not None
            return message
        return None

    def give_back(self, sent: set[int]) -> None:
        """Puts the batches of a stream that broke back to be sent again, by another stream or
        this one re-opened."""
        for rid in sent:
            heapq.heappush(self._waiting, rid)
        sent.clear()
        self._moved()

    def _cut(self) -> int | None:
        """Takes the next batch off the iterable: its id, or None if none is to be sent."""
        texts = next(self._batches, None)
        if texts is None:
            self._exhausted = True
            self._moved()
            return None
        rid, self._next_id = self._next_id, self._next_id + 1
        batch = _Batch(self._next_start, texts)
        self._next_start += len(texts)
        if not self._prepare(rid, batch):
            self._resolve(rid, batch, [])
            return None
        self._unanswered[rid] = batch
        return rid

    def _prepare(self, rid: int, batch: _Batch) -> bool:
        """Builds the batch's message from its texts not rejected; False if none is left. A text
        protobuf cannot send (not a str, a lone surrogate) is rejected here, as the server would."""
        while True:
            batch.kept = [i for i in range(batch.end) if i not in batch.rejected]
            if not batch.kept:
                return False
            try:
                request = self._build([batch.texts[i] for i in batch.kept])
            except (TypeError, ValueError):
                why = next(((i, w) for i in batch.kept if (w := _unsendable(batch.texts[i])) is not None), None)
                if why is None:
                    raise  # an option, not a text, is wrong
                self._reject(batch, why[0], f"input {batch.start + why[0]} {why[1]}")
                continue
            batch.message = pb.EmbedStreamRequest(id=str(rid), request=request)
            return True

    def _reject(self, batch: _Batch, position: int, message: str) -> None:
        index = batch.start + position
        batch.reject(position, InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, message, index=index), self._skip)
        if batch.stop is not None:
            self._exhausted = True  # nothing after the input that stops the run is wanted

    def answer(self, sent: set[int], message: pb.EmbedStreamResponse) -> None:
        """Takes in one answer to the stream holding `sent`: vectors, or an input rejected (and
        the batch to be sent again without it); raises the typed error of any other in-band one."""
        rid = int(message.id)
        if rid not in sent:
            return
        batch = self._unanswered[rid]
        sent.discard(rid)
        if message.HasField("error"):
            named = _NAMED_INPUT.fullmatch(message.error.message)
            if message.error.code != _INVALID_ARGUMENT or named is None or int(named[1]) >= len(batch.kept):
                raise from_status_number(message.error.code, message.error.message)
            position = batch.kept[int(named[1])]
            self._reject(batch, position, f"input {batch.start + position} {named[2]}")
            if self._prepare(rid, batch):
                heapq.heappush(self._waiting, rid)
                self._moved()
                return
            del self._unanswered[rid]
            self._resolve(rid, batch, [])
        else:
            del self._unanswered[rid]
            self._resolve(rid, batch, decode(message.response))

    def _resolve(self, rid: int, batch: _Batch, vectors: Iterable[Vectors]) -> None:
        batch.answer(vectors)
        self._answered[rid] = batch
        self._moved()

    def pop_ready(self) -> _Batch | None:
        """The answered batch next in input order, if it is answered; taking it frees its place
        among the `held`."""
        batch = self._answered.pop(self._next_out, None)
        if batch is not None:
            self._next_out += 1
            self._moved()
        return batch


class _Stream:
    """One of a run's EmbedStream calls, re-opened after a transient failure with the batches it
    had unanswered given back, until the run is complete. `run()` raises _GaveUpError once it failed
    `max_retries` times in a row (no answer in between), waiting 0.2 s after the first failure,
    doubling up to 5 s."""

    def __init__(
        self,
        work: _Work,
        stub: pb_grpc.EmbeddingServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        max_retries: int,
    ) -> None:
        self._work, self._stub, self._metadata, self._max_retries = work, stub, metadata, max_retries
        self._sent: set[int] = set()  # ids of the batches sent on the call and unanswered
        self._failures = 0

    async def run(self) -> None:
        """Streams until the run is complete; raises the first error that is not transient."""
        while not self._work.complete:
            try:
                await self._once()
            except _RetryableError as retry:
                self._failures += 1
                if self._failures > self._max_retries:
                    gave_up = f"{retry.message} (gave up after {self._max_retries} retries)"
                    raise _GaveUpError(error_for(retry.code, gave_up)) from None
                await self._work.pause(min(0.1 * 2**self._failures, 5.0))

    async def _once(self) -> None:
        """One EmbedStream call, until the run is complete; raises _RetryableError if it breaks."""
        call = self._stub.EmbedStream(metadata=self._metadata)
        writer = asyncio.create_task(self._write(call))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                assert isinstance(message, pb.EmbedStreamResponse)
                self._work.answer(self._sent, message)
                self._failures = 0
            _raise_failure(writer)
            if not self._work.complete:
                raise _RetryableError(grpc.StatusCode.UNAVAILABLE, "the stream ended with requests unanswered")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or not current.cancelling():
                _raise_failure(writer)  # the writer cancelled the call: it failed
            raise
        except grpc.aio.AioRpcError as error:
            _raise_failure(writer)
            if error.code() not in _TRANSIENT:
                raise from_rpc_error(error) from None
            raise _RetryableError(error.code(), error.details() or "") from None
        finally:
            writer.cancel()
            call.cancel()
            self._work.give_back(self._sent)  # what is still unanswered: none after a clean end
            await asyncio.wait([writer])

    async def _write(self, call: Any) -> None:
        """Sends batches while the stream holds fewer than `window` unanswered; ends the writing
        once the run is complete."""
        try:
            while True:
                if (message := self._work.take(self._sent)) is not None:
                    await call.write(message)
                elif self._work.complete:
                    break
                else:
                    await self._work.wait()
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream broke; the reader sees its status
        except Exception:  # the caller's iterable failed: end the stream; the reader raises it
            call.cancel()
            raise


def _raise_failure(writer: asyncio.Task[None]) -> None:
    """Raises what the writer failed with, if it did (not a broken stream: the caller's iterable)."""
    if writer.done() and not writer.cancelled() and (error := writer.exception()) is not None:
        raise error


class BulkEmbed:
    """One bulk_embed run; `run()` yields a vector (or None for a skipped input) per input."""

    def __init__(
        self,
        stub: pb_grpc.EmbeddingServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        build: Callable[[list[str]], pb.EmbedRequest],
        texts: Iterable[str],
        *,
        batch_size: int,
        window: int,
        streams: int,
        progress: bool,
        max_retries: int,
        on_invalid: OnInvalid,
        skipped: Skipped | None,
    ) -> None:
        if batch_size < 1 or window < 1 or streams < 1:
            raise ValueError("batch_size, window and streams must be at least 1")
        if on_invalid not in ("raise", "skip"):
            raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
        self._stub, self._metadata, self._max_retries, self._streams = stub, metadata, max_retries, streams
        self._texts, self._build, self._batch_size, self._window = texts, build, batch_size, window
        self._skip, self._skipped = on_invalid == "skip", skipped
        self._total, self._progress = (len(texts) if isinstance(texts, Sized) else None), progress
        self._skip_count = 0
        self._error: BaseException | None = None  # what ends the run: the first fatal failure
        self._live = streams  # streams that have not given up
        self._bar: Any = None  # opened by run(), so that a run never iterated leaves none behind

    async def run(self) -> AsyncIterator[Vectors | None]:
        """Runs `streams` streams at once and yields their answers in input order; on leaving,
        early or not, cancels every stream still open and waits for it to end."""
        work = _Work(
            self._build,
            self._texts,
            batch_size=self._batch_size,
            window=self._window,
            held=self._window * self._streams,
            skip=self._skip,
        )
        self._bar = tqdm(total=self._total, unit="text", disable=not self._progress)
        tasks = [
            asyncio.create_task(_Stream(work, self._stub, self._metadata, self._max_retries).run())
            for _ in range(self._streams)
        ]
        for task in tasks:
            task.add_done_callback(functools.partial(self._ended, work))
        try:
            while True:
                if self._error is not None:
                    raise self._error
                if (batch := work.pop_ready()) is not None:
                    for result in self._yielded(batch):
                        yield result
                elif work.complete:
                    await asyncio.wait(tasks)  # the streams end cleanly: done writing, then OK
                    return
                else:
                    await work.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            self._bar.close()

    def _ended(self, work: _Work, task: asyncio.Task[None]) -> None:
        """Takes in a stream's end: the run fails with its error, unless it gave up while
        another stream is left to carry on."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        if isinstance(error, _GaveUpError):
            self._live -= 1
            if self._live:
                return
            error = error.error
        if self._error is None:
            self._error = error
        work.changed.set()

    def _yielded(self, batch: _Batch) -> Iterator[Vectors | None]:
        """The batch's results, its skipped inputs reported first; a batch that stops the run
        raises its error after its results."""
        for position, error in sorted(batch.rejected.items()):
            self._skip_count += 1
            if self._skipped is not None:
                self._skipped.append((batch.start + position, error))
        if self._skip_count:
            self._bar.set_postfix(skipped=self._skip_count, refresh=False)
        self._bar.update(len(batch.results))
        yield from batch.results
        if batch.stop is not None:
            raise batch.stop
