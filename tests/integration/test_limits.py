"""Concurrency limits that count work, not connections: idle streams never make health lie or
lock out unary calls, the limits refuse at once with RESOURCE_EXHAUSTED naming the setting, and
a stream idle for STREAM_IDLE_TIMEOUT is closed with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
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


class IdleStreams:
    """`count` idle EmbedStreams held by a client process of their own (tests/integration/
    idle_streams.py): each answered once, so the server surely runs it, then silent."""

    def __init__(self, address: str, count: int) -> None:
        script = Path(__file__).with_name("idle_streams.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), address, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"the idle streams did not open: {line!r}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=60) == 0


def health_and_embed(address: str) -> tuple[int, int]:
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    reply = pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(inputs=["still here"]), timeout=30)
    return health.status, len(reply.embeddings)


def test_a_thousand_idle_streams_leave_health_serving_and_unary_calls_answered(server: RunningServer) -> None:
    streams = IdleStreams(server.address, server.settings.max_streams)
    try:
        assert health_and_embed(server.address) == (health_pb2.HealthCheckResponse.SERVING, 1)
    finally:
        streams.close()


def test_a_stream_beyond_max_streams_is_refused_at_once_and_health_stays_serving(limited: RunningServer) -> None:
    streams = IdleStreams(limited.address, limited.settings.max_streams)
    try:
        stop = threading.Event()

        def silent() -> Iterator[pb.EmbedStreamRequest]:
            stop.wait(30)
            return
            yield

        extra = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(limited.address)).EmbedStream(silent(), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            next(extra)
        stop.set()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "16 streams open, its MAX_STREAMS" in (refused.value.details() or "")
        assert health_and_embed(limited.address) == (health_pb2.HealthCheckResponse.SERVING, 1)
    finally:
        streams.close()


async def never_sends(stop: asyncio.Event) -> AsyncIterator[pb.EmbedStreamRequest]:
    """A stream's requests that never come, until `stop`."""
    await stop.wait()
    return
    yield  # an async generator


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
