"""embedserve.v1.CompatService: the Cohere and TEI REST shapes that Envoy transcodes onto."""

from __future__ import annotations

from embedserve import convert, convert_compat
from embedserve.engine.engine import Engine
from embedserve.engine.types import EmbedResult
from embedserve.kinds import Capability
from embedserve.services.rpc import Context, call, request_id, unary
from embedserve.v1 import compat_service_pb2 as compat
from embedserve.v1 import compat_service_pb2_grpc as compat_grpc


class CompatService(compat_grpc.CompatServiceServicer):
    """Serves other servers' REST shapes from the same Engine (models, batches, limits) as
    EmbeddingService and OpenAIService; errors name the REST routes, as OpenAIService's do."""

    words = staticmethod(convert.route_words)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.slow_request_s = engine.settings.slow_request_seconds

    async def _cohere_embed(
        self, request: convert_compat.CohereEmbedRequests, context: Context
    ) -> tuple[EmbedResult, tuple[str, ...]]:
        types = convert_compat.cohere_embedding_types(request.embedding_types)
        # The model first: its prompts say what input_type selects (and an unknown model is
        # NOT_FOUND, as the embedding itself would be).
        model = self._engine.describe_model(request.model, Capability.EMBED)
        params = convert_compat.cohere_embed_params(request, model.prompts)
        return await self._engine.embed(params, call(context)), types

    @unary
    async def CohereEmbed(self, request: compat.CohereEmbedRequest, context: Context) -> compat.CohereEmbedResponse:
        result, types = await self._cohere_embed(request, context)
        return convert_compat.cohere_embed_response(result, request, types, request_id(context))

    @unary
    async def CohereEmbedV1(
        self, request: compat.CohereEmbedV1Request, context: Context
    ) -> compat.CohereEmbedV1Response:
        result, types = await self._cohere_embed(request, context)
        return convert_compat.cohere_v1_embed_response(result, request, types, request_id(context))

    @unary
    async def CohereRerank(self, request: compat.CohereRerankRequest, context: Context) -> compat.CohereRerankResponse:
        result = await self._engine.rerank(convert_compat.cohere_rerank_params(request), call(context))
        return convert_compat.cohere_rerank_response(result, request.return_documents, request_id(context))

    @unary
    async def TeiEmbed(self, request: compat.TeiEmbedRequest, context: Context) -> compat.TeiEmbedResponse:
        result = await self._engine.embed(convert_compat.tei_embed_params(request), call(context))
        return convert_compat.tei_embed_response(result)

    @unary
    async def TeiEmbedSparse(
        self, request: compat.TeiEmbedSparseRequest, context: Context
    ) -> compat.TeiEmbedSparseResponse:
        result = await self._engine.sparse_embed(convert_compat.tei_sparse_params(request), call(context))
        return convert_compat.tei_sparse_response(result)

    @unary
    async def TeiInfo(self, request: compat.TeiInfoRequest, context: Context) -> compat.TeiInfoResponse:
        model = self._engine.describe_model(request.model, None if request.model else Capability.EMBED)
        return convert_compat.tei_info(model, self._engine.settings)
