"""The async client: one grpc.aio channel, typed results, typed errors."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, overload

import grpc
import numpy as np
import numpy.typing as npt

from embedserve_client._bulk import BulkEmbed, OnInvalid, Skipped
from embedserve_client._pb.embedserve.v1 import embedding_service_pb2 as pb
from embedserve_client._pb.embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from embedserve_client._vectors import Vectors, decode
from embedserve_client.errors import from_rpc_error

# The server's default MAX_MESSAGE_BYTES (this distribution cannot import the server's settings).
_MAX_MESSAGE_BYTES = 64 << 20
# gRPC's load-balancing policies that need no configuration beyond their name.
LoadBalancing = Literal["pick_first", "round_robin"]
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


class AsyncClient:
    """An async embedserve client. Use `async with AsyncClient(...) as client:` or call `close()`.

    `target` is any gRPC target: "host:port", or several servers, such as
    "ipv4:10.0.0.1:50051,10.0.0.2:50051" or "dns:///embedserve-headless:50051" (every address the
    name resolves to). gRPC's default `load_balancing`, "pick_first", sends every call to the
    first server that answers; "round_robin" spreads calls, and so bulk_embed's streams, over all
    of them, and a call made after one is gone goes to the others.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        load_balancing: LoadBalancing = "pick_first",
    ) -> None:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ]
        if load_balancing != "pick_first":  # gRPC's default: left unset, as without the option
            options.append(("grpc.lb_policy_name", load_balancing))
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
        return decode(response)

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

    @overload
    def bulk_embed(
        self,
        texts: Iterable[str],
        *,
        batch_size: int = 64,
        window: int = 16,
        streams: int = 1,
        progress: bool = False,
        max_retries: int = 8,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        prompt_name: str = "",
        prompt: str | None = None,
        on_invalid: Literal["raise"] = "raise",
        skipped: Skipped | None = None,
    ) -> AsyncIterator[Vectors]: ...

    @overload
    def bulk_embed(
        self,
        texts: Iterable[str],
        *,
        batch_size: int = 64,
        window: int = 16,
        streams: int = 1,
        progress: bool = False,
        max_retries: int = 8,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        prompt_name: str = "",
        prompt: str | None = None,
        on_invalid: OnInvalid,
        skipped: Skipped | None = None,
    ) -> AsyncIterator[Vectors | None]: ...

    def bulk_embed(
        self,
        texts: Iterable[str],
        *,
        batch_size: int = 64,
        window: int = 16,
        streams: int = 1,
        progress: bool = False,
        max_retries: int = 8,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        prompt_name: str = "",
        prompt: str | None = None,
        on_invalid: OnInvalid = "raise",
        skipped: Skipped | None = None,
    ) -> AsyncIterator[Vectors | None]:
        """Yields one vector per text, in input order, streaming any iterable through EmbedStream.

        `streams` EmbedStream calls run at once, taking batches of `batch_size` texts from one
        queue; each stream is a call of its own, so Envoy (or the client's round_robin
        `load_balancing` over several addresses) spreads them over replicas. At most `window`
        requests are unanswered on each stream, and at most `streams * window` batches are held
        at a time besides the one being yielded, counting those answered before an earlier one
        and waiting for it: a slow stream (or a slow consumer) holds the others back rather than
        letting them run ahead, so memory stays within `(streams * window + 1) * batch_size`
        vectors however the answers arrive.

        A transient failure of a stream (UNAVAILABLE, RESOURCE_EXHAUSTED, a broken stream, even
        one grpc-core reports as INTERNAL) puts its unanswered batches back at the front of the
        queue, to be sent again by whichever stream is free first, and re-opens it, up to
        `max_retries` times in a row for that stream (no answer on it in between), 0.2 s apart
        doubling up to 5 s (the default 8: ~21 s, enough for a server restarted in 10 s). A
        stream that fails more often gives up and leaves its share to the others; the run raises
        only once every stream has given up. Each batch is answered once: no text is lost or
        repeated.

        An input the server rejects (empty, over the model's max tokens with truncate=False) or
        that protobuf cannot send (not a str) is an InvalidArgumentError whose `index` is its
        0-based position in `texts` and whose message starts "input <index>". With
        on_invalid="raise" (the default) the first such input raises, after the vectors of every
        input before it were yielded. With on_invalid="skip" it yields None in that input's place,
        so the n-th value yielded always belongs to the n-th text, and appends `(index, error)` to
        `skipped`, when given, before yielding that None; the progress bar counts them. Any other
        in-band error (an unknown model, bad dimensions) raises its typed exception at once.
        """
        build = functools.partial(
            self._embed_request,
            model=model,
            dimensions=dimensions,
            normalize=normalize,
            truncate=truncate,
            prompt_name=prompt_name,
            prompt=prompt,
        )
        job = BulkEmbed(
            self._stub,
            self._metadata,
            build,
            texts,
            batch_size=batch_size,
            window=window,
            streams=streams,
            progress=progress,
            max_retries=max_retries,
            on_invalid=on_invalid,
            skipped=skipped,
        )
        return job.run()
