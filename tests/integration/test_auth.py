"""API keys: EmbeddingService needs `authorization: Bearer <key>`; health and reflection stay open."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedserve.app import SERVICE_NAME
from embedserve.auth import ApiKeyInterceptor
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer, make_settings
from tests.integration.test_lifecycle import GRPCURL
from tests.texts import fresh

KEYS = ("secret-1", "secret-2")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def startup_log() -> list[str]:
    """What embedserve.app logs while the keyed server starts."""
    return []


@pytest.fixture(scope="module")
def keyed_server(startup_log: list[str]) -> Iterator[RunningServer]:
    """A server that requires one of KEYS."""
    records = _Records()
    logger = logging.getLogger("embedserve.app")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        running = RunningServer(make_settings(models=(ModelSettings(DEFAULT_DENSE_MODEL),), api_keys=KEYS))
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    startup_log.extend(records.messages)
    yield running
    running.stop()


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def embed_stream(server: RunningServer, metadata: tuple[tuple[str, str], ...] | None) -> list[pb.EmbedStreamResponse]:
    requests = iter([pb.EmbedStreamRequest(id="a", request=pb.EmbedRequest(inputs=["hello"]))])
    return list(server.stub().EmbedStream(requests, metadata=metadata, timeout=30))


RPCS: dict[str, Callable[[RunningServer, tuple[tuple[str, str], ...] | None], object]] = {
    "Embed": lambda s, md: s.stub().Embed(pb.EmbedRequest(inputs=["hello"]), metadata=md, timeout=30),
    "ListModels": lambda s, md: s.stub().ListModels(pb.ListModelsRequest(), metadata=md, timeout=30),
    "EmbedStream": embed_stream,
}


@pytest.mark.parametrize("rpc", list(RPCS))
def test_a_call_without_a_key_is_unauthenticated_and_says_what_to_send(keyed_server: RunningServer, rpc: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        RPCS[rpc](keyed_server, None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <key>" in (caught.value.details() or "")


@pytest.mark.parametrize("rpc", list(RPCS))
def test_a_wrong_key_is_unauthenticated(keyed_server: RunningServer, rpc: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        RPCS[rpc](keyed_server, bearer("secret-3"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid" in (caught.value.details() or "")


@pytest.mark.parametrize(
    "value", ["secret-1", "Basic secret-1", "Bearer", "Bearer secret-1x", "Bearer secret"], ids=repr
)
def test_authorization_that_is_not_bearer_and_a_configured_key_is_unauthenticated(
    keyed_server: RunningServer, value: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        RPCS["Embed"](keyed_server, (("authorization", value),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer <key>" in (caught.value.details() or "")


@pytest.mark.parametrize("rpc", list(RPCS))
def test_any_configured_key_is_accepted(keyed_server: RunningServer, rpc: str) -> None:
    for key in KEYS:
        assert RPCS[rpc](keyed_server, bearer(key))


def test_the_key_works_for_every_embedding_rpc(keyed_server: RunningServer) -> None:
    response = keyed_server.stub().Embed(pb.EmbedRequest(inputs=["hello"]), metadata=bearer("secret-2"), timeout=30)
    assert len(response.embeddings) == 1 and len(response.embeddings[0].float32_le) == 384 * 4
    [answer] = embed_stream(keyed_server, bearer("secret-2"))
    assert answer.id == "a" and not answer.HasField("error")


def test_health_needs_no_key(keyed_server: RunningServer) -> None:
    with grpc.insecure_channel(keyed_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_no_key_and_grpcurl_calls_embed_with_one(keyed_server: RunningServer) -> None:
    listed = subprocess.run(
        [GRPCURL, "-plaintext", keyed_server.address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert SERVICE_NAME in listed.stdout.split()
    embed = [GRPCURL, "-plaintext", "-d", '{"inputs": ["hi"]}']
    target = [keyed_server.address, f"{SERVICE_NAME}/Embed"]
    refused = subprocess.run([*embed, *target], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    called = subprocess.run(
        [*embed, "-H", "authorization: Bearer secret-1", *target], capture_output=True, text=True, timeout=60
    )
    assert called.returncode == 0, called.stderr


def test_the_startup_log_says_keys_are_required_and_never_shows_them(
    keyed_server: RunningServer, startup_log: list[str]
) -> None:
    serving = [line for line in startup_log if "serving embedserve.v1.EmbeddingService" in line]
    assert serving and "API key required" in serving[0]
    assert not any(key in line for line in startup_log for key in KEYS)


def test_the_interceptor_reads_bytes_metadata_and_the_last_authorization_value() -> None:
    interceptor = ApiKeyInterceptor(["", "k"], [SERVICE_NAME])
    assert interceptor.check((("authorization", b"Bearer k"),)) is None
    assert interceptor.check((("authorization", "bearer  k "),)) is None
    assert interceptor.check((("authorization", "Bearer k"), ("authorization", "Bearer x"))) is not None
    assert interceptor.check(None) is not None


def test_an_interceptor_without_keys_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ApiKeyInterceptor(["", ""], [SERVICE_NAME])


def test_each_api_key_is_its_own_tenant_named_by_a_fingerprint_not_the_key(
    keyed_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_embed import LaneRecorder

    lanes = LaneRecorder(keyed_server, monkeypatch)
    stub = keyed_server.stub()
    for key in (*KEYS, KEYS[0]):
        stub.Embed(pb.EmbedRequest(inputs=[fresh("tenant text")]), metadata=bearer(key))
    tenants = [tenant for _, tenant in lanes.jobs]
    assert tenants[0] == tenants[2] != tenants[1]
    assert all(tenant and key not in tenant for tenant in tenants for key in KEYS)
