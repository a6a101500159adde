"""The Python client (clients/python) against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
from embedserve_client import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)

from embedserve.settings import DEFAULT_SPARSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer


def raw_vectors(server: RunningServer, texts: list[str]) -> np.ndarray:
    """The vectors as a plain gRPC call returns them (packed floats)."""
    response = server.stub().Embed(pb.EmbedRequest(inputs=texts, encoding=pb.VECTOR_ENCODING_FLOAT))
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


async def collect(stream: AsyncIterator[np.ndarray]) -> np.ndarray:
    return np.stack([vector async for vector in stream])


async def test_embed_returns_the_same_vectors_as_a_raw_grpc_call(server: RunningServer) -> None:
    texts = ["hello world", "Ünïcödé façade", "a"]
    async with AsyncClient(server.address) as client:
        vectors = await client.embed(texts)
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384)
    np.testing.assert_array_equal(vectors, raw_vectors(server, texts))


async def test_embed_dimensions_keeps_the_first_values_renormalized(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        vectors = await client.embed(["hello world"], dimensions=64)
    assert vectors.shape == (1, 64)
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
async def test_bulk_embed_of_20000_texts_yields_every_vector_once_in_input_order(server: RunningServer) -> None:
    count = 20_000
    texts = (f"t{i}" for i in range(count))  # a generator: the client must not need a list
    async with AsyncClient(server.address) as client:
        vectors = await collect(client.bulk_embed(texts, batch_size=256, window=8))
        sample = [0, 1, 255, 256, 9_999, 12_345, count - 1]
        expected = await client.embed([f"t{i}" for i in sample])
    assert vectors.shape == (count, 384)
    np.testing.assert_allclose(vectors[sample], expected, atol=1e-5)


class CuttingProxy:
    """A TCP proxy to the server that breaks its first connection after `cut_after` bytes back."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.cut_after = cut_after
        self.connections = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        limit = self.cut_after if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> None:
            sent = 0
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    sent += len(data)
                    if limit is not None and sent >= limit:
                        self.cuts += 1
                        break
            for w in (writer, up_writer):
                w.close()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer, None)),
            asyncio.create_task(pipe(up_reader, writer, limit)),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_bulk_embed_survives_a_broken_stream_without_losing_or_repeating_items(server: RunningServer) -> None:
    count = 5_000
    proxy = CuttingProxy(server.address, cut_after=400_000)  # a few 64 x 384 x 4-byte responses
    target = await proxy.start()
    try:
        async with AsyncClient(target) as client:
            vectors = await collect(client.bulk_embed((f"t{i}" for i in range(count)), batch_size=64, window=8))
    finally:
        await proxy.close()
    assert proxy.cuts == 1
    assert proxy.connections >= 2
    assert vectors.shape == (count, 384)
    async with AsyncClient(server.address) as client:
        expected = await client.embed([f"t{i}" for i in range(0, count, 97)])
    np.testing.assert_allclose(vectors[::97], expected, atol=1e-5)


async def test_bulk_embed_gives_up_with_unavailable_after_max_retries() -> None:
    async with AsyncClient("127.0.0.1:1") as client:
        with pytest.raises(UnavailableError):
            await collect(client.bulk_embed(["a", "b"], max_retries=1))


async def test_bulk_embed_raises_the_in_band_error_of_a_batch(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await collect(client.bulk_embed(["fine", "", "also fine"], batch_size=1))
    assert caught.value.message


async def test_unknown_model_is_not_found_with_the_servers_message(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        with pytest.raises(NotFoundError) as caught:
            await client.embed(["x"], model="no/such-model")
    assert "no/such-model" in caught.value.message
    assert caught.value.code.name == "NOT_FOUND"


async def test_rerank_with_the_dense_model_puts_the_relevant_document_first(server: RunningServer) -> None:
    documents = ["The capital of France is Paris.", "Bananas are yellow.", "Cats sleep a lot."]
    async with AsyncClient(server.address) as client:
        results = await client.rerank("What is the capital of France?", documents, return_documents=True, top_n=2)
    assert len(results) == 2
    assert results[0].index == 0
    assert results[0].document == documents[0]
    assert results[0].relevance_score >= results[1].relevance_score


async def test_sparse_embed_returns_ascending_indices_and_tokens(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        vectors = await client.sparse_embed(["The capital of France"], model=DEFAULT_SPARSE_MODEL, return_tokens=True)
        models = await client.list_models()
    assert len(vectors) == 1
    vector = vectors[0]
    assert len(vector.indices) == len(vector.values) == len(vector.tokens) > 0
    assert np.all(np.diff(vector.indices) > 0)
    assert (vector.values > 0).all()
    kinds = {m.id: m.kind for m in models}
    assert kinds[DEFAULT_SPARSE_MODEL] == "sparse"


def test_sync_client_embeds_and_streams(server: RunningServer) -> None:
    with Client(server.address) as client:
        vectors = client.embed(["hello world"])
        streamed = np.stack(list(client.bulk_embed(["hello world", "t1", "t2"], batch_size=2)))
    np.testing.assert_array_equal(vectors[0], streamed[0])
    assert streamed.shape == (3, 384)
