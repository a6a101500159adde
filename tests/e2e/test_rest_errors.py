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
from tests.texts import fresh_texts

AUTH = {"authorization": f"Bearer {KEYS[0]}"}
GRPC_METADATA = (("authorization", f"Bearer {KEYS[0]}"),)
BODY = b'{"input": "hello"}'
# 64 inputs of ~100 tokens, 12 at once: more than strict_server's queue of 64 inputs can take.
CROWD = " ".join(["queue"] * 100)  # 64 of it, each a fresh text, fill the queue
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
            json={"input": fresh_texts(CROWD, 64), "encoding_format": "base64"},
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
            stub.Embed.future(pb.EmbedRequest(inputs=fresh_texts(CROWD, 64)), metadata=GRPC_METADATA, timeout=300)
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


# Lists of repeated string fields that the transcoder would reshape (drop a null, flatten a list),
# refused by the Lua filter before it does, with the item's path as the client sent it.
RESHAPED = [
    ("/v2/rerank", {"query": "capital of France?", "documents": [None, "Bananas.", "Paris."]}, "documents[0] is null"),
    ("/v1/rerank", {"query": "capital?", "documents": ["Paris.", "Bananas.", None]}, "documents[2] is null"),
    ("/v2/embed", {"texts": ["hello"], "embeddingTypes": ["float", None]}, "embeddingTypes[1] is null"),
    ("/v2/rerank", {"query": "capital?", "documents": ["Paris.", ["Bananas.", "x"]]}, "documents[1] is a list"),
    ("/v1/embed", {"texts": [["hello", "world"]]}, "texts[0] is a list"),
    ("/v2/embed", {"texts": ["a", {"b": None}, []], "embedding_types": ["float"]}, "texts[2] is a list"),
]


@pytest.mark.parametrize(("path", "body", "message"), RESHAPED)
def test_a_null_or_a_list_item_in_a_repeated_string_field_is_400_naming_it_not_reshaped(
    gateway: Gateway, path: str, body: dict[str, Any], message: str
) -> None:
    response = httpx.post(gateway.base_url + path, json=body, timeout=60)
    error = openai_error(response, 400, "invalid_argument")
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message + ": every item of "), error
    assert "must be a string" in error["message"], error


def test_list_text_inside_strings_of_a_list_field_is_text(gateway: Gateway) -> None:
    """The filter's tokenizer skips strings whole, escaped quotes and backslashes included."""
    documents = ['Bananas "null, [1]" \\', "Paris is the capital of France.", "null", '[null, ["x"]]\\"']
    body = {"query": "capital of France?", "documents": documents, "return_documents": True}
    response = httpx.post(gateway.base_url + "/v2/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert results[0]["index"] == 1 and {r["index"]: r["document"]["text"] for r in results} == dict(
        enumerate(documents)
    )


def test_openai_input_keeps_its_own_checks_by_the_server(gateway: Gateway) -> None:
    """`input` is a google.protobuf.Value, which keeps nulls and lists: the server reads it."""
    url = gateway.base_url + "/v1/embeddings"
    ok = httpx.post(url, json={"input": ["hello", "null, [1]"]}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert [d["index"] for d in ok.json()["data"]] == [0, 1]
    null = openai_error(httpx.post(url, json={"input": ["hello", None]}, timeout=60), 400, "invalid_argument")
    assert null["message"].startswith("input[1] is null; input must be a string or an array of strings"), null
    ids = openai_error(httpx.post(url, json={"input": [[1, 2, 3]]}, timeout=60), 400, "invalid_argument")
    assert "token ids are not supported" in ids["message"], ids


def test_a_large_body_of_a_list_field_is_read_whole_and_ranked(gateway: Gateway) -> None:
    """2,000 documents of ~1 KB: over the listener's 1 MiB buffer, which the filter's read of the
    body would answer 413 but for the REST route's buffer limit."""
    documents = [f"document {i}: " + "x" * 1010 for i in range(2000)]
    documents[1234] = "Paris is the capital of France. " + "x" * 990
    body = json.dumps({"query": "capital of France?", "documents": documents, "top_n": 1}).encode()
    assert len(body) > 2_000_000
    response = httpx.post(gateway.base_url + "/v2/rerank", content=body, timeout=120)
    assert response.status_code == 200, response.text[:500]
    assert [r["index"] for r in response.json()["results"]] == [1234]
