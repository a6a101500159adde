"""Protobuf <-> domain conversion; the one place vectors are encoded for the wire."""

from __future__ import annotations

import grpc

from embedserve.engine.types import (
    EmbedParams,
    EmbedResult,
    Kind,
    ModelDescription,
    RerankParams,
    RerankResult,
    SparseParams,
    SparseResult,
    Timing,
    Usage,
)
from embedserve.v1 import embedding_service_pb2 as pb

_KINDS = {Kind.DENSE: pb.MODEL_KIND_DENSE, Kind.SPARSE: pb.MODEL_KIND_SPARSE, Kind.RERANK: pb.MODEL_KIND_RERANK}


def embed_params(request: pb.EmbedRequest) -> EmbedParams:
    """Reads an EmbedRequest into domain parameters (validation happens in the engine)."""
    return EmbedParams(
        inputs=list(request.inputs),
        model=request.model,
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        normalize=request.normalize if request.HasField("normalize") else None,
        truncate=request.truncate if request.HasField("truncate") else True,
        prompt_name=request.prompt_name,
        prompt=request.prompt if request.HasField("prompt") else None,
    )


def sparse_params(request: pb.SparseEmbedRequest) -> SparseParams:
    """Reads a SparseEmbedRequest into domain parameters."""
    return SparseParams(
        inputs=list(request.inputs),
        model=request.model,
        truncate=request.truncate if request.HasField("truncate") else True,
        top_k=request.top_k if request.HasField("top_k") else None,
        min_weight=request.min_weight if request.HasField("min_weight") else None,
        return_tokens=request.return_tokens,
    )


def rerank_params(request: pb.RerankRequest) -> RerankParams:
    """Reads a RerankRequest into domain parameters."""
    return RerankParams(
        query=request.query,
        documents=list(request.documents),
        model=request.model,
        top_n=request.top_n if request.HasField("top_n") else None,
        return_documents=request.return_documents,
        raw_scores=request.raw_scores,
        truncate=request.truncate if request.HasField("truncate") else True,
    )


def usage(value: Usage) -> pb.Usage:
    """Usage as sent on the wire."""
    return pb.Usage(
        prompt_tokens=value.prompt_tokens, total_tokens=value.total_tokens, truncated_inputs=value.truncated_inputs
    )


def timing(value: Timing) -> pb.Timing:
    """Timing as sent on the wire."""
    return pb.Timing(
        queue_ms=value.queue_ms, tokenize_ms=value.tokenize_ms, inference_ms=value.inference_ms, total_ms=value.total_ms
    )


def embed_response(result: EmbedResult, encoding: int) -> pb.EmbedResponse:
    """Encodes vectors as raw little-endian float32 bytes (default) or packed floats."""
    vectors = result.vectors.astype("<f4", copy=False)
    if encoding == pb.VECTOR_ENCODING_FLOAT:
        embeddings = [pb.Embedding(index=i, values=row.tolist()) for i, row in enumerate(vectors)]
    else:
        embeddings = [pb.Embedding(index=i, float32_le=row.tobytes()) for i, row in enumerate(vectors)]
    return pb.EmbedResponse(
        embeddings=embeddings,
        model=result.model,
        dimension=int(vectors.shape[1]),
        usage=usage(result.usage),
        timing=timing(result.timing),
    )


def sparse_response(result: SparseResult) -> pb.SparseEmbedResponse:
    """Sparse vectors as indices (ascending) and values."""
    return pb.SparseEmbedResponse(
        embeddings=[
            pb.SparseEmbedding(index=i, indices=v.indices.tolist(), values=v.values.tolist(), tokens=v.tokens)
            for i, v in enumerate(result.vectors)
        ],
        model=result.model,
        usage=usage(result.usage),
        timing=timing(result.timing),
    )


def rerank_response(result: RerankResult) -> pb.RerankResponse:
    """Ranked documents, highest score first."""
    return pb.RerankResponse(
        results=[pb.RerankResult(index=r.index, relevance_score=r.score, document=r.document) for r in result.results],
        model=result.model,
        usage=usage(result.usage),
        timing=timing(result.timing),
    )


def model_info(model: ModelDescription) -> pb.ModelInfo:
    """ListModels entry for one model."""
    return pb.ModelInfo(
        id=model.id,
        kind=_KINDS[model.kind],
        capabilities=list(model.capabilities),
        dimension=model.dimension,
        vocab_size=model.vocab_size,
        max_input_tokens=model.max_input_tokens,
        backend=model.backend,
        execution_provider=model.provider,
        dtype=model.dtype,
        prompts=model.prompts,
        default_prompt_name=model.default_prompt_name,
        normalize=model.normalize,
        max_batch_size=model.max_batch_size,
    )


def stream_error(request_id: str, code: grpc.StatusCode, message: str) -> pb.EmbedStreamResponse:
    """The in-band answer for one failed request on an EmbedStream."""
    return pb.EmbedStreamResponse(id=request_id, error=pb.Error(code=code.value[0], status=code.name, message=message))
