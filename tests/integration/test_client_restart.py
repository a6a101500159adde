"""The client's bulk_embed, with its default retries, rides through a server killed (SIGKILL)
mid-stream and started again on the same port: every vector once, in input order."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from embedserve_client import AsyncClient

from bench.process import ServerProcess, free_port
from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import CACHE_DIR, RunningServer

COUNT = 3000


async def test_bulk_embed_with_default_retries_survives_a_killed_and_restarted_server(server: RunningServer) -> None:
    texts = [f"text number {i} about restarts" for i in range(COUNT)]
    flags = ["--cache-dir", str(CACHE_DIR), "--port", str(free_port()), "--model-names", DEFAULT_DENSE_MODEL]
    first = ServerProcess(flags)
    restarted: asyncio.Task[ServerProcess] | None = None
    vectors = []
    try:
        async with AsyncClient(first.address) as client:
            async for vector in client.bulk_embed(texts, batch_size=32, window=4):  # default max_retries
                vectors.append(vector)
                if len(vectors) == 500:
                    first.proc.kill()  # mid-stream, no drain
                    first.proc.wait()
                    restarted = asyncio.create_task(asyncio.to_thread(ServerProcess, flags))
        assert restarted is not None and restarted.done()
        assert len(vectors) == COUNT
        async with AsyncClient(server.address) as reference:
            expected = np.concatenate([await reference.embed(texts[i : i + 1000]) for i in range(0, COUNT, 1000)])
        np.testing.assert_allclose(np.stack(vectors), expected, atol=1e-5)  # each once, in order
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
        if restarted is not None:
            with contextlib.suppress(Exception):
                second = await restarted
                second.proc.terminate()
                assert second.proc.wait(timeout=60) == 0
