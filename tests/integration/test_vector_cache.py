"""The vector cache against real servers with the real all-MiniLM-L6-v2: cached answers are the
uncached ones bit for bit, whatever the options; repeats and duplicates run no forward pass, within
a request and between requests in flight at once; the cache stays under its bound, and is off at 0."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from embedserve.kinds import Capability
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import openai_service_pb2 as openai_pb
from embedserve.v1 import openai_service_pb2_grpc as openai_grpc
from tests.conftest import RunningServer, make_settings
from tests.scrape import Scrape

# One input a forward pass on both servers, so that the comparisons see the cache alone: a vector
# computed in batches of different shapes may differ in its last bits, with or without a cache.
ALONE = (ModelSettings(DEFAULT_DENSE_MODEL, batch_size=1),)
CACHE_BYTES = 64 << 20
LONG = " ".join(f"word{i}" for i in range(400))  # over MiniLM's 256 tokens


def texts(tag: str, count: int) -> list[str]:
    """`count` texts no other test sends."""
    return [f"vector cache {tag} text {i}: {'lorem ipsum ' * (i % 5)}" for i in range(count)]


@pytest.fixture(scope="module")
def cached() -> Iterator[RunningServer]:
    """The dense model with a 64 MiB cache."""
    running = RunningServer(make_settings(models=ALONE, vector_cache_bytes=CACHE_BYTES))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def uncached() -> Iterator[RunningServer]:
    """The same with VECTOR_CACHE_BYTES=0."""
    running = RunningServer(make_settings(models=ALONE, vector_cache_bytes=0))
    yield running
    running.stop()


class Counted:
    """Counts the inputs a server's dense model runs forward passes on."""

    def __init__(self, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
        scheduler = server.engine.registry.find("", Capability.EMBED).scheduler
        real = scheduler._run_batch
        self.inputs = 0
        lock = threading.Lock()

        def run_batch(items: Any) -> Any:
            with lock:
                self.inputs += len(items)
            return real(items)

        monkeypatch.setattr(scheduler, "_run_batch", run_batch)


def vectors(response: pb.EmbedResponse) -> list[bytes]:
    return [e.float32_le for e in response.embeddings]


OPTIONS: list[dict[str, Any]] = [
    {},
    {"normalize": False},
    {"dimensions": 64},
    {"dimensions": 32, "normalize": False},
    {"dimensions": 128, "normalize": True},
    {"truncate": False},
    {"dimensions": 16, "truncate": False, "normalize": False},
]


@pytest.mark.parametrize("prompt", [None, "query: "])
def test_cached_vectors_are_bitwise_the_uncached_ones_for_every_option_combination(
    cached: RunningServer, uncached: RunningServer, prompt: str | None
) -> None:
    inputs = texts(f"options {prompt}", 6)
    for i, options in enumerate(OPTIONS):
        request = pb.EmbedRequest(inputs=inputs, prompt=prompt, **options)
        hit, computed = cached.stub().Embed(request), uncached.stub().Embed(request)
        assert vectors(hit) == vectors(computed), options
        assert hit.usage == computed.usage and hit.dimension == computed.dimension
        # Only the first request computes: the options apply after pooling, to the cached vector.
        assert hit.timing.cached_inputs == (0 if i == 0 else len(inputs)), options
        assert computed.timing.cached_inputs == 0


def test_a_prompt_changes_the_text_and_so_the_entry(cached: RunningServer) -> None:
    inputs = texts("prompted", 3)
    stub = cached.stub()
    assert stub.Embed(pb.EmbedRequest(inputs=inputs)).timing.cached_inputs == 0
    assert stub.Embed(pb.EmbedRequest(inputs=inputs, prompt="passage: ")).timing.cached_inputs == 0
    # The prompt is part of the text the model reads: the same text as a prompt gives it hits.
    again = stub.Embed(pb.EmbedRequest(inputs=[f"passage: {t}" for t in inputs]))
    assert again.timing.cached_inputs == len(inputs)


def test_a_repeated_request_runs_no_forward_pass_and_says_so(
    cached: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = Counted(cached, monkeypatch)
    request = pb.EmbedRequest(inputs=texts("repeated", 5))
    first = cached.stub().Embed(request)
    assert counted.inputs == 5 and first.timing.cached_inputs == 0
    second, call = cached.stub().Embed.with_call(request)
    assert counted.inputs == 5  # nothing ran
    assert vectors(second) == vectors(first) and second.usage == first.usage
    assert second.timing.cached_inputs == 5
    assert second.timing.queue_ms == second.timing.inference_ms == second.timing.tokenize_ms == 0
    assert dict(call.trailing_metadata())["x-cached-inputs"] == "5"
    # A request with some new texts runs those alone.
    third = cached.stub().Embed(pb.EmbedRequest(inputs=[*request.inputs[:3], *texts("repeated, new", 2)]))
    assert counted.inputs == 7 and third.timing.cached_inputs == 3
    assert vectors(third)[:3] == vectors(first)[:3]


def test_duplicates_inside_one_request_are_computed_once(
    cached: RunningServer, uncached: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = texts("duplicates", 3)
    request = pb.EmbedRequest(inputs=[a, b, a, a, c, b])
    counted = Counted(cached, monkeypatch)
    response = cached.stub().Embed(request)
    assert counted.inputs == 3 and response.timing.cached_inputs == 3
    expected = uncached.stub().Embed(request)
    assert vectors(response) == vectors(expected)
    assert response.usage == expected.usage  # every input counts its tokens, as without the cache


def test_a_truncated_entry_still_fails_a_request_that_does_not_truncate(
    cached: RunningServer, uncached: RunningServer
) -> None:
    inputs = [*texts("truncated", 2), LONG + " truncated"]
    first = cached.stub().Embed(pb.EmbedRequest(inputs=inputs))
    assert first.usage.truncated_inputs == 1
    again = cached.stub().Embed(pb.EmbedRequest(inputs=inputs))
    assert again.timing.cached_inputs == 3 and again.usage == first.usage
    errors: list[str | None] = []
    for server in (cached, uncached):
        with pytest.raises(grpc.RpcError) as caught:
            server.stub().Embed(pb.EmbedRequest(inputs=inputs, truncate=False))
        error = caught.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        errors.append(error.details())
    assert errors[0] == errors[1] and "inputs[2] has" in str(errors[0])


def test_the_openai_route_and_dense_rerank_share_the_cache_with_embed(
    cached: RunningServer, uncached: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    query, *documents = texts("shared", 4)
    cached.stub().Embed(pb.EmbedRequest(inputs=[query, *documents]))
    counted = Counted(cached, monkeypatch)
    channel = grpc.insecure_channel(cached.address)
    openai = openai_grpc.OpenAIServiceStub(channel).CreateEmbeddings(
        openai_pb.CreateEmbeddingsRequest(input=_list_value(documents))
    )
    assert openai.timing.cached_inputs == 3
    rerank = pb.RerankRequest(query=query, documents=documents)
    ranked, expected = cached.stub().Rerank(rerank), uncached.stub().Rerank(rerank)
    assert ranked.timing.cached_inputs == 4
    assert [(r.index, r.relevance_score) for r in ranked.results] == [
        (r.index, r.relevance_score) for r in expected.results
    ]
    assert counted.inputs == 0
    channel.close()


def _list_value(items: list[str]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.list_value.extend(items)
    return value


def test_hits_misses_and_bytes_are_in_the_metrics(cached: RunningServer) -> None:
    before = Scrape(f"http://{cached.metrics_address}/metrics")
    inputs = texts("metrics", 4)
    cached.stub().Embed(pb.EmbedRequest(inputs=[*inputs, inputs[0]]))
    cached.stub().Embed(pb.EmbedRequest(inputs=inputs))
    after = Scrape(f"http://{cached.metrics_address}/metrics")
    model = {"model": DEFAULT_DENSE_MODEL}

    def moved(sample: str) -> float:
        return after.value(sample, **model) - before.value(sample, **model)

    assert after.type_of("embedserve_vector_cache_hits") == "counter"
    assert moved("embedserve_vector_cache_misses_total") == 4
    assert moved("embedserve_vector_cache_hits_total") == 1 + 4
    held = after.value("embedserve_vector_cache_bytes")
    assert 0 < held <= after.value("embedserve_vector_cache_max_bytes") == cached.settings.vector_cache_bytes
    assert after.value("embedserve_vector_cache_entries") - before.value("embedserve_vector_cache_entries") == 4


def test_the_cache_evicts_the_least_recently_used_and_stays_under_its_bound() -> None:
    running = RunningServer(make_settings(models=ALONE, vector_cache_bytes=20 * 1900))
    try:
        stub = running.stub()
        first = texts("evicted", 8)
        stub.Embed(pb.EmbedRequest(inputs=first))
        for i in range(6):
            stub.Embed(pb.EmbedRequest(inputs=texts(f"evicting {i}", 4)))
            cache = running.engine.vectors
            assert 0 < cache.bytes_held <= cache.max_bytes
        assert len(running.engine.vectors) < 8 + 24
        assert stub.Embed(pb.EmbedRequest(inputs=first)).timing.cached_inputs == 0  # long gone
        assert stub.Embed(pb.EmbedRequest(inputs=texts("evicting 5", 4))).timing.cached_inputs == 4
        scraped = Scrape(f"http://{running.metrics_address}/metrics")
        assert scraped.value("embedserve_vector_cache_bytes") <= 20 * 1900
    finally:
        running.stop()


def test_with_no_bytes_nothing_is_cached_and_every_input_runs(
    uncached: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = Counted(uncached, monkeypatch)
    a, b = texts("off", 2)
    request = pb.EmbedRequest(inputs=[a, b, a])
    for _ in range(2):
        assert uncached.stub().Embed(request).timing.cached_inputs == 0
    assert counted.inputs == 6
    assert len(uncached.engine.vectors) == 0 and uncached.engine.vectors.bytes_held == 0
    scraped = Scrape(f"http://{uncached.metrics_address}/metrics")
    assert scraped.value("embedserve_vector_cache_hits_total", model=DEFAULT_DENSE_MODEL) == 0
    assert scraped.value("embedserve_vector_cache_max_bytes") == 0


def test_vectors_of_a_stream_and_of_unary_calls_come_from_one_cache(cached: RunningServer) -> None:
    inputs = texts("stream", 3)
    unary = cached.stub().Embed(pb.EmbedRequest(inputs=inputs))
    requests = [pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(inputs=inputs)) for i in range(2)]
    answers = list(cached.stub().EmbedStream(iter(requests)))
    assert sorted(a.id for a in answers) == ["0", "1"]
    for answer in answers:
        assert answer.response.timing.cached_inputs == 3
        assert vectors(answer.response) == vectors(unary)
    assert np.frombuffer(vectors(unary)[0], dtype="<f4").shape == (384,)


@pytest.fixture(scope="module")
def keeps_nothing() -> Iterator[RunningServer]:
    """A cache that is on but holds nothing (no entry fits 1 byte): what two requests share can
    only come from one computing it while the other waits."""
    running = RunningServer(make_settings(models=ALONE, vector_cache_bytes=1))
    yield running
    running.stop()


class Held:
    """Holds every forward pass of a server's dense model until `release`, and says when one has
    started (`entered`), when a request waits on another's texts (`waiting`) and when a request
    gave up texts it was computing (`abandoned`)."""

    def __init__(self, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counted = Counted(server, monkeypatch)
        scheduler = server.engine.registry.find("", Capability.EMBED).scheduler
        counting = scheduler._run_batch
        self.entered, self.release = threading.Event(), threading.Event()
        self.waiting, self.abandoned = threading.Event(), threading.Event()

        def run_batch(items: Any) -> Any:
            self.entered.set()
            assert self.release.wait(60), "never released"
            return counting(items)

        monkeypatch.setattr(scheduler, "_run_batch", run_batch)
        engine = server.engine
        awaited, settle = engine._awaited, engine._in_flight.settle

        async def awaiting(plan: Any, truncate: bool) -> list[int]:
            if plan.awaited:
                self.waiting.set()
            return await awaited(plan, truncate)

        def settling(keys: Any, futures: Any, entries: Any) -> None:
            if entries is None:
                self.abandoned.set()
            settle(keys, futures, entries)

        monkeypatch.setattr(engine, "_awaited", awaiting)
        monkeypatch.setattr(engine._in_flight, "settle", settling)


def test_a_text_another_request_is_computing_is_waited_for_not_computed_twice(
    keeps_nothing: RunningServer, uncached: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = Held(keeps_nothing, monkeypatch)
    request = pb.EmbedRequest(inputs=texts("in flight", 3))
    first = keeps_nothing.stub().Embed.future(request)
    assert held.entered.wait(30)
    second = keeps_nothing.stub().Embed.future(pb.EmbedRequest(inputs=[*request.inputs, "in flight, new"]))
    # The second request has planned once it claims its one new text: 3 + 1 texts in flight.
    deadline = time.monotonic() + 30
    while len(keeps_nothing.engine._in_flight) < 4:
        assert time.monotonic() < deadline, "the second request never claimed its new text"
        time.sleep(0.01)
    held.release.set()
    a, b = first.result(timeout=60), second.result(timeout=60)
    assert held.counted.inputs == 3 + 1  # the shared texts ran once
    assert a.timing.cached_inputs == 0 and b.timing.cached_inputs == 3
    expected = uncached.stub().Embed(pb.EmbedRequest(inputs=[*request.inputs, "in flight, new"]))
    assert vectors(b) == vectors(expected) and vectors(a) == vectors(expected)[:3]
    assert b.usage == expected.usage
    assert len(keeps_nothing.engine._in_flight) == 0


def test_when_the_request_computing_a_text_goes_away_the_one_waiting_computes_it(
    keeps_nothing: RunningServer, uncached: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = Held(keeps_nothing, monkeypatch)
    request = pb.EmbedRequest(inputs=texts("abandoned", 2))
    first = keeps_nothing.stub().Embed.future(request)
    assert held.entered.wait(30)
    second = keeps_nothing.stub().Embed.future(request)
    assert held.waiting.wait(30)
    first.cancel()
    assert held.abandoned.wait(30)  # the server saw the first call go and gave its texts up
    held.release.set()
    answer = second.result(timeout=60)
    assert answer.timing.cached_inputs == 0  # computed for itself after all
    assert vectors(answer) == vectors(uncached.stub().Embed(request))
    assert answer.usage == uncached.stub().Embed(request).usage
    assert len(keeps_nothing.engine._in_flight) == 0
