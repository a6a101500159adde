"""The idempotency store on its own: claims, replays, mismatches, expiry and the byte bound, on a
clock the test moves; and how keys and fingerprints are read."""

from __future__ import annotations

import grpc
import pytest

from embedserve.errors import InvalidInputError
from embedserve.idempotency import (
    ENTRY_OVERHEAD,
    LARGEST_SHARE,
    Begun,
    IdempotencyStore,
    Outcome,
    Scope,
    fingerprint,
    idempotency_key,
)
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import openai_service_pb2 as rest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scope(key: str, tenant: str = "t") -> Scope:
    return (tenant, "/svc/M", key)


def size(s: Scope, response: bytes) -> int:
    return ENTRY_OVERHEAD + sum(map(len, s)) + 32 + len(response)


def test_the_first_call_runs_a_retry_replays_and_another_request_is_a_mismatch() -> None:
    store = IdempotencyStore(1 << 20, 60)
    assert store.begin(scope("k"), b"f" * 32) is Begun.RUN
    assert store.begin(scope("k"), b"f" * 32) is Begun.IN_FLIGHT
    assert store.begin(scope("k"), b"g" * 32) is Begun.MISMATCH
    assert store.finish(scope("k"), Outcome(b"answer"))
    assert store.begin(scope("k"), b"f" * 32) == Outcome(b"answer")
    assert store.begin(scope("k"), b"g" * 32) is Begun.MISMATCH
    assert store.begin(scope("k", tenant="other"), b"g" * 32) is Begun.RUN  # scoped per tenant
    assert store.bytes == size(scope("k"), b"answer") and len(store) == 1


def test_a_released_key_runs_again_and_an_error_is_stored_as_status_and_message() -> None:
    store = IdempotencyStore(1 << 20, 60)
    assert store.begin(scope("k"), b"f" * 32) is Begun.RUN
    store.release(scope("k"))
    assert store.begin(scope("k"), b"g" * 32) is Begun.RUN
    error = Outcome(None, grpc.StatusCode.NOT_FOUND, "no model 'x'")
    assert store.finish(scope("k"), error)
    assert store.begin(scope("k"), b"g" * 32) == error
    assert not store.finish(scope("never begun"), Outcome(b"x"))


def test_entries_expire_ttl_seconds_after_their_call_ended() -> None:
    clock = Clock()
    store = IdempotencyStore(1 << 20, 10, clock)
    store.begin(scope("a"), b"f" * 32)
    clock.now += 5  # a slow call: the TTL counts from its end
    store.finish(scope("a"), Outcome(b"1"))
    clock.now += 9.9
    assert store.begin(scope("a"), b"f" * 32) == Outcome(b"1")  # a replay does not extend its life
    clock.now += 0.2
    assert store.begin(scope("a"), b"other" * 8) is Begun.RUN
    assert store.bytes == 0 and len(store) == 0


def test_the_least_recently_used_go_first_when_bytes_run_out() -> None:
    response = b"r" * 100
    entry = size(scope("k00"), response)
    store = IdempotencyStore(entry * 10 + entry // 2, 60)
    for i in range(10):
        store.begin(scope(f"k{i:02d}"), b"f" * 32)
        assert store.finish(scope(f"k{i:02d}"), Outcome(response))
    assert store.begin(scope("k00"), b"f" * 32) == Outcome(response)  # k00 used: k01 is now the oldest
    store.begin(scope("k10"), b"f" * 32)
    store.finish(scope("k10"), Outcome(response))
    assert len(store) == 10 and store.bytes <= store.max_bytes
    assert store.begin(scope("k01"), b"f" * 32) is Begun.RUN
    assert store.begin(scope("k00"), b"f" * 32) == Outcome(response)
    assert store.begin(scope("k02"), b"f" * 32) == Outcome(response)


def test_an_answer_over_a_share_of_the_store_is_not_kept_and_its_key_is_released() -> None:
    store = IdempotencyStore(64 * 1024, 60)
    assert store.max_entry_bytes == 64 * 1024 // LARGEST_SHARE
    store.begin(scope("big"), b"f" * 32)
    assert not store.finish(scope("big"), Outcome(b"x" * store.max_entry_bytes))
    assert store.begin(scope("big"), b"f" * 32) is Begun.RUN and store.bytes == 0


def test_a_flood_of_keys_stays_within_the_bound() -> None:
    store = IdempotencyStore(100_000, 60)
    for i in range(10_000):
        assert store.begin(scope(f"key-{i}"), b"f" * 32) is Begun.RUN
        store.finish(scope(f"key-{i}"), Outcome(b""))
    assert store.bytes <= 100_000 and len(store) == 100_000 // size(scope("key-9999"), b"")


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ((), None),
        ((("authorization", "Bearer x"),), None),
        ((("idempotency-key", " abc-123 "),), "abc-123"),
        ((("Idempotency-Key", '"8e03978e-40d5"'),), "8e03978e-40d5"),
        ((("idempotency-key", r'"a\"b\\c"'),), 'a"b\\c'),
        ((("idempotency-key", b"raw"),), "raw"),
        ((("idempotency-key", "k" * 255),), "k" * 255),
    ],
)
def test_a_key_is_read_bare_or_as_the_drafts_quoted_string(
    metadata: tuple[tuple[str, str | bytes], ...], key: str | None
) -> None:
    assert idempotency_key(metadata) == key


@pytest.mark.parametrize(
    ("value", "says"),
    [("", "empty"), ('""', "empty"), ("k" * 256, "256 characters"), ("caf\u00e9", "printable ASCII"), ('"a', "quoted")],
)
def test_a_key_that_cannot_be_one_says_what_to_send(value: str, says: str) -> None:
    with pytest.raises(InvalidInputError, match=says) as raised:
        idempotency_key((("idempotency-key", value),))
    assert "1 to 255 printable ASCII characters" in str(raised.value)


def test_two_keys_on_one_call_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="2 idempotency-key values"):
        idempotency_key((("idempotency-key", "a"), ("idempotency-key", "b")))


def test_a_fingerprint_is_of_the_message_not_its_encoding() -> None:
    one = pb.EmbedRequest.FromString(
        pb.EmbedRequest(inputs=["a"]).SerializeToString() + pb.EmbedRequest(model="m").SerializeToString()
    )
    other = pb.EmbedRequest.FromString(
        pb.EmbedRequest(model="m").SerializeToString() + pb.EmbedRequest(inputs=["a"]).SerializeToString()
    )
    method = "/embedserve.v1.EmbeddingService/Embed"
    assert (
        fingerprint(method, one)
        == fingerprint(method, other)
        == fingerprint(method, pb.EmbedRequest(inputs=["a"], model="m"))
    )
    assert fingerprint(method, one) != fingerprint(method, pb.EmbedRequest(inputs=["a"], model="m", dimensions=8))
    assert fingerprint(method, rest.ListModelObjectsRequest()) != fingerprint(
        "/other/M", rest.ListModelObjectsRequest()
    )
