"""Embed and EmbedStream against a real server with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from embedserve.engine.types import Priority
from embedserve.kinds import Capability
from embedserve.models import bundled_path
from embedserve.settings import DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.texts import fresh, fresh_texts

Matrix = npt.NDArray[np.float32]

WORDS = (
    "the model turns text into vectors quickly and the server batches requests from many clients "
    "latency throughput queue token budget padding sorted window fairness cancel deadline stream"
).split()


def varied_texts() -> list[str]:
    """~100 texts: plain, unicode, emoji, odd whitespace, very short and very long."""
    rng = random.Random(7)
    texts = [
        "hello world",
        "a",
        "Ünïcödé façade naïve café — “quotes” and ‘apostrophes’",
        "日本語のテキストを埋め込みます。",
        "Привет, как дела? Всё хорошо.",
        "مرحبا بالعالم",
        "emoji 🙂🚀🔥 in 👩‍👩‍👧 between words",
        "   leading and trailing whitespace   ",
        "tabs\tand\nnewlines\r\nmixed \u00a0 non-breaking \u2003 em space",
        "\u200b zero width \u200b",
        "1234567890 3.14159 -42 1e10",
        "<html><body>markup &amp; entities</body></html>",
        "def f(x):\n    return x * 2  # code",
        "ALL CAPS SHOUTING TEXT",
        " ".join(["word"] * 5000),  # far over 256 tokens: truncated like sentence-transformers does
        " ".join(rng.choice(WORDS) for _ in range(300)),
    ]
    while len(texts) < 100:
        n = rng.randint(1, 120)
        texts.append(" ".join(rng.choice(WORDS) for _ in range(n)))
    return texts


def decode(response: pb.EmbedResponse) -> Matrix:
    """Vectors of a response as a (n, dim) matrix, from either wire form."""
    rows = [
        np.frombuffer(e.float32_le, dtype="<f4") if e.float32_le else np.asarray(e.values, dtype=np.float32)
        for e in response.embeddings
    ]
    return np.stack(rows)


def cosine(a: Matrix, b: Matrix) -> npt.NDArray[np.float64]:
    """Row-wise cosine similarity."""
    similarity: npt.NDArray[np.float64] = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return similarity


@pytest.fixture(scope="module")
def reference() -> Matrix:
    """What sentence-transformers itself computes for the varied texts."""
    from sentence_transformers import SentenceTransformer

    path = bundled_path(DEFAULT_DENSE_MODEL)
    model = SentenceTransformer(str(path), device="cpu")
    return np.asarray(model.encode(varied_texts(), batch_size=16), dtype=np.float32)


def test_vectors_match_sentence_transformers_on_varied_texts(server: RunningServer, reference: Matrix) -> None:
    texts = varied_texts()
    response = server.stub().Embed(pb.EmbedRequest(inputs=texts))
    vectors = decode(response)
    assert [e.index for e in response.embeddings] == list(range(len(texts)))
    assert vectors.shape == (len(texts), 384)
    assert response.dimension == 384
    assert response.model == DEFAULT_DENSE_MODEL
    assert cosine(vectors, reference).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_usage_counts_real_tokens_and_truncated_inputs(server: RunningServer) -> None:
    # Texts no other test sends, so that this request is computed (the vector cache is on).
    texts = ["hello world of usage counts", " ".join(["usage"] * 5000)]
    response = server.stub().Embed(pb.EmbedRequest(inputs=texts))
    # [CLS] hello world of usage counts [SEP] = 7 tokens; the long one is cut to the model's 256.
    assert response.usage.prompt_tokens == 7 + 256
    assert response.usage.total_tokens == response.usage.prompt_tokens
    assert response.usage.truncated_inputs == 1
    timing = response.timing
    assert timing.total_ms >= timing.inference_ms > 0
    assert timing.tokenize_ms > 0


def test_onnx_and_torch_backends_agree(server: RunningServer, torch_server: RunningServer) -> None:
    texts = varied_texts()[:40]
    onnx_vectors = decode(server.stub().Embed(pb.EmbedRequest(inputs=texts)))
    torch_vectors = decode(torch_server.stub().Embed(pb.EmbedRequest(inputs=texts)))
    assert cosine(onnx_vectors, torch_vectors).min() >= 0.9999
    models = torch_server.stub().ListModels(pb.ListModelsRequest()).models
    assert [(m.backend, m.execution_provider, m.dtype) for m in models] == [("torch", "cpu", "fp32")]


def test_packed_float_encoding_carries_the_same_vectors(server: RunningServer) -> None:
    stub = server.stub()
    texts = ["first text", "second, longer text about vectors"]
    raw = stub.Embed(pb.EmbedRequest(inputs=texts))
    packed = stub.Embed(pb.EmbedRequest(inputs=texts, encoding=pb.VECTOR_ENCODING_FLOAT))
    assert all(not e.values for e in raw.embeddings)
    assert all(not e.float32_le for e in packed.embeddings)
    np.testing.assert_array_equal(decode(raw), decode(packed))


def test_dimensions_keep_the_first_values_and_renormalize(server: RunningServer) -> None:
    stub = server.stub()
    texts = ["matryoshka truncation keeps a prefix", "another sentence"]
    full = decode(stub.Embed(pb.EmbedRequest(inputs=texts, normalize=False)))
    short = decode(stub.Embed(pb.EmbedRequest(inputs=texts, dimensions=64)))
    assert short.shape == (2, 64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)


def test_normalize_false_returns_the_raw_mean_pooled_vector(server: RunningServer) -> None:
    stub = server.stub()
    texts = ["norms of raw pooled vectors are not one"]
    raw = decode(stub.Embed(pb.EmbedRequest(inputs=texts, normalize=False)))
    default = decode(stub.Embed(pb.EmbedRequest(inputs=texts)))
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 0.01
    np.testing.assert_allclose(raw / np.linalg.norm(raw), default, atol=1e-5)


def test_prompt_is_prefixed_to_every_input(server: RunningServer) -> None:
    stub = server.stub()
    prefixed = decode(stub.Embed(pb.EmbedRequest(inputs=["query: what is a vector"])))
    via_prompt = decode(stub.Embed(pb.EmbedRequest(inputs=["what is a vector"], prompt="query: ")))
    plain = decode(stub.Embed(pb.EmbedRequest(inputs=["what is a vector"])))
    np.testing.assert_allclose(via_prompt, prefixed, atol=1e-5)
    assert cosine(plain, prefixed)[0] < 0.9999


def test_list_models_describes_the_served_models(server: RunningServer) -> None:
    models = server.stub().ListModels(pb.ListModelsRequest()).models
    assert [(m.id, m.kind) for m in models] == [
        (DEFAULT_DENSE_MODEL, pb.MODEL_KIND_DENSE),
        (DEFAULT_SPARSE_MODEL, pb.MODEL_KIND_SPARSE),
    ]
    model = models[0]
    assert list(model.capabilities) == ["Embed", "EmbedStream", "Rerank"]
    assert (model.dimension, model.max_input_tokens) == (384, 256)
    assert (model.backend, model.execution_provider, model.dtype) == ("onnx", "CPUExecutionProvider", "fp32")
    assert model.normalize is True


def test_embed_stream_answers_every_id_once_with_the_right_vectors(server: RunningServer) -> None:
    texts = varied_texts()
    chunks = {f"req-{i}": texts[i : i + 7] for i in range(0, len(texts), 7)}

    def requests() -> Iterator[pb.EmbedStreamRequest]:
        for request_id, chunk in chunks.items():
            yield pb.EmbedStreamRequest(id=request_id, request=pb.EmbedRequest(inputs=chunk))
        yield pb.EmbedStreamRequest(id="bad", request=pb.EmbedRequest(inputs=[]))

    stub = server.stub()
    seen: dict[str, pb.EmbedStreamResponse] = {}
    for response in stub.EmbedStream(requests()):
        assert response.id not in seen
        seen[response.id] = response
    assert set(seen) == {*chunks, "bad"}
    assert seen["bad"].WhichOneof("result") == "error"
    assert seen["bad"].error.status == "INVALID_ARGUMENT"
    assert seen["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for request_id, chunk in chunks.items():
        unary = decode(stub.Embed(pb.EmbedRequest(inputs=chunk)))
        assert cosine(decode(seen[request_id].response), unary).min() >= 0.99999


def test_embed_stream_stops_reading_when_the_client_stops_reading(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure: with responses unread, the server reads only its window of requests
    (plus the few whose responses fit in transport buffers), not everything sent."""
    # Large responses (256 vectors, ~400 KB each) of cheap inputs: few fit in transport buffers.
    offered = 80
    per_request = 256
    text = "x"
    read_by_server = 0
    real_embed = server.engine.embed

    async def counting_embed(*args: Any, **kwargs: Any) -> Any:
        nonlocal read_by_server
        read_by_server += 1
        return await real_embed(*args, **kwargs)

    monkeypatch.setattr(server.engine, "embed", counting_embed)

    def requests() -> Iterator[pb.EmbedStreamRequest]:
        for i in range(offered):
            # Not "<n> x": that is what tests.texts.fresh("x") makes, which later tests need unseen.
            inputs = [f"backpressure {i} {text}"] * per_request
            request = pb.EmbedRequest(inputs=inputs, encoding=pb.VECTOR_ENCODING_FLOAT)
            yield pb.EmbedStreamRequest(id=str(i), request=request)

    # No BDP probing: the client's receive window stays at HTTP/2's 64 KB, so the transport
    # buffers only what the sockets hold and the bound below does not depend on grpc tuning.
    channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
    calls = pb_grpc.EmbeddingServiceStub(channel).EmbedStream(requests())
    time.sleep(3.0)  # the client reads nothing meanwhile
    window = server.settings.stream_window
    print(f"server read {read_by_server} of {offered} requests with a window of {window}")
    assert read_by_server <= window + 8, f"server read {read_by_server} requests with a window of {window}"
    model = server.engine.registry.find("", Capability.EMBED)
    assert model.scheduler.queued <= window * per_request
    ids = [response.id for response in calls]
    assert sorted(ids, key=int) == [str(i) for i in range(offered)]
    assert read_by_server == offered


def test_concurrent_small_and_large_requests_all_get_their_own_vectors(server: RunningServer) -> None:
    stub = server.stub()
    texts = varied_texts()
    expected = decode(stub.Embed(pb.EmbedRequest(inputs=texts)))
    futures = [stub.Embed.future(pb.EmbedRequest(inputs=texts[i : i + 1 + i % 5])) for i in range(60)]
    for i, future in enumerate(futures):
        got = decode(future.result())
        assert cosine(got, expected[i : i + 1 + i % 5]).min() >= 0.99999


def settled(server: RunningServer) -> Any:
    """The default dense model's scheduler, once it holds no work of an earlier test (whose last
    calls may still be computed after they returned, e.g. a stream a test left)."""
    scheduler = server.engine.registry.find("", Capability.EMBED).scheduler
    deadline = time.monotonic() + 60
    while scheduler.queued and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.queued == 0, f"{scheduler.queued} inputs of earlier tests still queued"
    return scheduler


def test_cancelled_stream_drops_its_queued_work(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = settled(server)
    workers = scheduler._executors[Priority.BULK]._max_workers  # the bulk workers: two on CPU
    forward = threading.Event()
    started: list[int] = []  # inputs of each forward pass begun
    real_run = scheduler._run_batch

    def held_run_batch(items: Any) -> Any:  # every forward pass waits until the test lets it go
        started.append(len(items))
        forward.wait(30)
        return real_run(items)

    monkeypatch.setattr(scheduler, "_run_batch", held_run_batch)
    text = " ".join(["cancel"] * 60)
    release = threading.Event()

    def requests() -> Iterator[pb.EmbedStreamRequest]:
        for i in range(server.settings.stream_window):
            yield pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(inputs=fresh_texts(text, 512)))
        release.wait(30)  # keep the stream open, as a bulk client would

    call = server.stub().EmbedStream(requests())
    try:
        # Each worker holds a batch in its forward pass; the rest of what was admitted waits.
        deadline = time.monotonic() + 10
        while (len(started) < workers or scheduler.queued <= sum(started)) and time.monotonic() < deadline:
            time.sleep(0.01)
        running = sum(started)
        assert len(started) == workers and scheduler.queued > running, (started, scheduler.queued)
        call.cancel()
        deadline = time.monotonic() + 10
        while scheduler.queued > running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.queued <= running  # dropped while the forward passes were still held
    finally:
        forward.set()
        release.set()
    deadline = time.monotonic() + 30
    while scheduler.queued > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.queued == 0
    assert sum(started) == running  # no forward pass of the cancelled stream's texts began after


class LaneRecorder:
    """Records the lane and tenant of every job the default dense model's scheduler admits."""

    def __init__(self, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
        scheduler = settled(server)
        self.jobs: list[tuple[str, str]] = []
        real_admit = scheduler.admit

        def admit(job: Any, ticket: Any) -> None:
            self.jobs.append((job.priority.value, job.tenant))
            real_admit(job, ticket)

        monkeypatch.setattr(scheduler, "admit", admit)


def test_small_unary_requests_are_interactive_and_streams_and_large_ones_bulk(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes = LaneRecorder(server, monkeypatch)
    stub = server.stub()
    limit = server.settings.interactive_max_inputs
    stub.Embed(pb.EmbedRequest(inputs=fresh_texts("a query", limit)))
    stub.Embed(pb.EmbedRequest(inputs=fresh_texts("a document", limit + 1)))
    streamed = pb.EmbedStreamRequest(id="0", request=pb.EmbedRequest(inputs=[fresh("x")]))
    list(stub.EmbedStream(iter([streamed])))
    assert [lane for lane, _ in lanes.jobs] == ["interactive", "bulk", "bulk"]


def test_the_priority_field_then_the_metadata_choose_the_lane(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes = LaneRecorder(server, monkeypatch)
    stub = server.stub()
    # Fresh texts: a text the vector cache holds would take no lane at all.
    stub.Embed(pb.EmbedRequest(inputs=[fresh("lane text")]))
    bulk = stub.Embed(pb.EmbedRequest(inputs=[fresh("lane text")], priority=pb.PRIORITY_BULK))
    by_header = stub.Embed(pb.EmbedRequest(inputs=[fresh("lane text")]), metadata=(("x-embedserve-priority", "Bulk"),))
    field_wins = stub.Embed(
        pb.EmbedRequest(inputs=fresh_texts("lane text", 100), priority=pb.PRIORITY_INTERACTIVE),
        metadata=(("x-embedserve-priority", "bulk"),),
    )
    assert [lane for lane, _ in lanes.jobs] == ["interactive", "bulk", "bulk", "interactive"]
    for response in (bulk, by_header):
        assert response.timing.cached_inputs == 0 and decode(response).shape == (1, 384)
    assert len(field_wins.embeddings) == 100


def test_a_malformed_priority_header_is_invalid_argument_naming_the_values(server: RunningServer) -> None:
    metadata = (("x-embedserve-priority", "urgent"),)
    with pytest.raises(grpc.RpcError) as unary:
        server.stub().Embed(pb.EmbedRequest(inputs=["x"]), metadata=metadata)
    stream = server.stub().EmbedStream(
        iter([pb.EmbedStreamRequest(id="0", request=pb.EmbedRequest(inputs=["x"]))]), metadata=metadata
    )
    with pytest.raises(grpc.RpcError) as streamed:
        list(stream)
    for caught in (unary, streamed):
        error = caught.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-embedserve-priority must be interactive or bulk, got 'urgent'" in str(error.details())


def test_on_cpu_queries_run_on_a_thread_of_their_own_and_bulk_on_two_forward_workers(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = settled(server)
    threads: list[tuple[int, str]] = []
    nice: dict[str, int] = {}
    real_run = scheduler._run_batch

    def run_batch(items: Any) -> Any:
        threads.append((len(items), threading.current_thread().name))
        nice[threading.current_thread().name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return real_run(items)

    monkeypatch.setattr(scheduler, "_run_batch", run_batch)
    stub = server.stub()
    stub.Embed(pb.EmbedRequest(inputs=[fresh("a query")]))
    size = server.settings.models[0].batch_size
    stub.Embed(pb.EmbedRequest(inputs=fresh_texts("document", 4 * size)))
    assert threads[0] == (1, threads[0][1]) and threads[0][1].startswith("interactive-")
    bulk_threads = {name for _, name in threads[1:]}
    assert all(name.startswith("forward-") for name in bulk_threads)
    assert len(bulk_threads) == 2  # four batches over the two bulk workers
    # Bulk passes and tokenizing yield the cores (WORKER_NICENESS); queries keep the process's priority.
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert server.settings.worker_niceness == 10
    assert nice[threads[0][1]] == base
    assert all(nice[name] == base + 10 for name in bulk_threads)
    tokenizer_nice = server.engine._tokenize_pool.submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ).result()
    assert tokenizer_nice == base + 10
