"""Safe retries over gRPC: a unary call with an `idempotency-key` runs once; a retry gets the stored
answer marked as a replay, another request under the key is FAILED_PRECONDITION (422 over REST),
a duplicate of a call still running is ABORTED; keys are per tenant and per method, and the store
is bounded in time and bytes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from embedserve.idempotency import ENTRY_OVERHEAD, LARGEST_SHARE
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_settings
from tests.held_engine import HeldEmbed

TENANTS = ("tenant-a-key", "tenant-b-key")
EMBED = "/embedserve.v1.EmbeddingService/Embed"
DENSE_ONLY = (ModelSettings(DEFAULT_DENSE_MODEL),)
TTL_S = 1.0


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[RunningServer, HeldEmbed]]:
    """A server with two tenants (API keys) that answers one unary call at a time."""
    running = RunningServer(make_settings(models=DENSE_ONLY, api_keys=TENANTS, max_concurrency=1))
    yield running, HeldEmbed(running)
    running.stop()


@pytest.fixture(scope="module")
def short_lived() -> Iterator[RunningServer]:
    """A server whose stored answers expire after TTL_S."""
    running = RunningServer(make_settings(models=DENSE_ONLY, idempotency_ttl=TTL_S))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small_store() -> Iterator[tuple[RunningServer, HeldEmbed]]:
    """A server whose store holds 23 KiB: ten one-input answers and half of one more, none over 2.9 KiB."""
    running = RunningServer(make_settings(models=DENSE_ONLY, idempotency_max_bytes=23 * 1024))
    yield running, HeldEmbed(running)
    running.stop()


def metadata(key: str, tenant: str | None = TENANTS[0]) -> tuple[tuple[str, str], ...]:
    auth = () if tenant is None else (("authorization", f"Bearer {tenant}"),)
    return (*auth, ("idempotency-key", key))


def embed(
    stub: pb_grpc.EmbeddingServiceStub, request: pb.EmbedRequest, md: tuple[tuple[str, str], ...]
) -> tuple[pb.EmbedResponse, dict[str, str]]:
    """The answer and its trailing metadata (where the server puts its headers)."""
    response, call = stub.Embed.with_call(request, metadata=md, timeout=60)
    return response, trailers(call)


def refusal(stub: pb_grpc.EmbeddingServiceStub, request: pb.EmbedRequest, md: tuple[tuple[str, str], ...]) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(request, metadata=md, timeout=60)
    error: grpc.Call = raised.value  # type: ignore[assignment]
    return error


def trailers(call: grpc.Call) -> dict[str, str]:
    """A finished call's trailing metadata (where the server puts its headers)."""
    return {m.key: m.value for m in call.trailing_metadata() or ()}  # type: ignore[attr-defined]


def test_a_retry_gets_the_stored_answer_marked_as_a_replay_and_the_model_runs_once(
    keyed: tuple[RunningServer, HeldEmbed],
) -> None:
    server, held = keyed
    stub = server.stub()
    request = pb.EmbedRequest(inputs=["retry me", "and me"])
    before = held.calls
    first, first_md = embed(stub, request, metadata("replay-1"))
    again, again_md = embed(stub, request, metadata("replay-1"))
    assert held.calls == before + 1
    assert "idempotent-replayed" not in first_md and again_md["idempotent-replayed"] == "true"
    # Byte for byte, timing included: the stored answer, not a second run.
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    assert first.timing.total_ms > 0


def test_encodings_of_one_message_match_and_a_changed_field_does_not(keyed: tuple[RunningServer, HeldEmbed]) -> None:
    server, held = keyed
    channel = grpc.insecure_channel(server.address)
    raw: grpc.UnaryUnaryMultiCallable[bytes, pb.EmbedResponse] = channel.unary_unary(
        EMBED, request_serializer=None, response_deserializer=pb.EmbedResponse.FromString
    )
    inputs = pb.EmbedRequest(inputs=["field order"]).SerializeToString()
    model = pb.EmbedRequest(model=DEFAULT_DENSE_MODEL).SerializeToString()
    before = held.calls
    first = raw(inputs + model, metadata=metadata("encoding-1"), timeout=60)
    again, call = raw.with_call(model + inputs, metadata=metadata("encoding-1"), timeout=60)
    assert held.calls == before + 1 and again == first
    assert trailers(call)["idempotent-replayed"] == "true"

    changed = pb.EmbedRequest(inputs=["field order"], model=DEFAULT_DENSE_MODEL, dimensions=64)
    error = refusal(server.stub(), changed, metadata("encoding-1"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different Embed request" in (error.details() or "") and "new key" in (error.details() or "")
    assert trailers(error)["embedserve-http-status"] == "422"
    assert held.calls == before + 1


def test_keys_are_scoped_per_method(keyed: tuple[RunningServer, HeldEmbed]) -> None:
    server, _ = keyed
    stub = server.stub()
    embed(stub, pb.EmbedRequest(inputs=["one key, two methods"]), metadata("method-1"))
    rerank, call = stub.Rerank.with_call(
        pb.RerankRequest(query="q", documents=["d1", "d2"]), metadata=metadata("method-1"), timeout=60
    )
    assert len(rerank.results) == 2
    assert "idempotent-replayed" not in trailers(call)


def refused_while_held(
    server: RunningServer, held: HeldEmbed, first: tuple[pb.EmbedRequest, str], second: tuple[pb.EmbedRequest, str]
) -> tuple[pb.EmbedResponse, grpc.Call]:
    """Sends `second` (request, key) while `first` is held at the engine: first's answer, second's error."""
    stub = server.stub()
    with ThreadPoolExecutor(1) as pool:
        with held.holding():
            before = held.calls
            running = pool.submit(embed, stub, first[0], metadata(first[1]))
            held.wait_for_calls(before + 1)
            error = refusal(stub, second[0], metadata(second[1]))
        return running.result(timeout=60)[0], error


def test_a_duplicate_of_a_call_still_running_is_aborted_and_then_replayed(
    keyed: tuple[RunningServer, HeldEmbed],
) -> None:
    server, held = keyed
    request = pb.EmbedRequest(inputs=["slow first call"])
    before = held.calls
    answer, error = refused_while_held(server, held, (request, "running-1"), (request, "running-1"))
    assert error.code() == grpc.StatusCode.ABORTED
    assert "still being answered" in (error.details() or "") and "retry later" in (error.details() or "")
    again, again_md = embed(server.stub(), request, metadata("running-1"))
    assert again_md["idempotent-replayed"] == "true" and again == answer
    assert held.calls == before + 1


def test_an_overloaded_first_call_is_not_stored_and_its_retry_runs(keyed: tuple[RunningServer, HeldEmbed]) -> None:
    server, held = keyed
    request = pb.EmbedRequest(inputs=["refused at first"])
    occupying = pb.EmbedRequest(inputs=["holds the only slot"])  # MAX_CONCURRENCY is 1
    _, error = refused_while_held(server, held, (occupying, "slot-1"), (request, "overload-1"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub = server.stub()
    answer, answer_md = embed(stub, request, metadata("overload-1"))
    assert "idempotent-replayed" not in answer_md and len(answer.embeddings) == 1
    assert embed(stub, request, metadata("overload-1"))[1]["idempotent-replayed"] == "true"


def test_a_cancelled_first_call_releases_its_key(keyed: tuple[RunningServer, HeldEmbed]) -> None:
    server, held = keyed
    stub = server.stub()
    request = pb.EmbedRequest(inputs=["cancelled at first"])
    with held.holding():
        before = held.calls
        future = stub.Embed.future(request, metadata=metadata("cancel-1"), timeout=60)
        held.wait_for_calls(before + 1)
        assert future.cancel()
    # The server learns of the cancellation a moment after the client; a duplicate until then
    # is ABORTED, as the message says: retry with backoff (bounded here).
    for attempt in range(50):
        try:
            answer, answer_md = embed(stub, request, metadata("cancel-1"))
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.ABORTED
            time.sleep(0.02 * (attempt + 1))
    else:
        raise AssertionError("the cancelled call's key was never released")
    assert "idempotent-replayed" not in answer_md and len(answer.embeddings) == 1


def test_tenants_never_see_each_others_answers(keyed: tuple[RunningServer, HeldEmbed]) -> None:
    server, held = keyed
    stub = server.stub()
    mine, theirs = pb.EmbedRequest(inputs=["tenant a's text"]), pb.EmbedRequest(inputs=["tenant b's text"])
    first, _ = embed(stub, mine, metadata("shared-key", TENANTS[0]))
    before = held.calls
    other, other_md = embed(stub, theirs, metadata("shared-key", TENANTS[1]))  # same key, not a's request
    same, same_md = embed(stub, theirs, metadata("shared-key", TENANTS[1]))
    assert "idempotent-replayed" not in other_md and held.calls == before + 1
    assert same_md["idempotent-replayed"] == "true" and same == other != first
    # Under b's key lies b's request, whatever a stored under the same key.
    assert refusal(stub, mine, metadata("shared-key", TENANTS[1])).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert embed(stub, mine, metadata("shared-key", TENANTS[0]))[0] == first


def test_a_final_client_error_is_stored_and_replayed(keyed: tuple[RunningServer, HeldEmbed]) -> None:
    server, _ = keyed
    stub = server.stub()
    request = pb.EmbedRequest(inputs=["x"], model="no-such-model")
    first = refusal(stub, request, metadata("error-1"))
    again = refusal(stub, request, metadata("error-1"))
    assert first.code() == again.code() == grpc.StatusCode.NOT_FOUND
    assert again.details() == first.details() and "no-such-model" in (first.details() or "")
    assert "idempotent-replayed" not in trailers(first) and trailers(again)["idempotent-replayed"] == "true"


@pytest.mark.parametrize(("key", "says"), [("", "is empty"), ("k" * 256, "256 characters"), ('"abc', "quoted")])
def test_a_key_that_cannot_be_one_is_invalid_argument(
    keyed: tuple[RunningServer, HeldEmbed], key: str, says: str
) -> None:
    server, held = keyed
    before = held.calls
    error = refusal(server.stub(), pb.EmbedRequest(inputs=["x"]), metadata(key))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (error.details() or "") and "1 to 255 printable ASCII characters" in (error.details() or "")
    assert held.calls == before


def test_the_drafts_quoted_form_is_the_same_key_and_255_characters_are_fine(
    keyed: tuple[RunningServer, HeldEmbed],
) -> None:
    server, _ = keyed
    stub = server.stub()
    key = "q" * 254 + '"'
    first, _ = embed(stub, pb.EmbedRequest(inputs=["quoted"]), metadata(key))
    again, again_md = embed(stub, pb.EmbedRequest(inputs=["quoted"]), metadata('"' + "q" * 254 + '\\""'))
    assert again_md["idempotent-replayed"] == "true" and again == first


def test_a_stream_with_a_key_is_invalid_argument(keyed: tuple[RunningServer, HeldEmbed]) -> None:
    server, _ = keyed
    requests = iter([pb.EmbedStreamRequest(id="1", request=pb.EmbedRequest(inputs=["x"]))])
    with pytest.raises(grpc.RpcError) as raised:
        list(server.stub().EmbedStream(requests, metadata=metadata("stream-1"), timeout=60))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unary calls" in (raised.value.details() or "")


def test_a_stored_answer_expires_after_the_ttl(short_lived: RunningServer) -> None:
    stub = short_lived.stub()
    sent = time.monotonic()
    first, _ = embed(stub, pb.EmbedRequest(inputs=["expires"]), metadata("expiry-1", None))
    answered = time.monotonic()
    if answered - sent < TTL_S / 2:  # stored after `sent`, so surely not expired yet
        assert embed(stub, pb.EmbedRequest(inputs=["expires"]), metadata("expiry-1", None))[0] == first
    time.sleep(max(0.0, answered + TTL_S + 0.05 - time.monotonic()))  # time itself is what is tested
    # Expired: the key is free again, for another request too.
    other, other_md = embed(stub, pb.EmbedRequest(inputs=["another request"]), metadata("expiry-1", None))
    assert "idempotent-replayed" not in other_md and len(other.embeddings) == 1


def test_the_byte_bound_drops_the_least_recently_used_and_refuses_large_answers(
    small_store: tuple[RunningServer, HeldEmbed],
) -> None:
    server, held = small_store
    stub = server.stub()
    budget = server.settings.idempotency_max_bytes

    def request(i: int) -> pb.EmbedRequest:
        return pb.EmbedRequest(inputs=[f"text {i:03d}"])

    probe, _ = embed(stub, request(999), metadata("key-999", None))
    entry = ENTRY_OVERHEAD + len(EMBED) + len("key-000") + 32 + probe.ByteSize()
    assert entry <= budget // LARGEST_SHARE < 4 * entry
    room = budget // entry  # the probe's entry is the first to go below
    for i in range(room):
        embed(stub, request(i), metadata(f"key-{i:03d}", None))
    assert embed(stub, request(0), metadata("key-000", None))[1]["idempotent-replayed"] == "true"  # used again
    embed(stub, request(room), metadata(f"key-{room:03d}", None))  # one more: key-001 goes, not key-000
    before = held.calls
    assert embed(stub, request(0), metadata("key-000", None))[1]["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in embed(stub, request(1), metadata("key-001", None))[1]
    assert held.calls == before + 1

    large = pb.EmbedRequest(inputs=[f"large {i}" for i in range(4)])
    answer, answer_md = embed(stub, large, metadata("large-1", None))
    assert answer_md["idempotency-stored"] == "false" and answer.ByteSize() > budget // LARGEST_SHARE
    _, retried_md = embed(stub, large, metadata("large-1", None))
    assert "idempotent-replayed" not in retried_md and held.calls == before + 3


def test_a_ttl_of_0_ignores_keys() -> None:
    server = RunningServer(make_settings(models=DENSE_ONLY, idempotency_ttl=0))
    try:
        stub = server.stub()
        for text in ("one", "another"):  # no mismatch, no replay: the key is not looked at
            answer, answer_md = embed(stub, pb.EmbedRequest(inputs=[text]), metadata("ignored-1", None))
            assert "idempotent-replayed" not in answer_md and len(answer.embeddings) == 1
        assert embed(stub, pb.EmbedRequest(inputs=["one"]), metadata("", None))[0].embeddings  # not even checked
    finally:
        server.stop()
