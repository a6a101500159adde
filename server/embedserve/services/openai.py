"""embedserve.v1.OpenAIService: the OpenAI-shaped REST API that Envoy transcodes onto."""

from __future__ import annotations

from embedserve import convert
from embedserve.engine.engine import Engine
from embedserve.services.rpc import Context, call, unary
from embedserve.v1 import openai_service_pb2 as rest
from embedserve.v1 import openai_service_pb2_grpc as rest_grpc


class OpenAIService(rest_grpc.OpenAIServiceServicer):
    """Serves the REST shapes from the same Engine (models, batches, limits) as EmbeddingService."""

    words = staticmethod(convert.route_words)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.slow_request_s = engine.settings.slow_request_seconds

    @unary
    async def CreateEmbeddings(
        self, request: rest.CreateEmbeddingsRequest, context: Context
    ) -> rest.CreateEmbeddingsResponse:
        encoding = convert.encoding_format(request)
        result = await self._engine.embed(convert.embed_params(request), call(context))
        return convert.rest_embeddings_response(result, encoding)

    @unary
    async def CreateSparseEmbeddings(
        self, request: rest.CreateSparseEmbeddingsRequest, context: Context
    ) -> rest.CreateSparseEmbeddingsResponse:
        result = await self._engine.sparse_embed(convert.sparse_params(request), call(context))
        return convert.rest_sparse_response(result)

    @unary
    async def CreateRerank(self, request: rest.CreateRerankRequest, context: Context) -> rest.CreateRerankResponse:
        result = await self._engine.rerank(convert.rerank_params(request), call(context))
        return convert.rest_rerank_response(result, request.return_documents)

    @unary
    async def ListModelObjects(
        self, request: rest.ListModelObjectsRequest, context: Context
    ) -> rest.ListModelObjectsResponse:
        return rest.ListModelObjectsResponse(
            object="list", data=[convert.model_object(m) for m in self._engine.describe()]
        )

    @unary
    async def GetModelObject(self, request: rest.GetModelObjectRequest, context: Context) -> rest.ModelObject:
        return convert.model_object(self._engine.describe_model(request.id))
