"""Shared fixtures: real servers on ephemeral loopback ports, one per configuration."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest

from bench.process import Gateway
from embedserve.app import serve
from embedserve.engine.engine import Engine
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings, Settings
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

# Exports are cached across test sessions (and shared with `make run`) unless CI says otherwise.
CACHE_DIR = Path(os.environ.get("EMBEDSERVE_TEST_CACHE", Path.home() / ".cache" / "embedserve"))


class RunningServer:
    """A real embedserve server on 127.0.0.1:<ephemeral>, in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine.load(settings)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        ready: Future[int] = Future()
        metrics: Future[int | None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready, metrics), daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=120)
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = metrics.result(timeout=10)  # None: METRICS_PORT off
        self.metrics_address = "" if self.metrics_port is None else f"127.0.0.1:{self.metrics_port}"

    def _run(self, ready: Future[int], metrics: Future[int | None]) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            started: asyncio.Future[int] = loop.create_future()
            started.add_done_callback(lambda f: ready.set_result(f.result()))
            metrics_started: asyncio.Future[int | None] = loop.create_future()
            metrics_started.add_done_callback(lambda f: metrics.set_result(f.result()))
            await serve(self.settings, self.engine, stop=self._stop, ready=started, metrics_ready=metrics_started)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # surface startup failures to the fixture
            if not ready.done():
                ready.set_exception(exc)
            raise

    def call(self, coro_fn, *args):  # type: ignore[no-untyped-def]
        """Runs a coroutine function on the server's loop (to inspect engine state)."""
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result(timeout=30)

    def stub(self) -> pb_grpc.EmbeddingServiceStub:
        """A blocking stub on a fresh channel."""
        limit = ("grpc.max_receive_message_length", self.settings.max_message_bytes)
        channel = grpc.insecure_channel(self.address, options=[limit])
        return pb_grpc.EmbeddingServiceStub(channel)

    def stop(self) -> None:
        """Stops serving and waits for the thread."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)


def make_settings(**overrides: object) -> Settings:
    """Test settings: loopback, ephemeral ports (gRPC and metrics), the shared export cache."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "cache_dir": CACHE_DIR,
        "grace_period": 5.0,
    }
    values.update(overrides)
    return dataclasses.replace(Settings(), **values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The default server: all-MiniLM-L6-v2 on ONNX Runtime."""
    running = RunningServer(make_settings())
    yield running
    running.stop()


@pytest.fixture(scope="session")
def gateway(server: RunningServer) -> Iterator[Gateway]:
    """Envoy in front of the default server (dense, sparse and rerank models), as `make run` starts it."""
    running = Gateway(server.address, metrics=server.metrics_address)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def torch_server() -> Iterator[RunningServer]:
    """The same model on the torch backend."""
    running = RunningServer(make_settings(models=(ModelSettings(DEFAULT_DENSE_MODEL, backend="torch"),)))
    yield running
    running.stop()
