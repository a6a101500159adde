"""The server's Prometheus metrics on its METRICS_PORT: every family there with its type, and the
counters, histograms and gauges moving with real traffic (an Embed, a SparseEmbed, a stream, a
failed request, requests shed by the queue and by MAX_CONCURRENCY) on servers of this process,
each counting apart."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer, make_settings
from tests.scrape import Scrape

EMBED = "embedserve.v1.EmbeddingService/Embed"
# Every family the server exports, and its type (counters are named without `_total` here).
FAMILIES = {
    "embedserve_requests": "counter",
    "embedserve_request_duration_seconds": "histogram",
    "embedserve_requests_in_flight": "gauge",
    "embedserve_requests_shed": "counter",
    "embedserve_engine_duration_seconds": "histogram",
    "embedserve_queue_duration_seconds": "histogram",
    "embedserve_tokenization_duration_seconds": "histogram",
    "embedserve_inference_duration_seconds": "histogram",
    "embedserve_batch_inputs": "histogram",
    "embedserve_batch_padded_tokens": "histogram",
    "embedserve_batch_duration_seconds": "histogram",
    "embedserve_tokens": "counter",
    "embedserve_queue_inputs": "gauge",
    "embedserve_queue_tokens": "gauge",
    "embedserve_queue_max_inputs": "gauge",
    "embedserve_queue_max_tokens": "gauge",
    "embedserve_calls_in_flight": "gauge",
    "embedserve_calls_in_flight_limit": "gauge",
    "embedserve_model_info": "gauge",
}
STAGES = ("engine", "queue", "tokenization", "inference")


def scrape(server: RunningServer) -> Scrape:
    return Scrape(f"http://{server.metrics_address}/metrics")


@pytest.fixture(scope="module")
def small() -> Iterator[RunningServer]:
    """A dense model whose lanes hold 4 inputs, one unary call at a time."""
    running = RunningServer(
        make_settings(models=(ModelSettings(DEFAULT_DENSE_MODEL),), queue_size=4, max_concurrency=1)
    )
    yield running
    running.stop()


def test_every_family_is_exported_with_its_type_and_each_served_model_with_its_info(server: RunningServer) -> None:
    server.stub().Embed(pb.EmbedRequest(inputs=["so that every labelled family has a sample"]))
    found = scrape(server)
    assert {name: found.type_of(name) for name in FAMILIES} == FAMILIES
    assert found.type_of("process_resident_memory_bytes") == "gauge"
    listed = server.stub().ListModels(pb.ListModelsRequest()).models
    info = {labels["model"]: labels for labels in found.label_sets("embedserve_model_info")}
    assert set(info) == {m.id for m in listed} == {DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL}
    for model in listed:
        expected = {"backend": model.backend, "provider": model.execution_provider, "dtype": model.dtype}
        assert {k: info[model.id][k] for k in expected} == expected
    assert info[DEFAULT_DENSE_MODEL]["kind"] == "dense" and info[DEFAULT_SPARSE_MODEL]["kind"] == "sparse"
    for served in (DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL):
        assert found.value("embedserve_queue_max_inputs", model=served) == server.settings.queue_size
        assert {"interactive", "bulk"} <= {
            labels["lane"] for labels in found.label_sets("embedserve_queue_inputs") if labels["model"] == served
        }


def test_an_embed_is_counted_timed_and_its_tokens_and_batches_accounted(server: RunningServer) -> None:
    before = scrape(server)
    response = server.stub().Embed(pb.EmbedRequest(inputs=["one", "two words", "and three words"]))
    after = scrape(server)

    def moved(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    model = {"model": DEFAULT_DENSE_MODEL}
    assert moved("embedserve_requests_total", rpc=EMBED, code="OK", **model) == 1
    assert moved("embedserve_request_duration_seconds_count", rpc=EMBED, **model) == 1
    for stage in STAGES:
        assert moved(f"embedserve_{stage}_duration_seconds_count", **model) == 1, stage
    # The inference histogram observed the seconds the answer reports.
    assert moved("embedserve_inference_duration_seconds_sum", **model) == pytest.approx(
        response.timing.inference_ms / 1e3, rel=1e-6
    )
    assert moved("embedserve_tokens_total", **model) == response.usage.prompt_tokens
    assert moved("embedserve_batch_inputs_sum", **model) == 3
    padded = moved("embedserve_batch_padded_tokens_sum", **model)
    assert padded >= response.usage.prompt_tokens
    assert moved("embedserve_batch_duration_seconds_count", lane="interactive", **model) >= 1
    assert moved("embedserve_tokens_total", model=DEFAULT_SPARSE_MODEL) == 0
    # Nothing is left in flight or queued once it is answered.
    assert after.value("embedserve_requests_in_flight", **model) == 0
    assert after.value("embedserve_queue_inputs", **model) == 0
    assert after.value("embedserve_calls_in_flight", kind="unary") == 0


def test_a_sparse_embed_and_a_stream_count_under_their_rpc_and_model(server: RunningServer) -> None:
    before = scrape(server)
    sparse = server.stub().SparseEmbed(pb.SparseEmbedRequest(inputs=["sparse terms"]))
    requests = [pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(inputs=["streamed"])) for i in range(2)]
    answers = list(server.stub().EmbedStream(iter(requests)))
    after = scrape(server)
    assert [a.id for a in answers] == ["0", "1"]

    def moved(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    sparse_model = {"model": DEFAULT_SPARSE_MODEL}
    assert (
        moved("embedserve_requests_total", rpc="embedserve.v1.EmbeddingService/SparseEmbed", code="OK", **sparse_model)
        == 1
    )
    assert moved("embedserve_tokens_total", **sparse_model) == sparse.usage.prompt_tokens
    assert moved("embedserve_engine_duration_seconds_count", **sparse_model) == 1
    # A stream counts once, when it ends, and each of its requests in the engine's histograms;
    # its duration (how long its client kept it open) is no latency.
    stream = {"rpc": "embedserve.v1.EmbeddingService/EmbedStream", "model": DEFAULT_DENSE_MODEL}
    assert moved("embedserve_requests_total", code="OK", **stream) == 1
    assert moved("embedserve_request_duration_seconds_count", **stream) == 0
    assert moved("embedserve_engine_duration_seconds_count", model=DEFAULT_DENSE_MODEL) == 2


def test_failed_requests_are_counted_with_their_status_code_and_the_model_once_it_is_known(
    server: RunningServer,
) -> None:
    before = scrape(server)
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Embed(pb.EmbedRequest(model="no/such-model", inputs=["x"]))
    with pytest.raises(grpc.RpcError) as too_long:
        stub.Embed(pb.EmbedRequest(inputs=["word " * 2000], truncate=False))
    after = scrape(server)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert too_long.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    def moved(**labels: str) -> float:
        return after.value("embedserve_requests_total", rpc=EMBED, **labels) - before.value(
            "embedserve_requests_total", rpc=EMBED, **labels
        )

    # A model the server does not serve is never a label value: the call has none.
    assert moved(model="", code="NOT_FOUND") == 1
    assert not any(labels["model"] == "no/such-model" for labels in after.label_sets("embedserve_requests_total"))
    assert moved(model=DEFAULT_DENSE_MODEL, code="INVALID_ARGUMENT") == 1
    assert after.value("embedserve_requests_in_flight", model=DEFAULT_DENSE_MODEL) == 0


def test_a_request_larger_than_the_queue_is_shed_by_the_queue_and_counted_on_its_server_only(
    small: RunningServer, server: RunningServer
) -> None:
    before, elsewhere = scrape(small), scrape(server)
    with pytest.raises(grpc.RpcError) as shed:
        small.stub().Embed(pb.EmbedRequest(inputs=["a", "b", "c", "d", "e"]))
    assert shed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    after = scrape(small)
    labels = {"model": DEFAULT_DENSE_MODEL, "reason": "queue_inputs"}
    assert (
        after.value("embedserve_requests_shed_total", **labels)
        - before.value("embedserve_requests_shed_total", **labels)
        == 1
    )
    code = {"rpc": EMBED, "model": DEFAULT_DENSE_MODEL, "code": "RESOURCE_EXHAUSTED"}
    assert after.value("embedserve_requests_total", **code) - before.value("embedserve_requests_total", **code) == 1
    assert scrape(server).value("embedserve_requests_shed_total") == elsewhere.value("embedserve_requests_shed_total")


@contextmanager
def held_forward_passes(server: RunningServer) -> Iterator[threading.Event]:
    """The model's forward passes wait, inside the worker thread, until the block ends; the event
    it yields is set once one has started."""
    scheduler = next(iter(server.engine.registry)).scheduler
    real: Callable[[list[Any]], Sequence[Any]] = scheduler._run_batch
    started, release = threading.Event(), threading.Event()

    def held(items: list[Any]) -> Sequence[Any]:
        started.set()
        assert release.wait(60), "the test never released the forward pass"
        return real(items)

    scheduler._run_batch = held
    try:
        yield started
    finally:
        release.set()
        scheduler._run_batch = real


def test_a_call_beyond_max_concurrency_is_shed_while_the_gauges_show_the_one_in_flight(small: RunningServer) -> None:
    before = scrape(small)
    stub = small.stub()
    with held_forward_passes(small) as started:
        first = stub.Embed.future(pb.EmbedRequest(inputs=["held", "here"]))
        assert started.wait(60), "the first call's forward pass never started"
        during = scrape(small)
        with pytest.raises(grpc.RpcError) as shed:
            stub.Embed(pb.EmbedRequest(inputs=["one too many"]))
    assert first.result(timeout=60).model == DEFAULT_DENSE_MODEL
    after = scrape(small)
    assert shed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    model = {"model": DEFAULT_DENSE_MODEL}
    assert during.value("embedserve_requests_in_flight", **model) == 1
    assert during.value("embedserve_calls_in_flight", kind="unary") == 1
    assert during.value("embedserve_calls_in_flight_limit", kind="unary") == 1
    assert during.value("embedserve_queue_inputs", lane="interactive", **model) == 2
    assert during.value("embedserve_queue_tokens", lane="interactive", **model) > 0
    # Refused before its message was read: no model.
    limit = {"model": "", "reason": "max_concurrency"}
    assert (
        after.value("embedserve_requests_shed_total", **limit) - before.value("embedserve_requests_shed_total", **limit)
        == 1
    )
    refused = {"rpc": EMBED, "model": "", "code": "RESOURCE_EXHAUSTED"}
    assert (
        after.value("embedserve_requests_total", **refused) - before.value("embedserve_requests_total", **refused) == 1
    )
    assert after.value("embedserve_requests_in_flight", **model) == 0
    assert after.value("embedserve_queue_inputs", **model) == 0
    assert after.value("embedserve_calls_in_flight", kind="unary") == 0
