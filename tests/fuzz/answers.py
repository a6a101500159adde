"""What a successful answer to a fuzzed native request must hold: one result per input, in
order, shaped as the request asked, with finite numbers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf.message import Message

from embedserve.v1 import embedding_service_pb2 as pb

DENSE_DIMENSION = 384  # sentence-transformers/all-MiniLM-L6-v2, the default dense model


def check_embed(request: pb.EmbedRequest, response: pb.EmbedResponse) -> None:
    """One vector per input, of the requested dimension, in the requested encoding."""
    dimension = request.dimensions if request.HasField("dimensions") else DENSE_DIMENSION
    assert response.dimension == dimension
    assert [e.index for e in response.embeddings] == list(range(len(request.inputs)))
    for embedding in response.embeddings:
        if request.encoding == pb.VECTOR_ENCODING_FLOAT:
            assert not embedding.float32_le and len(embedding.values) == dimension
            values = np.array(embedding.values, np.float32)
        else:
            assert not embedding.values and len(embedding.float32_le) == 4 * dimension
            values = np.frombuffer(embedding.float32_le, "<f4")
        assert np.isfinite(values).all(), values
    assert response.usage.prompt_tokens >= 2 * len(request.inputs)  # [CLS] and [SEP] at least


def check_sparse(request: pb.SparseEmbedRequest, response: pb.SparseEmbedResponse) -> None:
    """One sparse vector per input: ascending ids, positive weights above min_weight, at most
    top_k terms, tokens only when asked for."""
    assert [e.index for e in response.embeddings] == list(range(len(request.inputs)))
    for embedding in response.embeddings:
        indices, values = list(embedding.indices), list(embedding.values)
        assert indices == sorted(set(indices)) and len(values) == len(indices)
        assert all(v > 0 and math.isfinite(v) for v in values), values
        if request.HasField("min_weight"):
            assert all(v > request.min_weight for v in values)
        if request.HasField("top_k"):
            assert len(indices) <= request.top_k
        assert len(embedding.tokens) == (len(indices) if request.return_tokens else 0)


def check_rerank(request: pb.RerankRequest, response: pb.RerankResponse) -> None:
    """Every document (or the top_n best) once, highest score first, with its text when asked."""
    documents = len(request.documents)
    expected = min(request.top_n, documents) if request.HasField("top_n") else documents
    indices = [r.index for r in response.results]
    assert len(indices) == expected and len(set(indices)) == expected
    assert all(0 <= i < documents for i in indices)
    scores = [r.relevance_score for r in response.results]
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True), scores
    for result in response.results:
        assert result.document == (request.documents[result.index] if request.return_documents else "")


def check_models(response: pb.ListModelsResponse) -> None:
    """Some models, each once."""
    ids = [m.id for m in response.models]
    assert ids and len(ids) == len(set(ids))


def _check_models(_: pb.ListModelsRequest, response: pb.ListModelsResponse) -> None:
    check_models(response)


# Each unary RPC's request and response types, and the check of an answer to a request.
UNARY: dict[str, tuple[type[Message], type[Message], Callable[[Any, Any], None]]] = {
    "Embed": (pb.EmbedRequest, pb.EmbedResponse, check_embed),
    "SparseEmbed": (pb.SparseEmbedRequest, pb.SparseEmbedResponse, check_sparse),
    "Rerank": (pb.RerankRequest, pb.RerankResponse, check_rerank),
    "ListModels": (pb.ListModelsRequest, pb.ListModelsResponse, _check_models),
}
