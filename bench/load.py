"""Load against a running server: connections, the shared-queue client loop, one bulk stream,
a latency prober, and the clocks that say what a phase cost in wall time and CPU seconds."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import numpy as np

from bench.harness import LATENCY_INPUT, FloatArray, percentile
from bench.process import process_cpu_s
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from embedserve.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

MAX_MESSAGE_BYTES = 64 << 20


def channel(address: str) -> grpc.aio.Channel:
    """One client connection (its own subchannel, so N clients are N HTTP/2 connections)."""
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


class Connections:
    """`count` client connections to `address` (one HTTP/2 connection each) and a stub on each,
    closed on exit. They connect on first use, or on ready()."""

    def __init__(self, address: str, count: int) -> None:
        self.channels = [channel(address) for _ in range(count)]
        self.stubs = [pb_grpc.EmbeddingServiceStub(c) for c in self.channels]

    async def ready(self) -> None:
        """Waits until every connection is up."""
        await asyncio.gather(*(c.channel_ready() for c in self.channels))

    async def __aenter__(self) -> Connections:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for c in self.channels:
            await c.close()


def decode(response: pb.EmbedResponse) -> FloatArray:
    """float32_le vectors -> (n, dimension) array, one copy (the join)."""
    raw = b"".join([e.float32_le for e in response.embeddings])
    return np.frombuffer(raw, dtype="<f4").reshape(len(response.embeddings), response.dimension)


@dataclass(frozen=True)
class Elapsed:
    """Wall seconds, this process's CPU seconds and those of the watched processes."""

    seconds: float
    own_cpu_s: float
    cpu_s: tuple[float, ...]


class Clock:
    """Started on creation; read() says what has passed since, for this process and `pids`."""

    def __init__(self, *pids: int) -> None:
        self._pids = pids
        self._start = self._now()

    def _now(self) -> tuple[float, ...]:
        return (time.perf_counter(), time.process_time(), *(process_cpu_s(p) for p in self._pids))

    def read(self) -> Elapsed:
        """Wall time and CPU seconds since the clock started."""
        wall, own, *others = (b - a for a, b in zip(self._start, self._now(), strict=True))
        return Elapsed(wall, own, tuple(others))


@dataclass
class Throughput:
    """What one gRPC throughput phase measured."""

    seconds: float
    texts: int
    client_cpu_s: float
    server_cpu_s: float
    # Means of the server's EmbedResponse.timing over all responses, in ms.
    server_timing_ms: dict[str, float] = field(default_factory=dict)
    # Client-observed request latency (send to decoded), in ms.
    request_ms_p50: float = 0.0
    request_ms_p99: float = 0.0

    @property
    def texts_per_s(self) -> float:
        """Texts answered per second of wall time."""
        return self.texts / self.seconds

    @property
    def cores_used(self) -> float:
        """CPU seconds of bench and server per wall second: how much of the machine the phase got."""
        return (self.client_cpu_s + self.server_cpu_s) / self.seconds


def mean_timing(timings: Sequence[pb.Timing]) -> dict[str, float]:
    """Averages the server-reported timing fields."""
    if not timings:
        return {}
    names = ("queue_ms", "tokenize_ms", "inference_ms", "total_ms")
    return {n: statistics.fmean(getattr(t, n) for t in timings) for n in names}


class TimedResponse(Protocol):
    """A response that carries the server's timing (EmbedResponse, SparseEmbedResponse, RerankResponse)."""

    @property
    def timing(self) -> pb.Timing: ...


Client = TypeVar("Client")
Req = TypeVar("Req")
Resp = TypeVar("Resp", bound=TimedResponse)
Out = TypeVar("Out")


async def queue_load(
    clients: Sequence[Client], requests: Sequence[Req], call: Callable[[Client, Req], Awaitable[Out]]
) -> tuple[list[Out], list[float]]:
    """Each client takes the next request from a shared queue until none are left. Returns the
    answers in request order and the latency of each call in ms."""
    queue = collections.deque(enumerate(requests))
    answers: list[Any] = [None] * len(requests)
    latencies: list[float] = []

    async def run(client: Client) -> None:
        while queue:
            index, request = queue.popleft()
            sent = time.perf_counter()
            answers[index] = await call(client, request)
            latencies.append((time.perf_counter() - sent) * 1e3)

    await asyncio.gather(*(run(client) for client in clients))
    return answers, latencies


async def rpc_load(
    stubs: Sequence[Stub],
    requests: Sequence[Req],
    call: Callable[[Stub, Req], Awaitable[Resp]],
    decode: Callable[[Resp], Out],
) -> tuple[list[Out], list[pb.Timing], list[float]]:
    """queue_load with one client per stub, decoding every response. Returns the decoded
    responses in request order, the server timings and the client-seen latencies in ms (send
    to decoded)."""

    async def answer(stub: Stub, request: Req) -> tuple[Out, pb.Timing]:
        response = await call(stub, request)
        return decode(response), response.timing

    answers, latencies = await queue_load(stubs, requests, answer)
    return [out for out, _ in answers], [timing for _, timing in answers], latencies


def embed_call(stub: Stub, request: pb.EmbedRequest) -> Awaitable[pb.EmbedResponse]:
    """One Embed call."""
    return stub.Embed(request)


async def embed_load(
    stubs: Sequence[Stub], requests: Sequence[pb.EmbedRequest]
) -> tuple[list[FloatArray], list[pb.Timing], list[float]]:
    """rpc_load for Embed, decoding every response into its (n, dimension) vectors."""
    return await rpc_load(stubs, requests, embed_call, decode)


async def timed_load(
    server_pid: int,
    stubs: Sequence[Stub],
    requests: Sequence[Req],
    items: int,
    call: Callable[[Stub, Req], Awaitable[Resp]],
    decode: Callable[[Resp], Out],
) -> tuple[Throughput, list[Out]]:
    """rpc_load, measured: returns the throughput (of `items` texts or pairs) and the decoded
    responses in request order."""
    clock = Clock(server_pid)
    results, timings, latencies = await rpc_load(stubs, requests, call, decode)
    elapsed = clock.read()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    (server_cpu_s,) = elapsed.cpu_s
    throughput = Throughput(elapsed.seconds, items, elapsed.own_cpu_s, server_cpu_s, mean_timing(timings), p50, p99)
    return throughput, results


async def stream_bulk(
    stub: Stub, requests: Sequence[pb.EmbedStreamRequest], in_flight: int
) -> tuple[dict[str, FloatArray], list[pb.Timing]]:
    """Sends every request on one EmbedStream with at most `in_flight` unanswered; checks each
    id is answered exactly once and without error."""
    call = stub.EmbedStream()
    window = asyncio.Semaphore(in_flight)

    async def write() -> None:
        for request in requests:
            await window.acquire()
            await call.write(request)
        await call.done_writing()

    writer = asyncio.create_task(write())
    answered: dict[str, FloatArray] = {}
    timings: list[pb.Timing] = []
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            assert isinstance(message, pb.EmbedStreamResponse)
            if message.HasField("error"):
                raise RuntimeError(
                    f"stream request {message.id} failed: {message.error.status} {message.error.message}"
                )
            if message.id in answered:
                raise RuntimeError(f"stream answered id {message.id} twice")
            answered[message.id] = decode(message.response)
            timings.append(message.response.timing)
            window.release()
        await writer
    finally:
        writer.cancel()
    missing = {r.id for r in requests} - answered.keys()
    if missing:
        raise RuntimeError(f"stream never answered {len(missing)} ids, e.g. {sorted(missing)[:5]}")
    return answered, timings


async def probe_latency(stub: Stub, until: Callable[[], bool], limit: int) -> tuple[list[float], list[pb.Timing]]:
    """Sends one short input at a time until `until()` or `limit` calls; returns latencies in ms
    and the server's timing of each call."""
    request = pb.EmbedRequest(inputs=[LATENCY_INPUT])
    latencies: list[float] = []
    timings: list[pb.Timing] = []
    while not until() and len(latencies) < limit:
        sent = time.perf_counter()
        response = await stub.Embed(request)
        decode(response)
        latencies.append((time.perf_counter() - sent) * 1e3)
        timings.append(response.timing)
    return latencies, timings
