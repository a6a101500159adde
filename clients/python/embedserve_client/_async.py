"""The async client: one grpc.aio channel, typed results, typed errors."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from embedserve_client._pb.embedserve.v1 import embedding_service_pb2 as pb
from embedserve_client._pb.embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from embedserve_client.errors import error_for, from_rpc_error, from_status_number

Vectors = npt.NDArray[np.float32]

# Failures of the stream itself after which re-opening it can succeed: the server is restarting
# or busy, or the connection broke. grpc-core reports a connection cut mid-message as INTERNAL
# ("Internal error from Core"); the server's own failures arrive in-band, per request, and are
# never retried. Re-sending is safe: answers are matched by request id, and max_retries bounds it.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL})
# The server's default MAX_MESSAGE_BYTES (this distribution cannot import the server's settings).
_MAX_MESSAGE_BYTES = 64 << 20
_KINDS = {pb.MODEL_KIND_DENSE: "dense", pb.MODEL_KIND_SPARSE: "sparse", pb.MODEL_KIND_RERANK: "rerank"}


@dataclass(frozen=True)
class SparseVector:
    """One SPLADE vector: vocabulary ids (ascending), their weights, and the tokens if asked for."""

    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float32]
    tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RerankResult:
    """One reranked document: its index in the request, its score, and its text if asked for."""

    index: int
    relevance_score: float
    document: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """A served model, as ListModels describes it."""

    id: str
    kind: str
    capabilities: list[str]
    dimension: int
    vocab_size: int
    max_input_tokens: int
    backend: str
    execution_provider: str
    dtype: str
    prompts: dict[str, str]
    default_prompt_name: str
    normalize: bool
    max_batch_size: int


def _decode(response: pb.EmbedResponse) -> Vectors:
    """Turns a response's float32_le vectors into one (n, dim) array, in input order."""
    embeddings = sorted(response.embeddings, key=lambda e: e.index)
    if not embeddings:
        return np.empty((0, response.dimension), dtype=np.float32)
    if all(e.float32_le for e in embeddings):
        joined = b"".join(e.float32_le for e in embeddings)
        return np.frombuffer(joined, dtype="<f4").astype(np.float32, copy=False).reshape(len(embeddings), -1)
    return np.array([list(e.values) for e in embeddings], dtype=np.float32)


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Cuts an iterable into lists of `size`, lazily."""
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class AsyncClient:
    """An async embedserve client. Use `async with AsyncClient(...) as client:` or call `close()`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ]
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key is not None else ()
        )
        self._timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; RPCs in flight are cancelled."""
        await self._channel.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    @staticmethod
    def _embed_request(
        texts: Sequence[str],
        model: str,
        dimensions: int | None,
        normalize: bool | None,
        truncate: bool | None,
        prompt_name: str,
        prompt: str | None,
    ) -> pb.EmbedRequest:
        # None leaves an optional field unset: the server default applies.
        return pb.EmbedRequest(
            model=model,
            inputs=texts,
            dimensions=dimensions,
            normalize=normalize,
            truncate=truncate,
            prompt_name=prompt_name,
            prompt=prompt,
            encoding=pb.VECTOR_ENCODING_FLOAT32_LE,
        )

    async def embed(
        self,
        texts: Sequence[str],
        *,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        prompt_name: str = "",
        prompt: str | None = None,
    ) -> Vectors:
        """Returns one dense vector per text as an (n, dim) float32 array, in input order."""
        request = self._embed_request(list(texts), model, dimensions, normalize, truncate, prompt_name, prompt)
        response: pb.EmbedResponse = await self._unary(self._stub.Embed, request)
        return _decode(response)

    async def sparse_embed(
        self,
        texts: Sequence[str],
        *,
        model: str = "",
        truncate: bool | None = None,
        top_k: int | None = None,
        min_weight: float | None = None,
        return_tokens: bool = False,
    ) -> list[SparseVector]:
        """Returns one SPLADE vector per text, in input order."""
        request = pb.SparseEmbedRequest(
            model=model,
            inputs=list(texts),
            truncate=truncate,
            top_k=top_k,
            min_weight=min_weight,
            return_tokens=return_tokens,
        )
        response: pb.SparseEmbedResponse = await self._unary(self._stub.SparseEmbed, request)
        return [
            SparseVector(
                indices=np.array(e.indices, dtype=np.int32),
                values=np.array(e.values, dtype=np.float32),
                tokens=list(e.tokens),
            )
            for e in sorted(response.embeddings, key=lambda e: e.index)
        ]

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str = "",
        top_n: int | None = None,
        return_documents: bool = False,
        raw_scores: bool = False,
        truncate: bool | None = None,
    ) -> list[RerankResult]:
        """Returns the documents' scores against the query, highest first."""
        request = pb.RerankRequest(
            model=model,
            query=query,
            documents=list(documents),
            top_n=top_n,
            return_documents=return_documents,
            raw_scores=raw_scores,
            truncate=truncate,
        )
        response: pb.RerankResponse = await self._unary(self._stub.Rerank, request)
        return [RerankResult(r.index, r.relevance_score, r.document) for r in response.results]

    async def list_models(self) -> list[ModelInfo]:
        """Returns the models the server serves."""
        response: pb.ListModelsResponse = await self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return [
            ModelInfo(
                id=m.id,
                kind=_KINDS.get(m.kind, "unspecified"),
                capabilities=list(m.capabilities),
                dimension=m.dimension,
                vocab_size=m.vocab_size,
                max_input_tokens=m.max_input_tokens,
                backend=m.backend,
                execution_provider=m.execution_provider,
                dtype=m.dtype,
                prompts=dict(m.prompts),
                default_prompt_name=m.default_prompt_name,
                normalize=m.normalize,
                max_batch_size=m.max_batch_size,
            )
            for m in response.models
        ]

    async def bulk_embed(
        self,
        texts: Iterable[str],
        *,
        batch_size: int = 64,
        window: int = 16,
        progress: bool = False,
        max_retries: int = 8,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        prompt_name: str = "",
        prompt: str | None = None,
    ) -> AsyncIterator[Vectors]:
        """Yields one vector per text, in input order, streaming any iterable through EmbedStream.

        At most `window` requests of `batch_size` texts are unanswered at a time. A transient
        failure (UNAVAILABLE, RESOURCE_EXHAUSTED, a broken stream, even one grpc-core reports as
        INTERNAL) re-opens the stream and re-sends only the unanswered batches, up to
        `max_retries` times in a row, 0.2 s apart doubling up to 5 s (the default 8: ~21 s, enough
        for a server restarted in 10 s); no text is lost or repeated.
        An in-band error for a batch raises its typed exception.
        """
        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be at least 1")
        batches = _batched(texts, batch_size)
        unanswered: dict[int, list[str]] = {}  # request id -> texts, in id order
        answered: dict[int, Vectors] = {}  # answers that arrived before an earlier one
        next_id = 0
        next_out = 0
        exhausted = False
        failures = 0
        bar = tqdm(total=len(texts) if isinstance(texts, Sized) else None, unit="text", disable=not progress)

        def request(rid: int, batch: list[str]) -> pb.EmbedStreamRequest:
            inner = self._embed_request(batch, model, dimensions, normalize, truncate, prompt_name, prompt)
            return pb.EmbedStreamRequest(id=str(rid), request=inner)

        try:
            while True:
                if exhausted and not unanswered:
                    return
                call = self._stub.EmbedStream(metadata=self._metadata)
                room = asyncio.Event()
                writer_error: list[BaseException] = []

                async def write(
                    call: Any = call, room: asyncio.Event = room, errors: list[BaseException] = writer_error
                ) -> None:
                    nonlocal next_id, exhausted
                    try:
                        for old_id, old_batch in list(unanswered.items()):
                            await call.write(request(old_id, old_batch))
                        while not exhausted:
                            while len(unanswered) >= window:
                                room.clear()
                                await room.wait()
                            batch = next(batches, None)
                            if batch is None:
                                exhausted = True
                                break
                            rid, next_id = next_id, next_id + 1
                            unanswered[rid] = batch  # before writing: a failed write is re-sent
                            await call.write(request(rid, batch))
                        await call.done_writing()
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        pass  # the stream broke; the reader sees its status
                    except Exception as exc:  # the caller's iterable failed: end the stream, re-raise
                        errors.append(exc)
                        call.cancel()

                writer = asyncio.create_task(write())
                try:
                    while True:
                        message = await call.read()
                        if message is grpc.aio.EOF:
                            break
                        assert isinstance(message, pb.EmbedStreamResponse)
                        response = message
                        rid = int(response.id)
                        if rid not in unanswered:
                            continue
                        if response.HasField("error"):
                            raise from_status_number(response.error.code, response.error.message)
                        answered[rid] = _decode(response.response)
                        del unanswered[rid]
                        room.set()
                        failures = 0
                        while next_out in answered:
                            vectors = answered.pop(next_out)
                            next_out += 1
                            bar.update(len(vectors))
                            for vector in vectors:
                                yield vector
                    if writer_error:
                        raise writer_error[0]
                    if not unanswered and exhausted:
                        return
                    failure = grpc.StatusCode.UNAVAILABLE, "the stream ended with requests unanswered"
                except grpc.aio.AioRpcError as error:
                    if writer_error:
                        raise writer_error[0] from None
                    if error.code() not in _TRANSIENT:
                        raise from_rpc_error(error) from None
                    failure = error.code(), error.details() or ""
                finally:
                    writer.cancel()
                    call.cancel()
                failures += 1
                if failures > max_retries:
                    raise error_for(failure[0], f"{failure[1]} (gave up after {max_retries} retries)")
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
        finally:
            bar.close()
