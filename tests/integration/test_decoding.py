"""A request that does not decode (corrupt bytes, a string field that is not UTF-8) gets
INVALID_ARGUMENT saying so, on unary RPCs and on a stream, and the server goes on serving."""

from __future__ import annotations

import grpc
import pytest

from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer

CORRUPT = b"\x12\xff\x01abc"  # field 2 (inputs) claims 255 bytes, 3 follow
NOT_UTF8 = b"\x12\x02\xff\xfe"  # field 2 (inputs): two bytes that are not UTF-8


@pytest.mark.parametrize("raw", [CORRUPT, NOT_UTF8], ids=["corrupt", "not-utf8"])
@pytest.mark.parametrize("method", ["Embed", "SparseEmbed", "Rerank"])
def test_a_unary_request_that_does_not_decode_is_invalid_argument(
    server: RunningServer, raw: bytes, method: str
) -> None:
    channel = grpc.insecure_channel(server.address)
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"/embedserve.v1.EmbeddingService/{method}"  # no serializers: bytes in, bytes out
    )
    with pytest.raises(grpc.RpcError) as failed:
        call(raw, timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the {method} request is not a valid message" in (failed.value.details() or "")
    assert len(server.stub().Embed(pb.EmbedRequest(inputs=["still serving"])).embeddings) == 1


def test_a_stream_message_that_does_not_decode_ends_the_stream_with_invalid_argument(server: RunningServer) -> None:
    good = pb.EmbedStreamRequest(id="0", request=pb.EmbedRequest(inputs=["fine"])).SerializeToString()
    channel = grpc.insecure_channel(server.address)
    call: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        "/embedserve.v1.EmbeddingService/EmbedStream"
    )
    answers = []
    with pytest.raises(grpc.RpcError) as failed:
        for answer in call(iter([good, b"\x0a\xff"]), timeout=30):
            answers.append(pb.EmbedStreamResponse.FromString(answer).id)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the EmbedStream request is not a valid message" in (failed.value.details() or "")
    assert answers == ["0"]  # the answer in flight was sent first
