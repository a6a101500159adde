"""REST error bodies through Envoy (envoy/openai_errors.lua): OpenAI's JSON, valid UTF-8, with
a precise 4xx, whatever the content type; an overload's 429 says when to retry. Native gRPC
through the same port stays untouched, retry-after trailer included."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import KEYS, Gateway

AUTH = {"authorization": f"Bearer {KEYS[0]}"}
GRPC_METADATA = (("authorization", f"Bearer {KEYS[0]}"),)
BODY = b'{"input": "hello"}'
# 64 inputs of ~100 tokens, 12 at once: more than strict_server's queue of 64 inputs can take.
CROWD = [" ".join(["queue"] * 100)] * 64
CONCURRENT = 12


def openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The `error` of an OpenAI error body, checked: `status`, JSON as content type, bytes that
    are valid UTF-8 and parse as JSON, and message, type and `code`."""
    assert response.status_code == status, response.content
    assert response.headers["content-type"] == "application/json"
    text = response.content.decode("utf-8")  # strict: raises on any invalid sequence
    error: dict[str, Any] = json.loads(text)["error"]
    assert set(error) == {"message", "type", "code"} and error["message"], error
    assert error["code"] == code, error
    return error


@pytest.mark.parametrize(
    "content_type", ["application/grpc-web", "application/grpc-web+proto", "application/grpc-web-text"]
)
def test_grpc_web_is_415_with_what_to_send_instead(strict_gateway: Gateway, content_type: str) -> None:
    response = httpx.post(
        strict_gateway.base_url + "/v1/embeddings", content=BODY, headers={"content-type": content_type}, timeout=30
    )
    error = openai_error(response, 415, "unsupported_media_type")
    assert error["type"] == "invalid_request_error"
    assert "gRPC-Web" in error["message"] and content_type in error["message"]
    assert "application/json" in error["message"] and "/embedserve.v1.EmbeddingService/Embed" in error["message"]


@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto", "application/grpc+json"])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("POST", "/nope")])
def test_grpc_content_type_off_the_grpc_method_paths_is_415_not_an_empty_200(
    strict_gateway: Gateway, content_type: str, method: str, path: str
) -> None:
    response = httpx.request(
        method, strict_gateway.base_url + path, content=BODY, headers={"content-type": content_type}, timeout=30
    )
    error = openai_error(response, 415, "unsupported_media_type")
    assert f"content-type {content_type} is for native gRPC calls" in error["message"]
    assert f"not {path}" in error["message"] and "application/json" in error["message"]
    assert not any(name.startswith("grpc-") for name in response.headers)


@pytest.mark.parametrize(
    "body",
    [
        '{"input": "\udcff\udcfe café € 😀"}',  # invalid bytes inside a string
        '{"input": ["ok", \udcff]}',  # an invalid byte where a value should be
        '{"\udcc0\udcaf": "overlong /"}',  # an overlong encoding in a key
        '{"input": "\udced\udca0\udc80 a surrogate"}',  # UTF-8 of a lone surrogate
    ],
)
def test_request_bytes_that_are_not_utf8_give_a_valid_utf8_json_error(strict_gateway: Gateway, body: str) -> None:
    raw = body.encode("utf-8", "surrogateescape")  # \udcXX: the byte XX as it is
    response = httpx.post(
        strict_gateway.base_url + "/v1/embeddings",
        content=raw,
        headers={"content-type": "application/json", **AUTH},
        timeout=30,
    )
    error = openai_error(response, 400, "invalid_argument")
    assert "UTF-8" in error["message"], error
    assert "\ufffd" in error["message"]  # each byte that is not UTF-8 is shown as U+FFFD
    if "café" in body:  # well-formed multi-byte characters are kept as they are
        assert "café € 😀" in error["message"]


def test_a_server_message_with_quotes_backslashes_and_unicode_stays_valid_json(strict_gateway: Gateway) -> None:
    model = 'no "such" \\ model\tcafé 😀'
    response = httpx.post(
        strict_gateway.base_url + "/v1/embeddings", json={"model": model, "input": "x"}, headers=AUTH, timeout=30
    )
    error = openai_error(response, 404, "not_found")
    assert repr(model) in error["message"]  # the server quotes the name; the Lua filter loses nothing


def read_headers(sock: socket.socket, data: bytes, blocks: int) -> bytes:
    """`data` and what the socket sends after it, until it holds `blocks` HTTP header blocks or
    the peer closes (the socket's timeout bounds each wait)."""
    while data.count(b"\r\n\r\n") < blocks:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("path", ["/nope", "/v1/models", "/v1/embeddings"])
def test_an_error_reply_to_head_has_no_body_so_the_next_reply_on_the_connection_is_intact(
    strict_gateway: Gateway, path: str
) -> None:
    """A reply to HEAD has no content (RFC 9110 9.3.2). The error filter wrote its JSON body
    into the 404 anyway, and an HTTP/1.1 client read it as the start of the next response on
    the connection (found by tests/fuzz/test_rest.py). Raw bytes, because a client library may
    drop a connection with bytes left on it and hide the bug."""
    auth = f"authorization: Bearer {KEYS[0]}\r\nhost: embedserve\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", strict_gateway.port), timeout=30) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\n".encode() + auth)
        head = read_headers(sock, b"", 1)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n" + auth)
        data = read_headers(sock, head, 2)
    head_block, _, after = data.partition(b"\r\n\r\n")
    # 404 for an unknown path; a REST route answers HEAD 405, naming the method it takes.
    assert head_block.startswith(b"HTTP/1.1 404 " if path == "/nope" else b"HTTP/1.1 405 "), head_block
    assert b"content-type: application/json" in head_block.lower()
    assert after.startswith(b"HTTP/1.1 200 "), after[:200]  # nothing between the two replies


def test_rest_without_a_content_type_is_still_rest(strict_gateway: Gateway) -> None:
    response = httpx.post(strict_gateway.base_url + "/v1/embeddings", content=BODY, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384


def test_an_overload_429_over_rest_says_when_to_retry(strict_gateway: Gateway) -> None:
    def post(_: int) -> httpx.Response:
        return httpx.post(
            strict_gateway.base_url + "/v1/embeddings",
            json={"input": CROWD, "encoding_format": "base64"},
            headers=AUTH,
            timeout=300,
        )

    with ThreadPoolExecutor(CONCURRENT) as pool:
        responses = list(pool.map(post, range(CONCURRENT)))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and {r.status_code for r in responses} <= {200, 429}
    for response in refused:
        error = openai_error(response, 429, "resource_exhausted")
        assert error["type"] == "rate_limit_error"
        assert response.headers["retry-after"].isdigit() and int(response.headers["retry-after"]) >= 1
    assert all("retry-after" not in r.headers for r in responses if r.status_code == 200)


def test_an_overload_over_native_grpc_through_envoy_carries_a_retry_after_trailer(strict_gateway: Gateway) -> None:
    with grpc.insecure_channel(strict_gateway.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        calls = [
            stub.Embed.future(pb.EmbedRequest(inputs=CROWD), metadata=GRPC_METADATA, timeout=300)
            for _ in range(CONCURRENT)
        ]
        errors = [call.exception() for call in calls]
    refused = [e for e in errors if e is not None]
    assert refused and len(refused) < CONCURRENT
    for error in refused:
        assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        trailers = dict(error.trailing_metadata() or ())
        assert str(trailers.get("retry-after", "")).isdigit() and int(trailers["retry-after"]) >= 1, trailers


def test_native_grpc_through_envoy_is_untouched(strict_gateway: Gateway) -> None:
    with grpc.insecure_channel(strict_gateway.address) as channel:
        response = pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(inputs=["hello"]), metadata=GRPC_METADATA, timeout=60
        )
        assert len(response.embeddings) == 1 and len(response.embeddings[0].float32_le) == 384 * 4
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # A gRPC method path the server does not know is still gRPC's to answer, not a 415.
        unknown: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/embedserve.v1.EmbeddingService/NoSuchMethod"
        )
        with pytest.raises(grpc.RpcError) as raised:
            unknown(b"", metadata=GRPC_METADATA, timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
