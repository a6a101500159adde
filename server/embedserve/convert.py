"""Protobuf <-> domain conversion; the one place vectors are encoded for the wire."""

from __future__ import annotations

import grpc

from embedserve.engine.types import EmbedParams, EmbedResult, Kind, ModelDescription, Timing, Usage
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
