"""Bytes that are not (quite) protobuf, sent to every RPC through a channel without serializers,
so that invalid messages and strings that are not UTF-8 reach the server: a message that does
not decode is INVALID_ARGUMENT saying so; one that does is treated as any other request."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from hypothesis import event, given
from hypothesis import strategies as st

from embedserve.v1 import embedding_service_pb2 as pb
from tests.fuzz import answers
from tests.fuzz import strategies as fuzzed
from tests.fuzz.conftest import TIMEOUT_S, check_refusal, check_stream_error, fuzz

SERVICE = "/embedserve.v1.EmbeddingService/"


def decoded(cls: type[Message], raw: bytes) -> Any:
    """The message `raw` holds, as the server's protobuf runtime reads it; None when it does not
    decode."""
    try:
        return cls.FromString(raw)
    except DecodeError:
        return None


@fuzz(300)
@given(method=st.sampled_from(sorted(answers.UNARY)), data=st.data(), metadata=fuzzed.metadata())
def test_bytes_that_do_not_decode_are_invalid_argument_and_the_rest_are_requests(
    channel: grpc.Channel, method: str, data: st.DataObject, metadata: tuple[tuple[str, str], ...]
) -> None:
    request_type, response_type, check = answers.UNARY[method]
    raw = data.draw(fuzzed.raw_requests(fuzzed.REQUESTS[method]()), label="raw")
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SERVICE + method)
    request = decoded(request_type, raw)
    try:
        answer = call(raw, metadata=metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        code = check_refusal(error)
        if request is None and not metadata:  # else the metadata may be refused first
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert f"the {method} request is not a valid message" in (error.details() or "")
        return
    assert request is not None, f"{method} answered bytes that do not decode"
    check(request, response_type.FromString(answer))
    event("OK")


@fuzz(100)
@given(
    messages=st.lists(
        fuzzed.raw_requests(fuzzed.stream_requests().map(lambda requests: requests[0])), min_size=1, max_size=4
    )
)
def test_a_stream_answers_the_messages_before_one_that_does_not_decode_then_ends_invalid_argument(
    channel: grpc.Channel, messages: list[bytes]
) -> None:
    requests = [decoded(pb.EmbedStreamRequest, raw) for raw in messages]
    readable = requests[: requests.index(None)] if None in requests else requests
    call: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(SERVICE + "EmbedStream")
    responses = []
    try:
        for answer in call(iter(messages), timeout=TIMEOUT_S):
            responses.append(pb.EmbedStreamResponse.FromString(answer))
    except grpc.RpcError as error:
        assert None in requests, f"a stream of messages that all decode failed: {error}"
        assert check_refusal(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert "the EmbedStream request is not a valid message" in (error.details() or "")
    else:
        assert None not in requests, "a stream with a message that does not decode ended OK"
    # Ids may repeat (the bytes are random): answers and readable requests match as multisets,
    # each answer checked against some request with its id.
    assert sorted(r.id for r in responses) == sorted(r.id for r in readable)
    for response in responses:
        if response.HasField("error"):
            check_stream_error(response.error)
        else:
            candidates = [r for r in readable if r.id == response.id]
            failures = []
            for candidate in candidates:
                try:
                    answers.check_embed(candidate.request, response.response)
                    break
                except AssertionError as failure:
                    failures.append(failure)
            else:
                raise AssertionError(f"no request with id {response.id!r} matches its answer: {failures}")
