"""The client's bulk_embed, with its default retries, rides through a server stopped mid-stream,
drained by SIGTERM or killed by SIGKILL, and started again on the same port: 20,000 texts, every
vector once, in input order."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import numpy as np
import numpy.typing as npt
import pytest
from embedserve_client import AsyncClient

from bench.process import ServerProcess, free_port
from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import CACHE_DIR, RunningServer

COUNT = 20_000
TEXTS = [f"text {i} on restarts" for i in range(COUNT)]


@pytest.fixture(scope="module")
async def expected(server: RunningServer) -> npt.NDArray[np.float32]:
    """Every text's vector, from the in-process server."""
    async with AsyncClient(server.address) as reference:
        return np.concatenate([await reference.embed(TEXTS[i : i + 2048]) for i in range(0, COUNT, 2048)])


def stop_and_restart(first: ServerProcess, sig: signal.Signals, flags: list[str]) -> ServerProcess:
    """Stops the server with `sig` (SIGTERM drains in-flight calls for the grace period) and,
    once it is gone, starts another on the same port."""
    first.proc.send_signal(sig)
    first.proc.wait(timeout=60)
    return ServerProcess(flags)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_bulk_embed_with_default_retries_survives_a_stopped_and_restarted_server(
    expected: npt.NDArray[np.float32], sig: signal.Signals
) -> None:
    flags = ["--cache-dir", str(CACHE_DIR), "--port", str(free_port()), "--model-names", DEFAULT_DENSE_MODEL]
    first = ServerProcess([*flags, "--grace-period", "1"])
    restarted: asyncio.Task[ServerProcess] | None = None
    vectors = []
    try:
        async with AsyncClient(first.address) as client:
            async for vector in client.bulk_embed(TEXTS, batch_size=64, window=4):  # default max_retries
                vectors.append(vector)
                if len(vectors) == 3000:
                    restarted = asyncio.create_task(asyncio.to_thread(stop_and_restart, first, sig, flags))
        assert restarted is not None and restarted.done()
        assert first.proc.returncode == (0 if sig is signal.SIGTERM else -signal.SIGKILL)  # drained and exited
        assert len(vectors) == COUNT
        np.testing.assert_allclose(np.stack(vectors), expected, atol=1e-5)  # each once, in order
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
        if restarted is not None:
            with contextlib.suppress(Exception):
                second = await restarted
                second.proc.terminate()
                assert second.proc.wait(timeout=60) == 0
