"""The Cohere SDK (ClientV2 and the legacy v1 Client) and LiteLLM's `cohere/` provider, unchanged,
against Envoy: /v2/embed, /v2/rerank and /v1/embed, on the same engine as every other route."""

from __future__ import annotations

import base64

import cohere
import httpx
import litellm
import numpy as np
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import RunningServer
from tests.e2e.conftest import Gateway, grpc_vectors

TEXTS = ["The capital of France is Paris.", "Bananas are yellow."]
QUERY = "What is the capital of France?"
DOCUMENTS = ["Bananas are yellow.", "Paris is the capital of France.", "The sky is blue."]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> cohere.ClientV2:
    return cohere.ClientV2(base_url=gateway.base_url, api_key="unused", timeout=120)


def test_v2_embed_returns_float_vectors_equal_to_grpc_with_texts_and_meta(
    client: cohere.ClientV2, server: RunningServer
) -> None:
    response = client.embed(
        model=DEFAULT_DENSE_MODEL, texts=TEXTS, input_type="search_document", embedding_types=["float"]
    )
    assert response.embeddings.float_ is not None
    got = np.array(response.embeddings.float_, dtype=np.float32)
    np.testing.assert_array_equal(got, grpc_vectors(server, TEXTS))
    assert response.texts == TEXTS
    assert response.id  # Envoy's x-request-id
    assert response.meta is not None and response.meta.tokens is not None
    assert response.meta.tokens.input_tokens is not None and response.meta.tokens.input_tokens > len(TEXTS)
    assert response.meta.api_version is not None and response.meta.api_version.version == "2"


def test_v2_embed_base64_and_output_dimension_match_grpc(client: cohere.ClientV2, server: RunningServer) -> None:
    response = client.embed(
        model=DEFAULT_DENSE_MODEL,
        texts=TEXTS,
        input_type="search_query",
        embedding_types=["float", "base64"],
        output_dimension=64,
    )
    expected = grpc_vectors(server, TEXTS, dimensions=64)
    assert response.embeddings.base64 is not None and response.embeddings.float_ is not None
    decoded = np.stack([np.frombuffer(base64.b64decode(b), "<f4") for b in response.embeddings.base64])
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(np.array(response.embeddings.float_, np.float32), expected)


def test_v2_embed_refuses_embedding_types_it_cannot_make_and_unknown_models(client: cohere.ClientV2) -> None:
    with pytest.raises(cohere.BadRequestError) as raised:
        client.embed(model=DEFAULT_DENSE_MODEL, texts=["x"], input_type="search_query", embedding_types=["int8"])
    assert "int8" in str(raised.value.body)
    with pytest.raises(cohere.NotFoundError) as missing:
        client.embed(model="no/such-model", texts=["x"], input_type="search_query")
    assert "'no/such-model' is not served" in str(missing.value.body)


def test_v2_rerank_ranks_the_relevant_document_first_with_cohere_results(client: cohere.ClientV2) -> None:
    response = client.rerank(model=DEFAULT_DENSE_MODEL, query=QUERY, documents=DOCUMENTS, top_n=2)
    assert response.results[0].index == 1
    assert len(response.results) == 2
    assert response.results[0].relevance_score > response.results[1].relevance_score
    assert response.id
    assert response.meta is not None and response.meta.tokens is not None
    assert response.meta.tokens.input_tokens is not None and response.meta.tokens.input_tokens > 0


def test_v1_embed_answers_embeddings_floats_without_types_and_by_type_with_them(
    gateway: Gateway, server: RunningServer
) -> None:
    legacy = cohere.Client(base_url=gateway.base_url, api_key="unused", timeout=120)
    floats = legacy.embed(texts=TEXTS, model=DEFAULT_DENSE_MODEL, input_type="search_document")
    assert floats.response_type == "embeddings_floats"
    np.testing.assert_array_equal(np.array(floats.embeddings, np.float32), grpc_vectors(server, TEXTS))
    by_type = legacy.embed(
        texts=TEXTS, model=DEFAULT_DENSE_MODEL, input_type="search_document", embedding_types=["float"]
    )
    assert by_type.response_type == "embeddings_by_type"
    assert by_type.embeddings.float_ is not None
    np.testing.assert_array_equal(np.array(by_type.embeddings.float_, np.float32), grpc_vectors(server, TEXTS))


def test_cohere_truncate_none_refuses_a_long_input_and_end_cuts_it(gateway: Gateway) -> None:
    long_text = " ".join(["word"] * 1000)
    body = {"model": DEFAULT_DENSE_MODEL, "texts": [long_text], "input_type": "search_document"}
    refused = httpx.post(f"{gateway.base_url}/v2/embed", json={**body, "truncate": "NONE"}, timeout=120)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_argument"
    cut = httpx.post(f"{gateway.base_url}/v2/embed", json={**body, "truncate": "END"}, timeout=120)
    assert cut.status_code == 200
    assert len(cut.json()["embeddings"]["float"][0]) == 384


def test_litellm_cohere_provider_embeds_and_reranks(gateway: Gateway, server: RunningServer) -> None:
    embedded = litellm.embedding(
        model=f"cohere/{DEFAULT_DENSE_MODEL}", input=TEXTS, api_base=f"{gateway.base_url}/v2/embed", api_key="unused"
    )
    got = np.array([d["embedding"] for d in embedded.data], dtype=np.float32)
    np.testing.assert_array_equal(got, grpc_vectors(server, TEXTS))
    assert embedded.usage is not None and embedded.usage.prompt_tokens > len(TEXTS)  # from meta.billed_units
    ranked = litellm.rerank(
        model=f"cohere/{DEFAULT_DENSE_MODEL}",
        query=QUERY,
        documents=DOCUMENTS,
        api_base=gateway.base_url,
        api_key="unused",
        return_documents=True,
    )
    assert ranked.results is not None
    assert ranked.results[0]["index"] == 1
    assert ranked.results[0]["document"]["text"] == DOCUMENTS[1]
