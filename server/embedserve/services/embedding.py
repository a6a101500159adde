"""embedserve.v1.EmbeddingService."""

from __future__ import annotations

from collections.abc import AsyncIterator

from embedserve import convert
from embedserve.engine.engine import Engine
from embedserve.engine.types import EmbedParams
from embedserve.errors import EmbedServeError
from embedserve.services.rpc import REQUEST_ID_HEADER, Context, call, request_id, status, unary
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc


class EmbeddingService(pb_grpc.EmbeddingServiceServicer):
    """Serves every RPC of embedserve.v1.EmbeddingService from one Engine."""

    words = staticmethod(convert.rpc_words)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.slow_request_s = engine.settings.slow_request_seconds

    @unary
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        result = await self._engine.embed(convert.embed_params(request), call(context))
        return convert.embed_response(result, request.encoding)

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        async def requests() -> AsyncIterator[tuple[pb.EmbedStreamRequest, EmbedParams]]:
            async for message in request_iterator:
                yield message, convert.embed_params(message.request)

        rid = request_id(context)
        echoed = ((REQUEST_ID_HEADER, rid),)
        context.set_trailing_metadata(echoed)
        try:
            caller = call(context)
        except EmbedServeError as exc:  # a malformed priority header: the stream never starts
            await context.abort(*status(exc, "EmbedStream", self.words, rid), trailing_metadata=echoed)
        try:
            async for message, outcome in self._engine.embed_stream(requests(), caller):
                if isinstance(outcome, Exception):
                    yield convert.stream_error(message.id, *status(outcome, "EmbedStream", self.words, rid))
                else:
                    response = convert.embed_response(outcome, message.request.encoding)
                    yield pb.EmbedStreamResponse(id=message.id, response=response)
        except EmbedServeError as exc:  # the stream as a whole ends (idle, or a message that did not decode)
            await context.abort(*status(exc, "EmbedStream", self.words, rid), trailing_metadata=echoed)

    @unary
    async def SparseEmbed(self, request: pb.SparseEmbedRequest, context: Context) -> pb.SparseEmbedResponse:
        result = await self._engine.sparse_embed(convert.sparse_params(request), call(context))
        return convert.sparse_response(result)

    @unary
    async def Rerank(self, request: pb.RerankRequest, context: Context) -> pb.RerankResponse:
        result = await self._engine.rerank(convert.rerank_params(request), call(context))
        return convert.rerank_response(result)

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in self._engine.describe()])
