"""Startup logs, health, reflection (grpcurl), load, cancellation and SIGTERM draining."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.process import ServerProcess
from embedserve.kinds import Capability
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import CACHE_DIR, RunningServer
from tests.texts import fresh, fresh_texts

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
LONG = " ".join(["load"] * 200)  # 202 tokens
MEDIUM = " ".join(["load"] * 20)


def health_status(address: str, service: str = "") -> int:
    """The server's answer to grpc.health.v1.Health/Check."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


def test_health_reports_serving_for_the_server_and_the_service(server: RunningServer) -> None:
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.address, "embedserve.v1.EmbeddingService") == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_lists_the_service_through_reflection_and_calls_embed(server: RunningServer) -> None:
    listed = subprocess.run([GRPCURL, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "embedserve.v1.EmbeddingService" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    body = json.dumps({"inputs": ["hello from grpcurl"], "encoding": "VECTOR_ENCODING_FLOAT"})
    called = subprocess.run(
        [GRPCURL, "-plaintext", "-d", body, server.address, "embedserve.v1.EmbeddingService/Embed"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    response = json.loads(called.stdout)
    direct = server.stub().Embed(pb.EmbedRequest(inputs=["hello from grpcurl"], encoding=pb.VECTOR_ENCODING_FLOAT))
    assert response["embeddings"][0]["values"] == pytest.approx(list(direct.embeddings[0].values), abs=1e-6)
    assert response["usage"]["prompt_tokens"] == direct.usage.prompt_tokens > 0


def test_health_answers_within_50ms_at_full_load(server: RunningServer) -> None:
    stub = server.stub()
    load = [stub.Embed.future(pb.EmbedRequest(inputs=fresh_texts(LONG, 64)), timeout=300) for _ in range(4)]
    time.sleep(0.5)  # let the queue fill and the worker run
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connect first
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    assert not all(f.done() for f in load), "load finished before the health checks: not at full load"
    # The queue holds QUEUE_SECONDS of work: what is beyond it is shed, and the rest answered.
    codes = [future.code() for future in load]
    # (The four arrive together, in any order: whichever came first was admitted.)
    assert grpc.StatusCode.OK in codes and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.05, latencies


def test_small_request_behind_a_2048_input_request_is_not_starved(server: RunningServer) -> None:
    stub = server.stub()
    big = stub.Embed.future(pb.EmbedRequest(inputs=fresh_texts(MEDIUM, 2048)), timeout=600)
    time.sleep(0.3)
    started = time.perf_counter()
    stub.Embed(pb.EmbedRequest(inputs=[fresh("small")]), timeout=60)
    small_s = time.perf_counter() - started
    assert not big.done(), "the large request finished first: the small one was not interleaved"
    big_response = big.result()
    assert len(big_response.embeddings) == 2048
    assert small_s < big_response.timing.total_ms / 1e3 / 4


def test_cancelled_request_drops_its_queued_work(server: RunningServer) -> None:
    stub = server.stub()
    scheduler = server.engine.registry.find("", Capability.EMBED).scheduler
    call = stub.Embed.future(pb.EmbedRequest(inputs=fresh_texts(MEDIUM, 2048)), timeout=600)
    deadline = time.monotonic() + 10
    while scheduler.queued < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.queued >= 1000
    call.cancel()
    deadline = time.monotonic() + 10
    while scheduler.queued > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.queued == 0
    with pytest.raises(grpc.FutureCancelledError):
        call.result()


def test_expired_deadline_is_deadline_exceeded_and_work_is_dropped(server: RunningServer) -> None:
    stub = server.stub()
    scheduler = server.engine.registry.find("", Capability.EMBED).scheduler
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(inputs=fresh_texts(MEDIUM, 2048)), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while scheduler.queued > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.queued == 0


@pytest.fixture(scope="module")
def process() -> Iterator[ServerProcess]:
    """A server started as a separate process, for signals and logs."""
    started = ServerProcess(["--cache-dir", str(CACHE_DIR), "--grace-period", "60"])
    yield started
    if started.proc.poll() is None:
        started.proc.kill()


def test_startup_log_names_model_backend_provider_dtype_and_load_time(process: ServerProcess) -> None:
    line = next(line for line in process.lines if "loaded model" in line)
    assert "sentence-transformers/all-MiniLM-L6-v2" in line
    assert "backend onnx" in line and "provider CPUExecutionProvider" in line and "dtype fp32" in line
    assert re.search(r"in \d+\.\d s", line)
    # The event loop (EVENT_LOOP=auto: uvloop, a dependency) and the bulk workers' priority.
    assert "event loop: uvloop" in next(line for line in process.lines if "serving embedserve.v1" in line)
    assert "at nice +10" in next(line for line in process.lines if "bulk forward worker" in line)


def test_sigterm_finishes_in_flight_requests_then_exits_zero(process: ServerProcess) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(process.address))
    in_flight = stub.Embed.future(pb.EmbedRequest(inputs=fresh_texts(LONG, 96)), timeout=120)
    time.sleep(0.5)
    process.proc.send_signal(signal.SIGTERM)
    response = in_flight.result()
    assert len(response.embeddings) == 96
    assert process.proc.wait(timeout=60) == 0
    assert "NOT_SERVING" in process.log
    with pytest.raises(grpc.RpcError):
        stub.Embed(pb.EmbedRequest(inputs=["after shutdown"]), timeout=5)
