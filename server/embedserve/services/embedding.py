"""embedserve.v1.EmbeddingService."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from embedserve import convert
from embedserve.engine.engine import Engine
from embedserve.errors import EmbedServeError, status_for
from embedserve.services.rpc import deadline, unary
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class EmbeddingService(pb_grpc.EmbeddingServiceServicer):
    """Serves every RPC of embedserve.v1.EmbeddingService from one Engine."""

    def __init__(self, engine: Engine, stream_window: int) -> None:
        self._engine = engine
        self._stream_window = stream_window

    @unary
    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[pb.EmbedRequest, pb.EmbedResponse]
    ) -> pb.EmbedResponse:
        result = await self._engine.embed(convert.embed_params(request), deadline=deadline(context))
        return convert.embed_response(result, request.encoding)

    async def EmbedStream(
        self,
        request_iterator: AsyncIterator[pb.EmbedStreamRequest],
        context: grpc.aio.ServicerContext[pb.EmbedStreamRequest, pb.EmbedStreamResponse],
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        # At most `stream_window` requests are read and not yet answered; the reader stops
        # reading until a response has been written, so HTTP/2 flow control slows the sender.
        window = asyncio.Semaphore(self._stream_window)
        done: asyncio.Queue[pb.EmbedStreamResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(message: pb.EmbedStreamRequest) -> None:
            try:
                result = await self._engine.embed(
                    convert.embed_params(message.request), deadline=deadline(context), wait=True
                )
                done.put_nowait(
                    pb.EmbedStreamResponse(
                        id=message.id, response=convert.embed_response(result, message.request.encoding)
                    )
                )
            except EmbedServeError as exc:
                done.put_nowait(convert.stream_error(message.id, *status_for(exc)))
            except Exception as exc:
                log.exception("bug in EmbedStream")
                done.put_nowait(convert.stream_error(message.id, *status_for(exc)))

        async def read() -> None:
            try:
                async for message in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(answer(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                done.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await done.get()) is not None:
                yield response
                window.release()
            await reader  # re-raises a failed read (e.g. the client broke the stream)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @unary
    async def SparseEmbed(
        self,
        request: pb.SparseEmbedRequest,
        context: grpc.aio.ServicerContext[pb.SparseEmbedRequest, pb.SparseEmbedResponse],
    ) -> pb.SparseEmbedResponse:
        result = await self._engine.sparse_embed(convert.sparse_params(request), deadline=deadline(context))
        return convert.sparse_response(result)

    @unary
    async def Rerank(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext[pb.RerankRequest, pb.RerankResponse]
    ) -> pb.RerankResponse:
        result = await self._engine.rerank(convert.rerank_params(request), deadline=deadline(context))
        return convert.rerank_response(result)

    @unary
    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in self._engine.describe()])
