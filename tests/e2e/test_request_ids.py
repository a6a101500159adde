"""Request ids and TEI's timing headers (issue 11): Envoy makes an x-request-id when the client
sent none and returns it; the server logs it with errors and slow answers and echoes it in the
trailing metadata; REST answers carry x-total-time, x-queue-time, x-tokenization-time,
x-inference-time, x-compute-time and x-compute-tokens. And JSON floats are the shortest decimal
that gives each float32 back."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer, make_settings
from tests.e2e.conftest import Gateway, grpc_vectors

TIMING_HEADERS = ("x-total-time", "x-queue-time", "x-tokenization-time", "x-inference-time", "x-compute-time")


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        yield client


def trailer(call: grpc.Call, key: str) -> str | None:
    """A trailing metadata value of a finished call."""
    for k, value in call.trailing_metadata() or ():
        if k == key:
            return str(value)
    return None


def test_grpc_echoes_the_callers_request_id_or_makes_one(server: RunningServer) -> None:
    _, call = server.stub().Embed.with_call(pb.EmbedRequest(inputs=["x"]), metadata=(("x-request-id", "abc-123"),))
    assert trailer(call, "x-request-id") == "abc-123"
    _, call = server.stub().Embed.with_call(pb.EmbedRequest(inputs=["x"]))
    made = trailer(call, "x-request-id")
    assert made is not None and re.fullmatch(r"[0-9a-f]{32}", made)
    _, call = server.stub().Embed.with_call(pb.EmbedRequest(inputs=["x"]), metadata=(("x-request-id", "a b"),))
    assert trailer(call, "x-request-id") not in (None, "a b")  # spaces: not an id, a new one is made


def test_a_failed_call_echoes_and_logs_its_request_id(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embedserve.services.rpc")
    with pytest.raises(grpc.RpcError) as caught:
        server.stub().Embed(pb.EmbedRequest(model="no/such", inputs=["x"]), metadata=(("x-request-id", "rid-404"),))
    error = caught.value
    assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND
    assert trailer(error, "x-request-id") == "rid-404"
    assert any("request rid-404: Embed NOT_FOUND" in r.getMessage() for r in caplog.records)


def test_a_stream_echoes_its_request_id(server: RunningServer) -> None:
    requests = iter([pb.EmbedStreamRequest(id="1", request=pb.EmbedRequest(inputs=["x"]))])
    call = server.stub().EmbedStream(requests, metadata=(("x-request-id", "stream-7"),))
    assert [response.id for response in call] == ["1"]
    assert trailer(call, "x-request-id") == "stream-7"


def test_grpc_answers_carry_teis_timing_headers_in_the_trailers_and_nothing_ahead_of_the_answer(
    server: RunningServer,
) -> None:
    """Initial metadata sent ahead of the answer would let Envoy pass headers on before the
    answer exists, and it retries no call it has headers for (see embedserve.headers)."""
    response, call = server.stub().Embed.with_call(pb.EmbedRequest(inputs=["timing in the trailers", "x"]))
    trailers = dict(call.trailing_metadata())
    for name in TIMING_HEADERS:
        assert trailers[name].isdigit(), name
    assert int(trailers["x-total-time"]) == round(response.timing.total_ms)
    assert int(trailers["x-compute-tokens"]) == response.usage.total_tokens
    assert trailers["x-cached-inputs"] == str(response.timing.cached_inputs)
    assert not {key for key, _ in call.initial_metadata() or ()} & {*TIMING_HEADERS, "x-compute-tokens"}


def test_rest_answers_carry_the_request_id_and_teis_timing_headers(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"input": ["a", "b c"]}, headers={"x-request-id": "rest-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "rest-1"
    body = response.json()
    for name in TIMING_HEADERS:
        assert response.headers[name].isdigit(), name
    assert int(response.headers["x-total-time"]) == round(body["timing"]["total_ms"])
    assert int(response.headers["x-compute-tokens"]) == body["usage"]["total_tokens"]
    made = http.post("/v1/embeddings", json={"input": "x"})
    assert made.headers["x-request-id"]  # Envoy made one
    failed = http.post("/v1/embeddings", json={"input": "x", "model": "no/such"}, headers={"x-request-id": "rest-2"})
    assert failed.status_code == 404 and failed.headers["x-request-id"] == "rest-2"


def test_json_floats_are_the_shortest_that_give_the_float32_back(http: httpx.Client, server: RunningServer) -> None:
    texts = ["the shortest decimal", "that round-trips float32", "x"]
    response = http.post("/v1/embeddings", json={"model": DEFAULT_DENSE_MODEL, "input": texts})
    numbers = re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", response.text.split('"embedding":', 1)[1].split("]", 1)[0])
    assert len(numbers) == 384
    long = [n for n in numbers if len(re.sub(r"e.*|[-.]", "", n).lstrip("0")) > 9]
    assert not long  # a float32 widened as it is prints 16-17 digits
    vectors = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(vectors, grpc_vectors(server, texts))  # exactly the float32 values


@pytest.fixture(scope="module")
def slow_server() -> Iterator[RunningServer]:
    """Every answer is slow enough to log."""
    running = RunningServer(make_settings(models=(ModelSettings(DEFAULT_DENSE_MODEL),), slow_request_seconds=1e-6))
    yield running
    running.stop()


def test_a_slow_answer_is_logged_with_its_request_id_and_where_its_time_went(
    slow_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="embedserve.services.rpc")
    slow_server.stub().Embed(pb.EmbedRequest(inputs=["x"]), metadata=(("x-request-id", "slow-1"),))
    lines = [r.getMessage() for r in caplog.records if "slow-1" in r.getMessage()]
    assert lines and "slow Embed" in lines[0] and "queue-time" in lines[0] and "compute-tokens" in lines[0]
