"""Opens COUNT EmbedStreams to ADDRESS, each answered once and then idle, prints "ready", and
holds them until a line arrives on stdin. Run as a separate process by test_limits.py, so that the
streams' client has a process (and a grpc.aio event loop) of its own, apart from the server's.

Usage: python tests/integration/idle_streams.py ADDRESS COUNT
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc


async def one_then_nothing(stop: asyncio.Event) -> AsyncIterator[pb.EmbedStreamRequest]:
    yield pb.EmbedStreamRequest(id="0", request=pb.EmbedRequest(inputs=["then silence"]))
    await stop.wait()


async def main(address: str, count: int) -> int:
    stop = asyncio.Event()
    channels = [grpc.aio.insecure_channel(address) for _ in range(16)]
    stubs = [pb_grpc.EmbeddingServiceStub(channel) for channel in channels]
    calls = [stubs[i % len(stubs)].EmbedStream(one_then_nothing(stop)) for i in range(count)]
    firsts: list[Any] = await asyncio.wait_for(asyncio.gather(*(call.read() for call in calls)), 120)
    if {first.id for first in firsts} != {"0"}:
        print(f"unexpected first answers: {firsts[:3]}", flush=True)
        return 1
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]))))
