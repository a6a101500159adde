"""Every REST route through real Envoy with generated bodies (of the route's shape or not, JSON
or not, UTF-8 or not), content types, headers, methods and paths: never a 5xx, every error
OpenAI's JSON body in valid UTF-8, every success JSON with one result per input."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.e2e.conftest import Gateway
from tests.fuzz import strategies as fuzzed
from tests.fuzz.conftest import MAX_MESSAGE_CHARS, TIMEOUT_S, fuzz


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT_S)


def check_response(method: str, path: str, response: httpx.Response) -> Any:
    """No 5xx; an error is OpenAI's error body, a success JSON; returns the parsed body (None
    for HEAD and /health, which have none)."""
    assert response.status_code < 500, (response.status_code, response.content[:500])
    event(f"HTTP {response.status_code}")
    if path == "/health":
        assert response.status_code == 200  # the health filter answers any method
        return None
    assert response.headers.get("content-type") == "application/json", response.headers
    assert not any(name.startswith("grpc-") for name in response.headers), response.headers
    if method == "HEAD":
        return None
    body = json.loads(response.content.decode("utf-8"))  # strict: raises on bytes that are not UTF-8
    if response.status_code >= 400:
        error = body["error"]
        assert set(error) == {"message", "type", "code"}, error
        assert all(isinstance(error[k], str) and error[k] for k in error), error
        assert len(error["message"]) <= MAX_MESSAGE_CHARS, error["message"][:300]
    return body


def expected_results(route: str, body: Any) -> int | None:
    """How many results a successful answer to `body` has, where the body says it plainly."""
    if not isinstance(body, dict):
        return None
    if route in ("embeddings", "embed_sparse"):
        value = body.get("input")
        return 1 if isinstance(value, str) else len(value) if isinstance(value, list) else None
    documents, top_n = body.get("documents"), body.get("top_n")
    if not isinstance(documents, list):
        return None
    if top_n is None:
        return len(documents)
    return min(top_n, len(documents)) if type(top_n) is int else None


def check_success(route: str, sent: Any, answer: dict[str, Any]) -> None:
    """One result per input (per document, for rerank), indexed in order."""
    results = answer["results"] if route == "rerank" else answer["data"]
    expected = expected_results(route, sent)
    if expected is not None:
        assert len(results) == expected, (len(results), expected)
    indices = [r["index"] for r in results]
    if route == "rerank":  # ranked: each document at most once
        assert len(set(indices)) == len(indices) and all(isinstance(i, int) and i >= 0 for i in indices)
    else:
        assert indices == list(range(len(results)))


@fuzz(300)
@given(
    path=st.sampled_from(fuzzed.POST_ROUTES),
    data=st.data(),
    headers=fuzzed.HEADERS,
    content_type=st.just("application/json") | fuzzed.CONTENT_TYPES,
)
def test_every_post_route_answers_json_bodies_of_any_shape_without_a_5xx(
    http: httpx.Client, path: str, data: st.DataObject, headers: dict[bytes, bytes], content_type: str
) -> None:
    route = fuzzed.route_name(path)
    body = data.draw(fuzzed.bodies(route), label="body")
    sent = {**headers, b"content-type": content_type.encode()}
    response = http.post(path, content=fuzzed.encoded(body), headers=sent)
    answer = check_response("POST", path, response)
    if response.status_code == 200:
        check_success(route, body, answer)


@fuzz(200)
@given(
    path=st.sampled_from(fuzzed.POST_ROUTES),
    data=st.data(),
    content_type=st.just("application/json") | fuzzed.CONTENT_TYPES,
)
def test_every_post_route_answers_bytes_that_are_not_json_or_not_utf8_without_a_5xx(
    http: httpx.Client, path: str, data: st.DataObject, content_type: str
) -> None:
    raw = data.draw(fuzzed.raw_bodies(fuzzed.route_name(path)), label="raw")
    check_response("POST", path, http.post(path, content=raw, headers={"content-type": content_type}))


@fuzz(200)
@given(
    method=fuzzed.METHODS,
    path=fuzzed.PATHS,
    content_type=fuzzed.CONTENT_TYPES,
    body=st.sampled_from((b"", b"{}", b'{"input": "x"}', b"null")) | st.binary(max_size=40),
)
def test_any_method_and_path_answers_without_a_5xx(
    http: httpx.Client, method: str, path: str, content_type: str, body: bytes
) -> None:
    if fuzzed.native_grpc(content_type, path):
        return  # a native gRPC call, answered in gRPC's framing (tests/e2e/test_grpc_through_envoy.py)
    url = http.base_url.copy_with(raw_path=path.encode("ascii"))
    response = http.request(method, url, content=body, headers={"content-type": content_type})
    check_response(method, path, response)
