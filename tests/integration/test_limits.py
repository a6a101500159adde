"""Concurrency limits that count work, not connections: idle streams never make health lie or
lock out unary calls, the limits refuse at once with RESOURCE_EXHAUSTED naming the setting, and
a stream idle for STREAM_IDLE_TIMEOUT is closed with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_settings

IDLE_S = 0.5


@pytest.fixture(scope="module")
def limited() -> Iterator[RunningServer]:
    running = RunningServer(make_settings(max_streams=16, max_concurrency=4, stream_idle_timeout=IDLE_S))
    yield running
    running.stop()


async def never_sends(stop: asyncio.Event) -> AsyncIterator[pb.EmbedStreamRequest]:
    """A stream's requests that never come, until `stop`."""
    await stop.wait()
    return
    yield  # an async generator


async def health_and_embed(channel: grpc.aio.Channel) -> tuple[int, int]:
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    reply = await pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(inputs=["still here"]), timeout=30)
    return health.status, len(reply.embeddings)


async def one_then_nothing(stop: asyncio.Event) -> AsyncIterator[pb.EmbedStreamRequest]:
    """A stream's requests: one, then none until `stop`."""
    yield pb.EmbedStreamRequest(id="0", request=pb.EmbedRequest(inputs=["then silence"]))
    await stop.wait()


async def open_idle_streams(address: str, count: int, stop: asyncio.Event) -> tuple[list[Any], list[grpc.aio.Channel]]:
    """`count` EmbedStreams over 16 connections, as many clients would open them, each answered
    once (so the server surely runs it) and then idle."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(16)]
    stubs = [pb_grpc.EmbeddingServiceStub(channel) for channel in channels]
    calls = [stubs[i % len(stubs)].EmbedStream(one_then_nothing(stop)) for i in range(count)]
    firsts: list[Any] = await asyncio.wait_for(asyncio.gather(*(call.read() for call in calls)), 120)
    assert {first.id for first in firsts} == {"0"}
    return calls, channels


async def close_streams(calls: list[Any], channels: list[grpc.aio.Channel], stop: asyncio.Event) -> None:
    stop.set()
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()


def test_a_thousand_idle_streams_leave_health_serving_and_unary_calls_answered(server: RunningServer) -> None:
    async def scenario() -> tuple[int, int]:
        stop = asyncio.Event()
        calls, channels = await open_idle_streams(server.address, server.settings.max_streams, stop)
        try:
            async with grpc.aio.insecure_channel(server.address) as other:
                return await health_and_embed(other)
        finally:
            await close_streams(calls, channels, stop)

    assert asyncio.run(scenario()) == (health_pb2.HealthCheckResponse.SERVING, 1)


def test_a_stream_beyond_max_streams_is_refused_at_once_and_health_stays_serving(limited: RunningServer) -> None:
    async def scenario() -> tuple[grpc.StatusCode, str, tuple[int, int]]:
        stop = asyncio.Event()
        calls, channels = await open_idle_streams(limited.address, limited.settings.max_streams, stop)
        try:
            async with grpc.aio.insecure_channel(limited.address) as other:
                extra = pb_grpc.EmbeddingServiceStub(other).EmbedStream(never_sends(stop), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await extra.read()
                return refused.value.code(), refused.value.details() or "", await health_and_embed(other)
        finally:
            await close_streams(calls, channels, stop)

    code, message, after = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "16 streams open, its MAX_STREAMS" in message
    assert after == (health_pb2.HealthCheckResponse.SERVING, 1)


def test_a_unary_call_beyond_max_concurrency_is_refused_at_once_and_health_is_not_counted(
    limited: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    entered: list[int] = []
    all_in = threading.Event()  # set on the server's loop, waited for on the test's
    real_embed = limited.engine.embed

    async def slow_embed(*args: Any, **kwargs: Any) -> Any:
        entered.append(1)
        if len(entered) == 4:
            all_in.set()
        await asyncio.to_thread(release.wait, 30)
        return await real_embed(*args, **kwargs)

    monkeypatch.setattr(limited.engine, "embed", slow_embed)

    async def scenario() -> tuple[grpc.StatusCode, str, int]:
        async with grpc.aio.insecure_channel(limited.address) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            held = [stub.Embed(pb.EmbedRequest(inputs=[f"held {i}"]), timeout=30) for i in range(4)]
            assert await asyncio.to_thread(all_in.wait, 30), "the held calls never reached the engine"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Embed(pb.EmbedRequest(inputs=["one too many"]), timeout=10)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            release.set()
            replies = await asyncio.gather(*held)
            assert all(len(reply.embeddings) == 1 for reply in replies)
            return refused.value.code(), refused.value.details() or "", health.status

    code, message, health = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "answering 4 unary requests, its MAX_CONCURRENCY" in message
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert len(entered) == 4  # the refused call never reached the engine


def test_a_stream_idle_for_the_timeout_is_closed_with_unavailable_and_a_busy_one_is_not(
    limited: RunningServer,
) -> None:
    async def busy_requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        for i in range(6):  # 6 x 0.2 s: longer than the timeout, never idle for it
            yield pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(inputs=[f"text {i}"]))
            await asyncio.sleep(IDLE_S * 0.4)

    async def scenario() -> tuple[grpc.StatusCode, str, list[str]]:
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(limited.address) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            idle = stub.EmbedStream(never_sends(stop))
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                async for _ in idle:
                    pass
            answered = [response.id async for response in stub.EmbedStream(busy_requests())]
            stop.set()
            return closed.value.code(), closed.value.details() or "", answered

    code, message, answered = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert f"no request came on this stream for {IDLE_S:g} s" in message and "STREAM_IDLE_TIMEOUT" in message
    assert sorted(answered) == [str(i) for i in range(6)]
