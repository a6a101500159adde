"""A REST route called with the wrong method is 405 (with Allow) and with a body that is not JSON
415, both as OpenAI error bodies (envoy/openai_errors.lua, from the routes of proto/'s HTTP rules);
an unknown path stays 404."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.conftest import Gateway


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, timeout=60)


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = json.loads(response.content.decode("utf-8"))["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    return str(error["message"])


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/embeddings", "POST"),
        ("PUT", "/v1/rerank", "POST"),
        ("DELETE", "/v1/models", "GET"),
        ("POST", "/v1/models/sentence-transformers%2Fall-MiniLM-L6-v2", "GET"),
        ("GET", "/v2/embed", "POST"),
        ("POST", "/info", "GET"),
        ("GET", "/api/v1/rerank?x=1", "POST"),
    ],
)
def test_a_wrong_method_is_405_naming_the_ones_the_route_takes(
    http: httpx.Client, method: str, path: str, allow: str
) -> None:
    response = http.request(method, path, json={} if method != "GET" else None)
    message = error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allow
    assert f"{method} is not allowed on {path.split('?')[0]}: it takes {allow}" == message


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
@pytest.mark.parametrize("path", ["/v1/embeddings", "/v2/embed", "/embed"])
def test_a_body_that_is_not_json_is_415(http: httpx.Client, content_type: str, path: str) -> None:
    response = http.post(
        path, content=b'{"input": "x", "texts": ["x"], "inputs": "x"}', headers={"content-type": content_type}
    )
    message = error_of(response, 415, "unsupported_media_type")
    assert f"content-type {content_type} is not supported" in message and "application/json" in message


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json", ""])
def test_json_with_parameters_a_json_suffix_or_no_content_type_is_accepted(
    http: httpx.Client, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = http.post("/v1/embeddings", content=b'{"input": "x"}', headers=headers)
    assert response.status_code == 200, response.text


def test_an_unknown_path_is_still_404_whatever_the_method(http: httpx.Client) -> None:
    for method in ("GET", "POST"):
        response = http.request(method, "/v1/nothing-here")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
