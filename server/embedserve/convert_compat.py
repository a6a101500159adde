"""Protobuf <-> domain conversion for CompatService (compat_service.proto): the Cohere and TEI
shapes. Vectors are encoded by convert's functions, as for every other REST message."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import struct_pb2

from embedserve import __version__, convert
from embedserve.engine import types as domain
from embedserve.errors import InvalidInputError, quoted
from embedserve.kinds import ModelKind
from embedserve.settings import Settings
from embedserve.v1 import compat_service_pb2 as compat

# --- Cohere ----------------------------------------------------------------------------------

EMBEDDING_TYPES = ("float", "base64")
# The model prompts a Cohere input_type selects, first found wins: its own name (nomic-embed's
# prompts are named search_query, search_document, ...), then sentence-transformers' usual ones.
_INPUT_TYPE_PROMPTS = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
_TRUNCATE = {"": True, "END": True, "NONE": False}

CohereEmbedRequests = compat.CohereEmbedRequest | compat.CohereEmbedV1Request


def cohere_prompt_name(input_type: str, prompts: Mapping[str, str]) -> str:
    """The model prompt that Cohere's input_type stands for, "" (the model's default) when the
    model has none of that name; an input_type Cohere does not define is refused."""
    if not input_type:
        return ""
    names = _INPUT_TYPE_PROMPTS.get(input_type)
    if names is None:
        raise InvalidInputError(f"input_type must be one of {', '.join(_INPUT_TYPE_PROMPTS)}, got {quoted(input_type)}")
    return next((name for name in names if name in prompts), "")


def _cohere_truncate(value: str) -> bool:
    truncate = _TRUNCATE.get(value.upper())
    if truncate is None:
        raise InvalidInputError(
            f"truncate must be 'END' (cut long inputs at the end) or 'NONE' (refuse them), got {quoted(value)}"
        )
    return truncate


def cohere_embedding_types(requested: Sequence[str]) -> tuple[str, ...]:
    """The embedding types to answer, checked before any work is done ("float" by default)."""
    for name in requested:
        if name not in EMBEDDING_TYPES:
            raise InvalidInputError(
                f"embedding_types may hold 'float' and 'base64' (int8, uint8, binary and ubinary are not "
                f"supported), got {quoted(name)}"
            )
    return tuple(dict.fromkeys(requested)) or ("float",)


def cohere_embed_params(request: CohereEmbedRequests, prompts: Mapping[str, str]) -> domain.EmbedParams:
    """Reads a Cohere embed request; `prompts` are the model's, where input_type finds its prompt."""
    dimensions = None  # v1 has no output_dimension
    if isinstance(request, compat.CohereEmbedRequest) and request.HasField("output_dimension"):
        dimensions = request.output_dimension
    return domain.EmbedParams(
        inputs=list(request.texts),
        model=request.model,
        dimensions=dimensions,
        truncate=_cohere_truncate(request.truncate),
        prompt_name=cohere_prompt_name(request.input_type, prompts),
    )


def cohere_meta(usage: domain.Usage, version: str) -> compat.CohereMeta:
    """Cohere's `meta`: the API version and the tokens the model read."""
    return compat.CohereMeta(
        api_version=compat.CohereApiVersion(version=version),
        billed_units=compat.CohereBilledUnits(input_tokens=usage.total_tokens),
        tokens=compat.CohereTokens(input_tokens=usage.total_tokens),
    )


def cohere_embeddings(result: domain.EmbedResult, types: Sequence[str]) -> compat.CohereEmbeddings:
    """The vectors under each requested embedding type."""
    embeddings = compat.CohereEmbeddings()
    if "float" in types:
        embeddings.float.extend(convert.number_lists(result.vectors))
    if "base64" in types:
        embeddings.base64.extend(convert.base64_rows(result.vectors))
    return embeddings


def cohere_embed_response(
    result: domain.EmbedResult, request: compat.CohereEmbedRequest, types: Sequence[str], request_id: str
) -> compat.CohereEmbedResponse:
    """Cohere's v2 embed response."""
    return compat.CohereEmbedResponse(
        id=request_id,
        response_type="embeddings_by_type",
        embeddings=cohere_embeddings(result, types),
        texts=request.texts,
        meta=cohere_meta(result.usage, "2"),
    )


def cohere_v1_embed_response(
    result: domain.EmbedResult, request: compat.CohereEmbedV1Request, types: Sequence[str], request_id: str
) -> compat.CohereEmbedV1Response:
    """Cohere's v1 embed response: vectors as an array without embedding_types, else by type."""
    embeddings = struct_pb2.Value()
    if request.embedding_types:
        by_type = cohere_embeddings(result, types)
        fields = embeddings.struct_value.fields
        if "float" in types:
            fields["float"].list_value.values.extend(by_type.float)
        if "base64" in types:
            fields["base64"].list_value.values.extend(struct_pb2.Value(string_value=s) for s in by_type.base64)
    else:
        embeddings.list_value.values.extend(convert.number_lists(result.vectors))
    return compat.CohereEmbedV1Response(
        id=request_id,
        response_type="embeddings_by_type" if request.embedding_types else "embeddings_floats",
        embeddings=embeddings,
        texts=request.texts,
        meta=cohere_meta(result.usage, "1"),
    )


def cohere_rerank_params(request: compat.CohereRerankRequest) -> domain.RerankParams:
    """Reads a Cohere rerank request (scores in [0, 1], long pairs cut on the document side)."""
    return domain.RerankParams(
        query=request.query,
        documents=list(request.documents),
        model=request.model,
        top_n=request.top_n if request.HasField("top_n") else None,
        return_documents=request.return_documents,
    )


def cohere_rerank_response(
    result: domain.RerankResult, return_documents: bool, request_id: str
) -> compat.CohereRerankResponse:
    """Ranked documents; `document` is present only when asked for."""
    return compat.CohereRerankResponse(
        id=request_id,
        results=[
            compat.CohereRerankResult(
                index=r.index,
                relevance_score=r.score,
                document=compat.CohereRerankDocument(text=r.document) if return_documents else None,
            )
            for r in result.results
        ],
        meta=cohere_meta(result.usage, "2"),
    )


# --- Hugging Face text-embeddings-inference --------------------------------------------------


def tei_embed_params(request: compat.TeiEmbedRequest) -> domain.EmbedParams:
    """Reads a TEI embed request (`inputs`: a string or an array of strings)."""
    return domain.EmbedParams(
        inputs=convert.texts(request.inputs, "inputs"),
        model=request.model,
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        normalize=request.normalize if request.HasField("normalize") else None,
        truncate=request.truncate if request.HasField("truncate") else True,
        prompt_name=request.prompt_name,
    )


def _json_body(value: object) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(
        content_type="application/json", data=json.dumps(value, separators=(",", ":")).encode()
    )


def tei_embed_response(result: domain.EmbedResult) -> compat.TeiEmbedResponse:
    """One array of numbers per input, each float32 as its shortest decimal."""
    return compat.TeiEmbedResponse(
        body=_json_body(convert.shortest_doubles(result.vectors).tolist()),
        usage=convert.usage(result.usage),
        timing=convert.timing(result.timing),
    )


def tei_sparse_params(request: compat.TeiEmbedSparseRequest) -> domain.SparseParams:
    """Reads a TEI embed_sparse request."""
    return domain.SparseParams(
        inputs=convert.texts(request.inputs, "inputs"),
        model=request.model,
        truncate=request.truncate if request.HasField("truncate") else True,
    )


def tei_sparse_response(result: domain.SparseResult) -> compat.TeiEmbedSparseResponse:
    """Per input, its {"index", "value"} pairs, ids ascending."""
    vectors = [
        [
            {"index": index, "value": value}
            for index, value in zip(v.indices.tolist(), convert.shortest_doubles(v.values).tolist(), strict=True)
        ]
        for v in result.vectors
    ]
    return compat.TeiEmbedSparseResponse(
        body=_json_body(vectors), usage=convert.usage(result.usage), timing=convert.timing(result.timing)
    )


def tei_info(model: domain.ModelDescription, settings: Settings) -> compat.TeiInfoResponse:
    """TEI's /info for one served model and this server's limits."""
    pooling = {ModelKind.DENSE: model.pooling, ModelKind.SPARSE: "splade"}.get(model.kind)
    return compat.TeiInfoResponse(
        model_id=model.id,
        model_dtype=model.dtype,
        model_type=compat.TeiModelType(
            embedding=None if pooling is None else compat.TeiEmbeddingModel(pooling=pooling)
        ),
        max_concurrent_requests=settings.max_concurrency,
        max_input_length=model.max_input_tokens,
        max_batch_tokens=model.max_batch_tokens,
        max_batch_requests=model.max_batch_size,
        max_client_batch_size=settings.max_inputs_per_request,
        auto_truncate=True,
        prompts=model.prompts,
        version=__version__,
    )
