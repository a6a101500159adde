"""bulk_embed's machinery: batches of the caller's iterable streamed through EmbedStream, answers
put back in input order, transient failures retried, and inputs the server rejects raised or
skipped by their position in the whole iterable."""

from __future__ import annotations

import asyncio
import collections
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
        progress: bool,
        max_retries: int,
        on_invalid: OnInvalid,
        skipped: Skipped | None,
    ) -> None:
        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be at least 1")
        if on_invalid not in ("raise", "skip"):
            raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
        self._stub, self._metadata, self._build = stub, metadata, build
        self._window, self._max_retries = window, max_retries
        self._skip, self._skipped = on_invalid == "skip", skipped
        self._batches = _batched(texts, batch_size)
        self._unanswered: dict[int, _Batch] = {}  # request id -> batch, in id order
        self._answered: dict[int, _Batch] = {}  # answers that arrived before an earlier one
        self._resend: collections.deque[int] = collections.deque()  # batches cut down, to send again
        self._wake = asyncio.Event()  # the writer may have something to do
        self._next_id = self._next_start = self._next_out = self._failures = self._skip_count = 0
        self._exhausted = False  # no more batches to cut: the iterable ended, or the run stops
        self._total, self._progress = (len(texts) if isinstance(texts, Sized) else None), progress
        self._bar: Any = None  # opened by run(), so that a run never iterated leaves none behind

    async def run(self) -> AsyncIterator[Vectors | None]:
        """Streams until every input is answered, re-opening the stream after a transient failure
        up to `max_retries` times in a row, 0.2 s apart doubling up to 5 s."""
        self._bar = tqdm(total=self._total, unit="text", disable=not self._progress)
        try:
            while True:
                for result in self._ready():
                    yield result
                if self._exhausted and not self._unanswered:
                    return
                try:
                    async for result in self._stream():
                        yield result
                except _RetryableError as retry:
                    await self._back_off(retry)
        finally:
            self._bar.close()

    async def _back_off(self, retry: _RetryableError) -> None:
        """Waits before the next try, or raises the failure once `max_retries` tries in a row failed."""
        self._failures += 1
        if self._failures > self._max_retries:
            raise error_for(retry.code, f"{retry.message} (gave up after {self._max_retries} retries)") from None
        await asyncio.sleep(min(0.1 * 2**self._failures, 5.0))

    async def _stream(self) -> AsyncIterator[Vectors | None]:
        """One EmbedStream call, until every batch is answered; raises _RetryableError if it breaks."""
        call = self._stub.EmbedStream(metadata=self._metadata)
        self._resend.clear()  # the writer sends every unanswered batch as it is now
        writer_error: list[BaseException] = []
        writer = asyncio.create_task(self._write(call, writer_error))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                assert isinstance(message, pb.EmbedStreamResponse)
                self._answer(message)
                for result in self._ready():
                    yield result
            if writer_error:
                raise writer_error[0]
            if not (self._exhausted and not self._unanswered):
                raise _RetryableError(grpc.StatusCode.UNAVAILABLE, "the stream ended with requests unanswered")
        except grpc.aio.AioRpcError as error:
            if writer_error:
                raise writer_error[0] from None
            if error.code() not in _TRANSIENT:
                raise from_rpc_error(error) from None
            raise _RetryableError(error.code(), error.details() or "") from None
        finally:
            writer.cancel()
            call.cancel()

    async def _write(self, call: Any, errors: list[BaseException]) -> None:
        """Sends the unanswered batches, then batches cut down by a rejection again and new ones
        while fewer than `window` are unanswered; ends the writing once every batch is answered."""
        try:
            for batch in list(self._unanswered.values()):
                await call.write(batch.message)
            while not (self._exhausted and not self._unanswered):
                if self._resend:
                    await call.write(self._unanswered[self._resend.popleft()].message)
                elif not self._exhausted and len(self._unanswered) < self._window:
                    if (message := self._cut()) is not None:
                        await call.write(message)
                else:
                    self._wake.clear()
                    await self._wake.wait()
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream broke; the reader sees its status
        except Exception as exc:  # the caller's iterable failed: end the stream, re-raise
            errors.append(exc)
            call.cancel()

    def _cut(self) -> pb.EmbedStreamRequest | None:
        """Takes the next batch off the iterable: its message, or None if none is to be sent."""
        texts = next(self._batches, None)
        if texts is None:
            self._exhausted = True
            return None
        rid, self._next_id = self._next_id, self._next_id + 1
        batch = _Batch(self._next_start, texts)
        self._next_start += len(texts)
        if not self._prepare(rid, batch):
            self._resolve(rid, batch, [])
            return None
        self._unanswered[rid] = batch  # before writing: a failed write is re-sent
        return batch.message

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

    def _answer(self, message: pb.EmbedStreamResponse) -> None:
        """Takes in one answer: vectors, or an input rejected (and the batch re-sent without it)."""
        rid = int(message.id)
        batch = self._unanswered.get(rid)
        if batch is None:
            return
        if message.HasField("error"):
            named = _NAMED_INPUT.fullmatch(message.error.message)
            if message.error.code != _INVALID_ARGUMENT or named is None or int(named[1]) >= len(batch.kept):
                raise from_status_number(message.error.code, message.error.message)
            position = batch.kept[int(named[1])]
            self._reject(batch, position, f"input {batch.start + position} {named[2]}")
            if self._prepare(rid, batch):
                self._resend.append(rid)
            else:
                del self._unanswered[rid]
                self._resolve(rid, batch, [])
        else:
            del self._unanswered[rid]
            self._resolve(rid, batch, decode(message.response))
        self._failures = 0
        self._wake.set()

    def _resolve(self, rid: int, batch: _Batch, vectors: Iterable[Vectors]) -> None:
        batch.answer(vectors)
        self._answered[rid] = batch
        self._wake.set()

    def _ready(self) -> Iterator[Vectors | None]:
        """The results of the answered batches next in input order, their skipped inputs
        reported first; a batch that stops the run raises its error after its results."""
        while (batch := self._answered.pop(self._next_out, None)) is not None:
            self._next_out += 1
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
