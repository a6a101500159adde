"""Safe retries over REST, through the real Envoy: the `Idempotency-Key` header (IETF httpapi draft)
reaches the server as `idempotency-key` metadata; a retry gets the stored answer with the header
`idempotent-replayed: true`, another body under the key is 422, a duplicate of a request still
running is 409, all with OpenAI's error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from tests.conftest import RunningServer, make_settings
from tests.e2e.conftest import Gateway
from tests.held_engine import HeldEmbed


@pytest.fixture(scope="module")
def held() -> Iterator[tuple[Gateway, HeldEmbed]]:
    """Envoy in front of a server whose embed calls are counted and can be held."""
    server = RunningServer(make_settings(models=(ModelSettings(DEFAULT_DENSE_MODEL),)))
    gateway = Gateway(server.address)
    yield gateway, HeldEmbed(server)
    gateway.stop()
    server.stop()


def post(gateway: Gateway, body: str | dict[str, Any], key: str | None, path: str = "/v1/embeddings") -> httpx.Response:
    """POSTs `body` (a dict, or JSON text sent as it is) with `key` as Idempotency-Key."""
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(gateway.base_url + path, content=content, headers=headers, timeout=60)


def test_a_retry_gets_the_stored_answer_with_a_replay_header_and_the_model_runs_once(
    held: tuple[Gateway, HeldEmbed],
) -> None:
    gateway, engine = held
    before = engine.calls
    first = post(gateway, {"model": DEFAULT_DENSE_MODEL, "input": ["retry me", "and me"]}, "rest-replay-1")
    # The same JSON in another key order and spacing is the same request.
    reordered = '{ "input" : ["retry me","and me"],\n "model":' + json.dumps(DEFAULT_DENSE_MODEL) + " }"
    again = post(gateway, reordered, "rest-replay-1")
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and len(first.json()["data"]) == 2  # timing included
    assert engine.calls == before + 1


def test_another_body_under_the_key_is_422_saying_what_to_change(held: tuple[Gateway, HeldEmbed]) -> None:
    gateway, engine = held
    assert post(gateway, {"input": "first body"}, "rest-mismatch-1").status_code == 200
    before = engine.calls
    response = post(gateway, {"input": "second body"}, "rest-mismatch-1")
    assert response.status_code == 422 and engine.calls == before
    assert response.headers["content-type"] == "application/json"
    assert "embedserve-http-status" not in response.headers  # read by Envoy's error filter, then removed
    error = response.json()["error"]
    assert error["code"] == "failed_precondition" and error["type"] == "invalid_request_error"
    assert "different CreateEmbeddings request" in error["message"] and "new key" in error["message"]


def test_a_duplicate_of_a_request_still_running_is_409_then_replayed(held: tuple[Gateway, HeldEmbed]) -> None:
    gateway, engine = held
    body = {"input": "held at first"}
    with ThreadPoolExecutor(1) as pool:
        with engine.holding():
            before = engine.calls
            first = pool.submit(post, gateway, body, "rest-running-1")
            engine.wait_for_calls(before + 1)
            duplicate = post(gateway, body, "rest-running-1")
        answer = first.result(timeout=60)
    assert duplicate.status_code == 409
    error = duplicate.json()["error"]
    assert error["code"] == "aborted" and "retry later" in error["message"]
    again = post(gateway, body, "rest-running-1")
    assert answer.status_code == again.status_code == 200 and again.json() == answer.json()
    assert again.headers["idempotent-replayed"] == "true" and engine.calls == before + 1


def test_a_stored_client_error_is_replayed_with_its_status(held: tuple[Gateway, HeldEmbed]) -> None:
    gateway, _ = held
    body = {"input": "x", "model": "no-such-model"}
    first, again = post(gateway, body, "rest-error-1"), post(gateway, body, "rest-error-1")
    assert first.status_code == again.status_code == 404 and again.json() == first.json()
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(("key", "says"), [("", "is empty"), ("k" * 256, "256 characters")])
def test_a_key_that_cannot_be_one_is_400(held: tuple[Gateway, HeldEmbed], key: str, says: str) -> None:
    gateway, _ = held
    response = post(gateway, {"input": "x"}, key)
    assert response.status_code == 400
    assert says in response.json()["error"]["message"]


def test_the_drafts_quoted_string_form_is_the_same_key(held: tuple[Gateway, HeldEmbed]) -> None:
    gateway, _ = held
    first = post(gateway, {"input": "quoted"}, '"8e03978e-40d5-43e8-bc93-6894a57f9324"')
    again = post(gateway, {"input": "quoted"}, "8e03978e-40d5-43e8-bc93-6894a57f9324")
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()


def test_the_openai_sdk_sends_the_key_as_an_extra_header(held: tuple[Gateway, HeldEmbed]) -> None:
    gateway, engine = held
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
    headers = {"Idempotency-Key": "sdk-1"}
    before = engine.calls
    first = client.embeddings.with_raw_response.create(model=DEFAULT_DENSE_MODEL, input="sdk", extra_headers=headers)
    again = client.embeddings.with_raw_response.create(model=DEFAULT_DENSE_MODEL, input="sdk", extra_headers=headers)
    assert again.headers["idempotent-replayed"] == "true" and engine.calls == before + 1
    assert again.parse().data[0].embedding == first.parse().data[0].embedding
