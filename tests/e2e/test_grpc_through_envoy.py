"""Native gRPC on Envoy's port: unary, the bidirectional stream, reflection (grpcurl), the client."""

from __future__ import annotations

import json
import subprocess

import grpc
import numpy as np
from embedserve_client import Client

from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.e2e.conftest import Gateway, grpc_vectors
from tests.integration.test_lifecycle import GRPCURL


def test_embed_stream_through_envoy_answers_every_id_once(gateway: Gateway, server: RunningServer) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(gateway.address))
    requests = [
        pb.EmbedStreamRequest(id=f"r{i}", request=pb.EmbedRequest(inputs=[f"text {i}", "x"])) for i in range(50)
    ]
    requests.append(pb.EmbedStreamRequest(id="bad", request=pb.EmbedRequest(inputs=[""])))
    responses = list(stub.EmbedStream(iter(requests), timeout=120))
    by_id = {r.id: r for r in responses}
    assert len(responses) == len(by_id) == 51
    assert by_id["bad"].error.status == "INVALID_ARGUMENT"
    direct = server.stub().Embed(pb.EmbedRequest(inputs=["text 7", "x"]))
    assert by_id["r7"].response.embeddings[0].float32_le == direct.embeddings[0].float32_le


def test_grpc_errors_keep_their_status_through_envoy(gateway: Gateway) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(gateway.address))
    try:
        stub.Embed(pb.EmbedRequest(inputs=["x"], model="no/such-model"), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "'no/such-model' is not served" in (error.details() or "")
    else:
        raise AssertionError("expected NOT_FOUND")


def test_grpcurl_lists_and_calls_embed_through_envoy(gateway: Gateway) -> None:
    listed = subprocess.run(
        [GRPCURL, "-plaintext", gateway.address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert {"embedserve.v1.EmbeddingService", "embedserve.v1.OpenAIService"} <= set(listed.stdout.split())
    called = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            "-d",
            json.dumps({"inputs": ["hi"], "encoding": "VECTOR_ENCODING_FLOAT"}),
            gateway.address,
            "embedserve.v1.EmbeddingService/Embed",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    assert len(json.loads(called.stdout)["embeddings"][0]["values"]) == 384


def test_python_client_bulk_helper_through_envoy_keeps_order(gateway: Gateway, server: RunningServer) -> None:
    texts = [f"bulk text number {i}" for i in range(600)]
    with Client(gateway.address) as client:
        vectors = np.stack(list(client.bulk_embed(texts, batch_size=64)))
    assert vectors.shape == (600, 384)
    np.testing.assert_array_equal(vectors[[0, 599]], grpc_vectors(server, [texts[0], texts[599]]))
