"""LiteLLM's `infinity/` provider, unchanged, against Envoy (api_base with and without /v1)."""

from __future__ import annotations

import litellm
import numpy as np
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import RunningServer
from tests.e2e.conftest import Gateway, grpc_vectors


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_litellm_rerank_ranks_the_relevant_document_first(gateway: Gateway, suffix: str) -> None:
    documents = ["Bananas are yellow.", "Paris is the capital of France.", "The sky is blue."]
    response = litellm.rerank(
        model=f"infinity/{DEFAULT_DENSE_MODEL}",
        query="What is the capital of France?",
        documents=documents,
        api_base=gateway.base_url + suffix,
        return_documents=True,
    )
    results = response.results
    assert results[0]["index"] == 1
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert results[0]["document"]["text"] == documents[1]
    assert results[0]["relevance_score"] > results[-1]["relevance_score"]


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_litellm_embedding_equals_grpc_vectors(gateway: Gateway, server: RunningServer, suffix: str) -> None:
    texts = ["hello world", "embedding through litellm"]
    response = litellm.embedding(
        model=f"infinity/{DEFAULT_DENSE_MODEL}", input=texts, api_base=gateway.base_url + suffix
    )
    got = np.array([d["embedding"] for d in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, grpc_vectors(server, texts), atol=1e-7)
    assert response.usage is not None and response.usage.prompt_tokens > 0
