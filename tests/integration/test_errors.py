"""Every bad request gets its precise status code and a message that says what to change."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer, make_settings
from tests.texts import fresh_texts


def error_of(call: Callable[..., object], request: object) -> grpc.Call:
    """Calls a unary stub method and returns the error it must raise."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    error = caught.value
    assert isinstance(error, grpc.Call)  # grpc's errors are also the failed call
    return error


def test_unknown_model_is_not_found_and_lists_served_models(server: RunningServer) -> None:
    error = error_of(server.stub().Embed, pb.EmbedRequest(model="no/such-model", inputs=["x"]))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no/such-model" in str(error.details()) and DEFAULT_DENSE_MODEL in str(error.details())


@pytest.mark.parametrize("size", [8 * 1024, 100 * 1024])
def test_long_names_are_echoed_cut_and_keep_their_precise_code(server: RunningServer, size: int) -> None:
    # Echoed whole, an 8 KB name made the error's metadata too large: RESOURCE_EXHAUSTED, not NOT_FOUND.
    name = "m" * size
    cases: list[tuple[Callable[..., object], object, grpc.StatusCode]] = [
        (server.stub().Embed, pb.EmbedRequest(model=name, inputs=["x"]), grpc.StatusCode.NOT_FOUND),
        (server.stub().Embed, pb.EmbedRequest(inputs=["x"], prompt_name=name), grpc.StatusCode.INVALID_ARGUMENT),
        (server.stub().SparseEmbed, pb.SparseEmbedRequest(model=name, inputs=["x"]), grpc.StatusCode.NOT_FOUND),
    ]
    for call, request, code in cases:
        error = error_of(call, request)
        assert error.code() == code
        details = str(error.details())
        assert f"({size} characters)" in details and len(details) < 1000


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.EmbedRequest(inputs=[]), "inputs is empty"),
        (pb.EmbedRequest(inputs=["ok", ""]), "inputs[1] is an empty string"),
        (pb.EmbedRequest(inputs=["x"] * 2049), "2049 texts but the limit is 2048"),
        (pb.EmbedRequest(inputs=["x"], dimensions=0), "between 1 and 384"),
        (pb.EmbedRequest(inputs=["x"], dimensions=385), "between 1 and 384"),
        (pb.EmbedRequest(inputs=["x"], prompt_name="query"), "no prompt named 'query'"),
        (pb.EmbedRequest(inputs=["x"], prompt_name="query", prompt="q: "), "not both"),
    ],
    ids=[
        "empty-inputs",
        "empty-string",
        "too-many-inputs",
        "dimensions-0",
        "dimensions-over",
        "unknown-prompt",
        "two-prompts",
    ],
)
def test_bad_embed_requests_are_invalid_argument(server: RunningServer, request_: pb.EmbedRequest, needle: str) -> None:
    error = error_of(server.stub().Embed, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in str(error.details())


def test_too_long_input_without_truncation_names_both_lengths(server: RunningServer) -> None:
    text = " ".join(["word"] * 600)
    error = error_of(server.stub().Embed, pb.EmbedRequest(inputs=["short", text], truncate=False))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1] has 602 tokens" in str(error.details()) and "at most 256" in str(error.details())
    assert "truncate=true" in str(error.details())


@pytest.fixture(scope="module")
def small_queue_server() -> Iterator[RunningServer]:
    """A server whose queue holds 64 inputs, to overflow on purpose."""
    running = RunningServer(make_settings(queue_size=64, max_inputs_per_request=64))
    yield running
    running.stop()


def test_full_queue_is_resource_exhausted_and_nothing_else_fails(small_queue_server: RunningServer) -> None:
    stub = small_queue_server.stub()
    text = " ".join(["queue"] * 100)
    futures = [stub.Embed.future(pb.EmbedRequest(inputs=fresh_texts(text, 64)), timeout=120) for _ in range(12)]
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "retry later" in str(error.details())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_stream_waits_for_queue_space_instead_of_failing(small_queue_server: RunningServer) -> None:
    """Streams get backpressure, not RESOURCE_EXHAUSTED: every request is answered."""
    texts = [" ".join(["queue"] * 50)] * 48

    def requests() -> Iterator[pb.EmbedStreamRequest]:
        for i in range(20):
            yield pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(inputs=texts))

    responses = list(small_queue_server.stub().EmbedStream(requests(), timeout=300))
    assert sorted(int(r.id) for r in responses) == list(range(20))
    assert all(r.WhichOneof("result") == "response" for r in responses)
