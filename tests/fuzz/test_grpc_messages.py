"""Every RPC of embedserve.v1.EmbeddingService with generated messages and call metadata: each
call is answered in full (one result per input) or refused with a client error that says why,
never INTERNAL or UNKNOWN."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.e2e.conftest import KEYS
from tests.fuzz import answers
from tests.fuzz import strategies as fuzzed
from tests.fuzz.conftest import TIMEOUT_S, check_refusal, check_stream_error, fuzz

Metadata = tuple[tuple[str, str], ...]


@pytest.mark.parametrize("method", sorted(answers.UNARY))
@fuzz(200)
@given(data=st.data(), metadata=fuzzed.metadata())
def test_every_unary_rpc_answers_every_input_or_refuses_the_request(
    channel: grpc.Channel, method: str, data: st.DataObject, metadata: Metadata
) -> None:
    request = data.draw(fuzzed.REQUESTS[method](), label="request")
    rpc = getattr(pb_grpc.EmbeddingServiceStub(channel), method)
    try:
        response = rpc(request, metadata=metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        check_refusal(error)
        return
    answers.UNARY[method][2](request, response)
    event("OK")


@fuzz(100)
@given(requests=fuzzed.stream_requests(), metadata=fuzzed.metadata())
def test_embed_stream_answers_every_request_once_in_band_or_refuses_the_stream(
    channel: grpc.Channel, requests: list[pb.EmbedStreamRequest], metadata: Metadata
) -> None:
    stream = pb_grpc.EmbeddingServiceStub(channel).EmbedStream
    try:
        responses = list(stream(iter(requests), metadata=metadata, timeout=TIMEOUT_S))
    except grpc.RpcError as error:
        check_refusal(error)  # the stream as a whole (its metadata) refused
        return
    assert sorted(r.id for r in responses) == sorted(r.id for r in requests)
    by_id = {r.id: r for r in requests}
    for response in responses:
        if response.HasField("error"):
            check_stream_error(response.error)
            event(f"in band: {response.error.status}")
        else:
            answers.check_embed(by_id[response.id].request, response.response)
            event("in band: OK")


@fuzz(150)
@given(
    method=st.sampled_from(sorted(fuzzed.REQUESTS)),
    data=st.data(),
    authorization=st.sampled_from(
        ("Bearer rest-key-1", "Bearer rest-key-2", "bearer  rest-key-1 ", "Bearer rest-key-3", "rest-key-1", "")
    ),
    metadata=fuzzed.metadata(),
)
def test_a_keyed_server_refuses_bad_keys_as_unauthenticated_and_answers_good_ones(
    keyed_server: RunningServer, method: str, data: st.DataObject, authorization: str, metadata: Metadata
) -> None:
    request = data.draw(fuzzed.REQUESTS[method](), label="request")
    sent = ((("authorization", authorization),) if authorization else ()) + metadata
    with grpc.insecure_channel(keyed_server.address) as channel:
        rpc = getattr(pb_grpc.EmbeddingServiceStub(channel), method)
        try:
            response = rpc(request, metadata=sent, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            code = check_refusal(error)
        else:
            answers.UNARY[method][2](request, response)
            code = grpc.StatusCode.OK
            event("OK")
    keys = [value for key, value in sent if key == "authorization"]
    assert (code == grpc.StatusCode.UNAUTHENTICATED) == (not keys or not valid_key(keys[-1]))


def valid_key(authorization: str) -> bool:
    """Whether an authorization value carries one of KEYS: 'Bearer <key>', any case and spacing."""
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip() in KEYS
