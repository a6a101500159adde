"""The fuzz suite's fixtures and oracle: which failures a hostile request may get, and that the
server still serves once a test's examples are through.

Examples run one at a time against the session's real servers (tests/conftest.py's `server`,
`gateway`), with a fixed number of examples drawn from a fixed seed, so
that CI runs the same requests every time in bounded time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, settings

from embedserve.errors import (
    STATUS_CODES,
    InvalidInputError,
    ModelNotFoundError,
    UnauthenticatedError,
    WrongModelKindError,
)
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_settings
from tests.e2e.conftest import KEYS

# EMBEDSERVE_FUZZ_SCALE=10 runs ten times the examples, and EMBEDSERVE_FUZZ_RANDOM=1 draws them
# from a random seed (a deeper or other search, outside CI; hypothesis prints how to reproduce a
# failure it finds).
SCALE = float(os.environ.get("EMBEDSERVE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Hypothesis settings for a test of `examples` requests: the same ones on every run
    (derandomized, no example database, unless told otherwise), no per-example deadline (a
    long text takes what it takes on a busy CI machine). The fixtures are session- and
    module-scoped servers and channels; the function-scoped `still_serving` runs once per
    test, after all its examples, as it should, hence the health check suppressed."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        derandomize=os.environ.get("EMBEDSERVE_FUZZ_RANDOM") != "1",
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# The failures a request can earn by itself: the codes of the errors about the request (errors.py's
# table). Not the other codes of that table: INTERNAL is a bug by its own definition, and
# overload, deadline, cancellation and idle-stream errors need conditions this suite never makes
# (it sends one request at a time, below every size limit, with a generous deadline, to an idle
# server). UNKNOWN is in no table: an exception that escaped grpc's handling.
ALLOWED_CODES = frozenset(
    STATUS_CODES[error] for error in (InvalidInputError, ModelNotFoundError, WrongModelKindError, UnauthenticatedError)
)
# Errors quote the caller's names and texts cut short (errors.quoted), so a message stays far
# below gRPC's 8 KiB metadata limit, past which a client sees RESOURCE_EXHAUSTED instead.
MAX_MESSAGE_CHARS = 2000
TIMEOUT_S = 120.0


def check_refusal(error: grpc.RpcError) -> grpc.StatusCode:
    """Asserts that a failed call got a code for a bad request with a message that says what
    is wrong, short; returns the code."""
    assert isinstance(error, grpc.Call), error
    code, details = error.code(), error.details() or ""
    assert code in ALLOWED_CODES, f"{code}: {details[:1000]}"
    assert details.strip(), f"{code} without a message"
    assert len(details) <= MAX_MESSAGE_CHARS, f"{code} with a {len(details)}-character message: {details[:300]}"
    event(code.name)  # pytest --hypothesis-show-statistics: how often each code came
    return code


def check_stream_error(error: pb.Error) -> None:
    """The same for the in-band error of one request on a stream."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), None)
    assert code in ALLOWED_CODES, error
    assert code is not None and error.status == code.name, error
    assert error.message.strip() and len(error.message) <= MAX_MESSAGE_CHARS, error


def assert_serving(address: str) -> None:
    """Health says SERVING and a plain request is answered."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answer = pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(inputs=["still serving"]), metadata=(("authorization", f"Bearer {KEYS[0]}"),), timeout=30
        )
        assert len(answer.embeddings) == 1


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    """A channel to `server` that accepts answers as large as the server may send."""
    limit = ("grpc.max_receive_message_length", server.settings.max_message_bytes)
    with grpc.insecure_channel(server.address, options=[limit]) as opened:
        yield opened


@pytest.fixture(scope="session")
def keyed_server() -> Iterator[RunningServer]:
    """A server that wants one of KEYS (the default dense model only)."""
    running = RunningServer(make_settings(models=(ModelSettings(DEFAULT_DENSE_MODEL),), api_keys=KEYS))
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def still_serving(server: RunningServer) -> Iterator[None]:
    """After each test, all its examples through: the default server still serves."""
    yield
    assert_serving(server.address)
