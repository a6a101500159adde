"""API keys over REST (Authorization header -> 401) and gRPC through Envoy; overload -> 429."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import KEYS, Gateway
from tests.texts import fresh_texts


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "requires an API key"),
        ({"authorization": "Bearer wrong-key"}, "API key is not valid"),
        ({"authorization": "Basic abc"}, "not of the form 'Bearer <key>'"),
    ],
)
def test_rest_without_a_valid_key_is_401_with_what_to_send(
    strict_gateway: Gateway, headers: dict[str, str], says: str
) -> None:
    for path, body in (("/v1/embeddings", {"input": "x"}), ("/v1/rerank", {"query": "q", "documents": ["d"]})):
        response = httpx.post(strict_gateway.base_url + path, json=body, headers=headers, timeout=60)
        assert response.status_code == 401
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "unauthenticated")
        assert says in error["message"] and "Authorization" in error["message"]
    assert httpx.get(strict_gateway.base_url + "/v1/models", headers=headers, timeout=60).status_code == 401


def test_openai_sdk_with_the_right_key_works_and_a_wrong_one_raises(strict_gateway: Gateway) -> None:
    good = openai.OpenAI(base_url=f"{strict_gateway.base_url}/v1", api_key=KEYS[1], max_retries=0)
    assert len(good.embeddings.create(model=DEFAULT_DENSE_MODEL, input="hello").data[0].embedding) == 384
    bad = openai.OpenAI(base_url=f"{strict_gateway.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.embeddings.create(model=DEFAULT_DENSE_MODEL, input="hello")
    assert "API key is not valid" in raised.value.message


def test_grpc_through_envoy_needs_the_key_too(strict_gateway: Gateway) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(strict_gateway.address))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(pb.EmbedRequest(inputs=["x"]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    response = stub.Embed(pb.EmbedRequest(inputs=["x"]), metadata=(("authorization", f"Bearer {KEYS[0]}"),))
    assert len(response.embeddings) == 1


def test_a_full_queue_is_429_over_rest_and_no_request_fails_otherwise(strict_gateway: Gateway) -> None:
    text = " ".join(["queue"] * 100)  # the strict server's queue holds 64 inputs: 64 fresh texts

    def post(_: int) -> httpx.Response:
        return httpx.post(
            strict_gateway.base_url + "/v1/embeddings",
            json={"input": fresh_texts(text, 64), "encoding_format": "base64"},
            headers={"authorization": f"Bearer {KEYS[0]}"},
            timeout=300,
        )

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    statuses = [r.status_code for r in responses]
    assert 429 in statuses and 200 in statuses
    assert set(statuses) <= {200, 429}
    overloaded = next(r for r in responses if r.status_code == 429).json()["error"]
    assert (overloaded["type"], overloaded["code"]) == ("rate_limit_error", "resource_exhausted")
    assert "retry later" in overloaded["message"]
