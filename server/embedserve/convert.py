"""Protobuf <-> domain conversion; the one place vectors are encoded for the wire.

Native messages (embedding_service.proto) carry vectors as float32 bytes or packed floats;
the OpenAI-shaped REST messages (openai_service.proto) as JSON numbers or base64 strings.
"""

from __future__ import annotations

import base64
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from embedserve.engine import types as domain
from embedserve.errors import InvalidInputError, quoted
from embedserve.kinds import Capability, ModelKind
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import openai_service_pb2 as rest

_KINDS = {
    ModelKind.DENSE: pb.MODEL_KIND_DENSE,
    ModelKind.SPARSE: pb.MODEL_KIND_SPARSE,
    ModelKind.RERANK: pb.MODEL_KIND_RERANK,
}

# The engine's capabilities in each service's words: the RPCs of EmbeddingService and the REST
# routes of OpenAIService that use them (ListModels capabilities, error messages).
_RPCS = {
    Capability.EMBED: ("Embed", "EmbedStream"),
    Capability.SPARSE_EMBED: ("SparseEmbed",),
    Capability.RERANK: ("Rerank",),
}
_ROUTES = {
    Capability.EMBED: ("embeddings",),
    Capability.SPARSE_EMBED: ("embed_sparse",),
    Capability.RERANK: ("rerank",),
}


def rpc_words(capability: Capability) -> tuple[str, ...]:
    """The EmbeddingService RPCs that use a capability."""
    return _RPCS[capability]


def route_words(capability: Capability) -> tuple[str, ...]:
    """The REST routes that use a capability."""
    return _ROUTES[capability]


# The native and the REST requests name their options alike; only how texts arrive differs
# (a repeated string natively, OpenAI's string-or-array `input` over REST).
EmbedRequests = pb.EmbedRequest | rest.CreateEmbeddingsRequest
SparseRequests = pb.SparseEmbedRequest | rest.CreateSparseEmbeddingsRequest
RerankRequests = pb.RerankRequest | rest.CreateRerankRequest


def _optional(request: Message, field: str) -> Any:
    """The field's value when the caller set it, else None (proto3 `optional` fields)."""
    return getattr(request, field) if request.HasField(field) else None


_PRIORITIES = {pb.PRIORITY_INTERACTIVE: domain.Priority.INTERACTIVE, pb.PRIORITY_BULK: domain.Priority.BULK}


def _priority(request: EmbedRequests | SparseRequests | RerankRequests) -> domain.Priority | None:
    """The lane a native request asks for (REST requests ask with a header, see services.rpc)."""
    if isinstance(request, pb.EmbedRequest | pb.SparseEmbedRequest | pb.RerankRequest):
        return _PRIORITIES.get(request.priority)
    return None


def _inputs(request: EmbedRequests | SparseRequests) -> list[str]:
    if isinstance(request, pb.EmbedRequest | pb.SparseEmbedRequest):
        return list(request.inputs)
    return texts(request.input)


def _dimensions(request: EmbedRequests) -> int | None:
    """The requested vector length; over REST 0 means unset, as Infinity reads it (its client
    always sends `"dimensions": 0`). Natively 0 stays out of range."""
    dimensions: int | None = _optional(request, "dimensions")
    return None if dimensions == 0 and isinstance(request, rest.CreateEmbeddingsRequest) else dimensions


def embed_params(request: EmbedRequests) -> domain.EmbedParams:
    """Reads a dense request into domain parameters (validation happens in the engine)."""
    truncate = _optional(request, "truncate")
    return domain.EmbedParams(
        inputs=_inputs(request),
        model=request.model,
        dimensions=_dimensions(request),
        normalize=_optional(request, "normalize"),
        truncate=True if truncate is None else truncate,
        prompt_name=request.prompt_name,
        prompt=_optional(request, "prompt"),
        priority=_priority(request),
    )


def sparse_params(request: SparseRequests) -> domain.SparseParams:
    """Reads a sparse request into domain parameters."""
    truncate = _optional(request, "truncate")
    return domain.SparseParams(
        inputs=_inputs(request),
        model=request.model,
        truncate=True if truncate is None else truncate,
        top_k=_optional(request, "top_k"),
        min_weight=_optional(request, "min_weight"),
        return_tokens=request.return_tokens,
        priority=_priority(request),
    )


def _top_n(request: RerankRequests) -> int | None:
    """top_n, or over REST the Unified API's name for it, top_k; both, and different, is an error."""
    top_n: int | None = _optional(request, "top_n")
    if not isinstance(request, rest.CreateRerankRequest) or not request.HasField("top_k"):
        return top_n
    if top_n is not None and top_n != request.top_k:
        raise InvalidInputError(f"top_k ({request.top_k}) is another name for top_n ({top_n}): send one of them")
    return request.top_k


def rerank_params(request: RerankRequests) -> domain.RerankParams:
    """Reads a rerank request into domain parameters."""
    truncate = _optional(request, "truncate")
    return domain.RerankParams(
        query=request.query,
        documents=list(request.documents),
        model=request.model,
        top_n=_top_n(request),
        return_documents=request.return_documents,
        raw_scores=request.raw_scores,
        truncate=True if truncate is None else truncate,
        priority=_priority(request),
    )


def usage(value: domain.Usage) -> pb.Usage:
    """domain.Usage as sent on the wire."""
    return pb.Usage(
        prompt_tokens=value.prompt_tokens, total_tokens=value.total_tokens, truncated_inputs=value.truncated_inputs
    )


def timing(value: domain.Timing) -> pb.Timing:
    """domain.Timing as sent on the wire."""
    return pb.Timing(
        queue_ms=value.queue_ms,
        tokenize_ms=value.tokenize_ms,
        inference_ms=value.inference_ms,
        total_ms=value.total_ms,
        cached_inputs=value.cached_inputs,
    )


def embed_response(result: domain.EmbedResult, encoding: int) -> pb.EmbedResponse:
    """Encodes vectors as raw little-endian float32 bytes (default) or packed floats."""
    vectors = result.vectors.astype("<f4", copy=False)
    response = pb.EmbedResponse(
        model=result.model,
        dimension=int(vectors.shape[1]),
        usage=usage(result.usage),
        timing=timing(result.timing),
    )
    # Added in place, from one conversion of all rows: building each Embedding apart and passing
    # the list copies every message once more (2x slower for 32 rows, ~4x for 2,048).
    add = response.embeddings.add
    if encoding == pb.VECTOR_ENCODING_FLOAT:
        for i, values in enumerate(vectors.tolist()):
            add(index=i, values=values)
    else:
        raw, width = vectors.tobytes(), vectors.shape[1] * 4
        for i in range(vectors.shape[0]):
            add(index=i, float32_le=raw[i * width : (i + 1) * width])
    return response


def sparse_response(result: domain.SparseResult) -> pb.SparseEmbedResponse:
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


def rerank_response(result: domain.RerankResult) -> pb.RerankResponse:
    """Ranked documents, highest score first."""
    return pb.RerankResponse(
        results=[pb.RerankResult(index=r.index, relevance_score=r.score, document=r.document) for r in result.results],
        model=result.model,
        usage=usage(result.usage),
        timing=timing(result.timing),
    )


def model_info(model: domain.ModelDescription) -> pb.ModelInfo:
    """ListModels entry for one model."""
    return pb.ModelInfo(
        id=model.id,
        kind=_KINDS[model.kind],
        capabilities=[rpc for c in model.capabilities for rpc in rpc_words(c)],
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


# --- OpenAI-shaped REST messages -------------------------------------------------------------

ENCODING_FORMATS = ("float", "base64")
# One ListValue entry on the wire: field 1 (values, length-delimited) holding a 9-byte Value
# whose field 2 (number_value, fixed64) is the double. Building these bytes with numpy and
# letting protobuf parse them is ~35x faster than appending 2,048 x 1,024 Values one by one.
_LIST_ENTRY = np.dtype([("tag", "u1"), ("size", "u1"), ("number_tag", "u1"), ("number", "<f8")])


_JSON_KINDS = {
    "number_value": "a number",
    "list_value": "an array",
    "struct_value": "an object",
    "bool_value": "a boolean",
    "null_value": "null",
}
# LangChain's OpenAIEmbeddings sends tiktoken ids unless told otherwise; they mean nothing to
# other tokenizers, so they are refused with the switch that makes it send text.
_TOKEN_IDS = (
    " (token ids are not supported: send the text; LangChain's OpenAIEmbeddings sends text with "
    "check_embedding_ctx_length=False)"
)


def texts(value: struct_pb2.Value, field: str = "input") -> list[str]:
    """Reads OpenAI's `input`: a string or an array of strings."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [value.string_value]
    if kind == "list_value":
        items = value.list_value.values
        for i, item in enumerate(items):
            item_kind = item.WhichOneof("kind")
            if item_kind != "string_value":
                hint = _TOKEN_IDS if item_kind in ("number_value", "list_value") else ""
                raise InvalidInputError(
                    f"{field}[{i}] is {_JSON_KINDS.get(item_kind or '', 'empty')}{hint}; "
                    f"{field} must be a string or an array of strings"
                )
        return [item.string_value for item in items]
    if kind is None:
        raise InvalidInputError(f"{field} is required: a string or an array of strings")
    raise InvalidInputError(f"{field} must be a string or an array of strings, not {_JSON_KINDS[kind]}")


def encoding_format(request: rest.CreateEmbeddingsRequest) -> str:
    """The requested encoding_format, checked before any work is done."""
    name = request.encoding_format or "float"
    if name not in ENCODING_FORMATS:
        raise InvalidInputError(f"encoding_format must be 'float' or 'base64', got {quoted(request.encoding_format)}")
    return name


def shortest_doubles(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Each float32 as the double nearest the shortest decimal that gives it back: JSON numbers
    are doubles, and a float32 widened as it is prints with 17 significant digits
    (0.10000000149011612); this one prints as 0.1, and 9 digits at most round-trip any float32.
    Vectorized: round to 6, 7, 8, then 9 significant digits, keep the first that round-trips
    (2,048 x 384 values: ~0.1 s on one core, and 13 bytes a value as JSON instead of 22)."""
    flat = values.reshape(-1)
    out = flat.astype(np.float64)
    todo = np.flatnonzero(np.isfinite(out) & (out != 0))
    exponent = np.floor(np.log10(np.abs(out[todo])))
    # Scaled by an exact power of ten (10**22 at most), the one rounding of the division or the
    # product gives the double nearest the decimal; values past that (under 1e-14 or over 1e22)
    # are few and take the slow way below.
    exact = (exponent >= -14) & (exponent <= 22)
    rest, todo, exponent = todo[~exact], todo[exact], exponent[exact]
    for digits in range(6, 10):
        if not todo.size:
            break
        shift = digits - 1 - exponent
        up, down = 10.0 ** np.maximum(shift, 0), 10.0 ** np.maximum(-shift, 0)
        candidate = np.round(out[todo] * up / down) * down / up
        found = candidate.astype(np.float32) == flat[todo]
        out[todo[found]] = candidate[found]
        todo, exponent = todo[~found], exponent[~found]
    for i in np.concatenate([rest, todo]).tolist():
        out[i] = float(str(flat[i]))  # numpy prints a float32 as its shortest round-trip decimal
    return out.reshape(values.shape)


def _number_lists(vectors: npt.NDArray[np.float32]) -> list[struct_pb2.Value]:
    rows, dim = vectors.shape
    entries = np.empty((rows, dim), dtype=_LIST_ENTRY)
    entries["tag"], entries["size"], entries["number_tag"] = 0x0A, 9, 0x11
    entries["number"] = shortest_doubles(vectors)
    values = []
    for row in entries:
        value = struct_pb2.Value()
        value.list_value.MergeFromString(row.tobytes())
        values.append(value)
    return values


def number_lists(vectors: npt.NDArray[np.float32]) -> list[struct_pb2.Value]:
    """Each vector as a JSON array of numbers (a google.protobuf.Value holding a list)."""
    return _number_lists(vectors.astype("<f4", copy=False))


def base64_rows(vectors: npt.NDArray[np.float32]) -> list[str]:
    """Each vector as base64 of its little-endian float32 bytes."""
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors.astype("<f4", copy=False)]


def rest_embeddings_response(result: domain.EmbedResult, encoding: str) -> rest.CreateEmbeddingsResponse:
    """Vectors as JSON numbers ("float") or base64 of little-endian float32 ("base64")."""
    vectors = result.vectors.astype("<f4", copy=False)
    if encoding == "base64":
        values = [struct_pb2.Value(string_value=text) for text in base64_rows(vectors)]
    else:
        values = _number_lists(vectors)
    return rest.CreateEmbeddingsResponse(
        object="list",
        data=[rest.EmbeddingObject(object="embedding", embedding=v, index=i) for i, v in enumerate(values)],
        model=result.model,
        usage=usage(result.usage),
        timing=timing(result.timing),
    )


def rest_sparse_response(result: domain.SparseResult) -> rest.CreateSparseEmbeddingsResponse:
    """Sparse vectors as OpenAI-style list objects."""
    return rest.CreateSparseEmbeddingsResponse(
        object="list",
        data=[
            rest.SparseEmbeddingObject(
                object="sparse_embedding",
                index=i,
                indices=v.indices.tolist(),
                values=v.values.tolist(),
                tokens=v.tokens,
            )
            for i, v in enumerate(result.vectors)
        ],
        model=result.model,
        usage=usage(result.usage),
        timing=timing(result.timing),
    )


def rest_rerank_response(result: domain.RerankResult, return_documents: bool) -> rest.CreateRerankResponse:
    """Ranked documents; `document` is present only when asked for."""
    return rest.CreateRerankResponse(
        object="rerank",
        results=[
            rest.RerankResultObject(
                index=r.index, relevance_score=r.score, document=r.document if return_documents else None
            )
            for r in result.results
        ],
        model=result.model,
        usage=usage(result.usage),
        timing=timing(result.timing),
    )


def model_object(model: domain.ModelDescription) -> rest.ModelObject:
    """GET /v1/models entry for one model."""
    return rest.ModelObject(
        id=model.id,
        object="model",
        created=model.loaded_at,
        # Infinity's client refuses any other value (its ModelInfoOwnedBy enum has only
        # "infinity"); OpenAI's SDK and LiteLLM read any string.
        owned_by="infinity",
        kind=model.kind.value,
        capabilities=[route for c in model.capabilities for route in route_words(c)],
        dimension=model.dimension,
        max_input_tokens=model.max_input_tokens,
        backend=model.backend,
        execution_provider=model.provider,
        dtype=model.dtype,
        stats=rest.ModelStats(queue_absolute=model.queued, batch_size=model.max_batch_size),
    )
