"""Three replicas behind one Envoy, as `make run REPLICAS=3` starts them (envoy/gateway.py
--with-server --replicas 3), on a tiny seeded dense model: a replica killed or rolled mid-run
costs a retry, never a failed call or a lost or repeated vector; a draining replica gets no new
call once Envoy's health checks have seen it; a call beyond Envoy's circuit breakers is refused
as an overload is."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from embedserve_client import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.process import load_gateway
from bench.tiny import cached_tiny_dense
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import CACHE_DIR
from tests.e2e.conftest import ROOT, free_port
from tests.e2e.test_launcher import Launcher
from tests.scrape import Scrape

gateway = load_gateway()

REPLICAS = 3
# envoy.yaml's health-check interval: a replica that reports NOT_SERVING gets no new call after two.
HEALTH_CHECK_INTERVAL_S = 1.0
# The replicas' DRAIN_DELAY: long enough to watch Envoy stop sending calls to a replica that still
# accepts them.
DRAIN_DELAY_S = 5.0
# How long a replica (re)started may take to load the tiny model and be healthy in Envoy again.
SERVING_S = 90.0
TEXTS = [f"text {i} of the replica run, about {i % 97} things" for i in range(20_000)]
EMBED = "embedserve.v1.EmbeddingService/Embed"
Vectors = npt.NDArray[np.float32]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports that nothing listens on right now."""
    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as bound:
                for port in range(base, base + count):
                    bound.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"found no {count} free consecutive ports")


class Replicas(Launcher):
    """The launcher with REPLICAS servers, replica i on gRPC port `grpc_port` + i and metrics port
    `metrics_port` + i; Envoy on `address`."""

    def __init__(self, model: Path) -> None:
        self.grpc_port, self.metrics_port, rest_port = free_port_run(REPLICAS), free_port_run(REPLICAS), free_port()
        self.address = f"127.0.0.1:{rest_port}"
        self.base_url = f"http://{self.address}"
        self.grpc_address = self.replica_address(0)
        self._follow([
            sys.executable, str(ROOT / "envoy" / "gateway.py"), "--with-server", "--replicas", str(REPLICAS),
            "--listen", self.address, "--upstream", self.grpc_address,
            "--", "--host", "127.0.0.1", "--port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
            "--model-names", str(model), "--cache-dir", str(CACHE_DIR),
            # 3 replicas on the CI's 2 cores: one thread each (the launcher warns of more).
            "--intra-op-threads", "1", "--forward-workers", "1", "--drain-delay", f"{DRAIN_DELAY_S:g}",
        ])  # fmt: skip

    def replica_address(self, i: int) -> str:
        """Replica i's own gRPC address."""
        return f"127.0.0.1:{self.grpc_port + i}"

    def scrape(self, i: int) -> Scrape:
        """Replica i's metrics."""
        return Scrape(f"http://127.0.0.1:{self.metrics_port + i}/metrics")

    def healthy_in_envoy(self) -> float:
        """The replicas Envoy counts healthy now (health checks passed, not ejected)."""
        scrape = Scrape(self.base_url + "/metrics/envoy")
        return scrape.value("envoy_cluster_membership_healthy", envoy_cluster_name="embedserve")

    def envoy_view(self) -> str:
        """What Envoy's cluster of replicas has seen (its counters and gauges that are not 0),
        for a failed assertion to show."""
        scrape = Scrape(self.base_url + "/metrics/envoy")
        found = [
            f"{sample.name[len('envoy_cluster_') :]}={sample.value:g}"
            for family in scrape.families.values()
            for sample in family.samples
            if sample.name.startswith("envoy_cluster_")
            and sample.labels.get("envoy_cluster_name") == "embedserve"
            and sample.value
            and not sample.name.endswith(("_bucket", "_sum", "_count"))
        ]
        return "Envoy's cluster: " + ", ".join(sorted(found))

    def envoy_retries(self) -> float:
        """Calls Envoy has retried so far."""
        scrape = Scrape(self.base_url + "/metrics/envoy")
        return scrape.value("envoy_cluster_upstream_rq_retry_total", envoy_cluster_name="embedserve")

    def await_all_serving(self) -> None:
        """Waits until Envoy counts every replica healthy."""
        deadline = time.monotonic() + SERVING_S
        while (healthy := self.healthy_in_envoy()) < REPLICAS:
            assert time.monotonic() < deadline, f"{healthy:g} of {REPLICAS} replicas healthy:\n{self.log}"
            time.sleep(0.1)

    def await_restart(self, i: int, pid: int, after: int, exit_code: str) -> None:
        """Waits until replica i (pid `pid`) has exited, as `exit_code` says ("with 0", "on SIGKILL"),
        and the launcher's new one serves in Envoy."""
        self.wait_for(rf"gateway: server-{i} \(pid {pid}\) exited {exit_code}; restarting", after=after, timeout=60)
        self.wait_for(rf"gateway: server-{i} restarted \(pid \d+\)", after=after, timeout=30)
        self.await_all_serving()

    def roll(self, i: int) -> None:
        """Rolls replica i: SIGTERM, an exit 0 after its drain, started again, serving."""
        pid, mark = self.pid(f"server-{i}"), len(self.lines)
        os.kill(pid, signal.SIGTERM)
        self.await_restart(i, pid, mark, "with 0")


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    """The launcher and its replicas, all serving; SIGTERM after the tests stops them all and
    the launcher exits 0."""
    running = Replicas(cached_tiny_dense(CACHE_DIR, hidden_size=32))
    try:
        running.wait_for(r"gateway: envoy started", timeout=SERVING_S)
        running.await_all_serving()
        yield running
    finally:
        code, log = running.stop()
    assert code == 0, log
    assert log.count("embedserve.app: stopped") >= REPLICAS  # each drained and said so


@pytest.fixture(scope="module")
def reference(replicas: Replicas) -> Vectors:
    """TEXTS' vectors from one server alone (replica 0, straight to its port)."""
    with Client(replicas.replica_address(0)) as client:
        return np.stack(list(client.bulk_embed(TEXTS)))


def assert_vectors(got: list[Vectors], reference: Vectors) -> None:
    """Every vector once, in order: the n-th is the reference's of TEXTS[n % len(TEXTS)]."""
    passes = -(-len(got) // len(reference))
    np.testing.assert_allclose(np.stack(got), np.tile(reference, (passes, 1))[: len(got)], atol=1e-5)


def embed_stub(address: str) -> pb_grpc.EmbeddingServiceStub:
    return pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(address))


def vector_of(response: pb.EmbedResponse) -> Vectors:
    return np.frombuffer(response.embeddings[0].float32_le, "<f4")


def test_calls_beyond_envoys_circuit_breakers_are_resource_exhausted_and_429(replicas: Replicas) -> None:
    workdir = tempfile.TemporaryDirectory(prefix="embedserve-envoy-")
    listen = f"127.0.0.1:{free_port()}"
    upstreams = [replicas.replica_address(i) for i in range(REPLICAS)]
    config = gateway.write_config(Path(workdir.name), listen, upstreams, metrics="", max_requests=2)
    envoy = gateway.start(config, listen)
    channel = grpc.insecure_channel(listen)
    stub = pb_grpc.EmbeddingServiceStub(channel)
    held: list[queue.SimpleQueue[pb.EmbedStreamRequest | None]] = []
    streams: list[Iterator[pb.EmbedStreamResponse]] = []  # kept: a call whose answers are dropped is cancelled
    try:
        for n in range(2):  # two open streams: as many calls in flight as this Envoy allows
            requests: queue.SimpleQueue[pb.EmbedStreamRequest | None] = queue.SimpleQueue()
            held.append(requests)
            requests.put(pb.EmbedStreamRequest(id=str(n), request=pb.EmbedRequest(inputs=["held open"])))
            streams.append(stub.EmbedStream(iter(requests.get, None)))
            assert next(streams[-1]).id == str(n)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(inputs=["one too many"]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert "circuit breakers" in (refused.value.details() or "")
        response = httpx.post(f"http://{listen}/v1/embeddings", json={"input": "one too many"}, timeout=30)
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "resource_exhausted"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert "circuit breakers" in response.json()["error"]["message"]
        assert response.headers["retry-after"] == "1"
        for requests, answers in zip(held, streams, strict=True):  # the streams end: there is room again
            requests.put(None)
            assert list(answers) == []
        deadline = time.monotonic() + 10
        while True:
            try:
                assert len(stub.Embed(pb.EmbedRequest(inputs=["room again"]), timeout=30).embeddings) == 1
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, error
                time.sleep(0.05)
    finally:
        for requests in held:
            requests.put(None)
        channel.close()
        envoy.terminate()
        envoy.wait(timeout=30)
        workdir.cleanup()


def test_a_draining_replica_gets_no_new_call_after_two_health_check_intervals(replicas: Replicas) -> None:
    replicas.await_all_serving()
    stub = embed_stub(replicas.address)
    before = [replicas.scrape(i).value("embedserve_requests_total", rpc=EMBED) for i in range(REPLICAS)]
    for n in range(60):
        stub.Embed(pb.EmbedRequest(inputs=[TEXTS[n]]), timeout=30)
    counts = [replicas.scrape(i).value("embedserve_requests_total", rpc=EMBED) for i in range(REPLICAS)]
    each_got_calls = all(c > b for c, b in zip(counts, before, strict=True))
    assert each_got_calls, (before, counts, replicas.envoy_view())

    # A stream open on it, to see how it ends.
    requests: queue.SimpleQueue[pb.EmbedStreamRequest | None] = queue.SimpleQueue()
    requests.put(pb.EmbedStreamRequest(id="0", request=pb.EmbedRequest(inputs=["before the drain"])))
    stream = embed_stub(replicas.replica_address(1)).EmbedStream(iter(requests.get, None))
    assert next(stream).id == "0"

    pid, mark = replicas.pid("server-1"), len(replicas.lines)
    os.kill(pid, signal.SIGTERM)
    sigterm = time.monotonic()
    replicas.wait_for(r"shutting down: NOT_SERVING, still accepting new RPCs", after=mark, timeout=10)
    time.sleep(max(0.0, sigterm + 2 * HEALTH_CHECK_INTERVAL_S - time.monotonic()))  # the promise under test
    seen = replicas.scrape(1).value("embedserve_requests_total", rpc=EMBED)
    answered = 0
    while time.monotonic() < sigterm + 2 * HEALTH_CHECK_INTERVAL_S + 1.5:
        stub.Embed(pb.EmbedRequest(inputs=[TEXTS[answered]]), timeout=30)
        answered += 1
    assert replicas.scrape(1).value("embedserve_requests_total", rpc=EMBED) == seen
    assert answered > 10
    # Not because it refuses them: within its DRAIN_DELAY it still answers a call sent to it.
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(replicas.replica_address(1)))
    status = health.Check(health_pb2.HealthCheckRequest(service="embedserve.v1.EmbeddingService"), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert len(embed_stub(replicas.replica_address(1)).Embed(pb.EmbedRequest(inputs=["direct"])).embeddings) == 1
    assert time.monotonic() < sigterm + DRAIN_DELAY_S, "too slow to show that it still accepted calls"
    # Once it stops accepting, the stream ends with UNAVAILABLE, which clients re-send on.
    with pytest.raises(grpc.RpcError) as ended:
        next(stream)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
    assert "shutting down" in (ended.value.details() or "")
    assert time.monotonic() > sigterm + DRAIN_DELAY_S
    requests.put(None)
    replicas.await_restart(1, pid, mark, "with 0")


@pytest.mark.parametrize("killed", [1, 2])
def test_unary_embed_through_envoy_never_fails_while_replicas_are_killed(
    replicas: Replicas, reference: Vectors, killed: int
) -> None:
    """One replica killed; or two, the second a second after the first (the one left is all
    that Envoy may send to: with fewer than half healthy, its default would send to all)."""
    replicas.await_all_serving()
    stub = embed_stub(replicas.address)
    retries = replicas.envoy_retries()
    calls = Calls()

    def call_in_a_loop(thread: int) -> None:
        for n in itertools.count():
            index = (thread * 2_000 + n) % len(TEXTS)
            try:
                vector = vector_of(stub.Embed(pb.EmbedRequest(inputs=[TEXTS[index]]), timeout=30))
                np.testing.assert_allclose(vector, reference[index], atol=1e-5)
            except (grpc.RpcError, AssertionError) as error:
                calls.failed(error)
            if not calls.answered():
                return

    threads = [threading.Thread(target=call_in_a_loop, args=(t,), daemon=True) for t in range(8)]
    for thread in threads:
        thread.start()
    calls.await_count(8 * 20)
    victims = []
    for i in range(REPLICAS - killed, REPLICAS):
        victims.append((i, replicas.pid(f"server-{i}"), len(replicas.lines)))
        os.kill(victims[-1][1], signal.SIGKILL)
        calls.await_count(calls.count + 8 * 50)
    calls.await_count(calls.count + 8 * 50)
    calls.stop()
    for thread in threads:
        thread.join(timeout=60)
    assert calls.errors == []
    assert replicas.envoy_retries() > retries  # some were retried: they reached a dead replica first
    for i, pid, mark in victims:
        replicas.await_restart(i, pid, mark, "on SIGKILL")


class Calls:
    """Counts the calls of several threads and keeps their errors; `answered` says whether a
    thread should go on."""

    def __init__(self) -> None:
        self.count = 0
        self.errors: list[BaseException] = []
        self._stopping = False
        self._changed = threading.Condition()

    def answered(self) -> bool:
        with self._changed:
            self.count += 1
            self._changed.notify_all()
            return not self._stopping

    def failed(self, error: BaseException) -> None:
        with self._changed:
            self.errors.append(error)

    def await_count(self, count: int, timeout: float = 60.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.count >= count or self.errors, timeout), self.count
            assert not self.errors, self.errors[0]

    def stop(self) -> None:
        with self._changed:
            self._stopping = True


@pytest.mark.parametrize("streams", [1, 3])
def test_bulk_embed_through_envoy_loses_nothing_when_a_replica_is_killed_mid_run(
    replicas: Replicas, reference: Vectors, streams: int
) -> None:
    replicas.await_all_serving()
    got: list[Vectors] = []
    victim = pid = mark = -1
    with Client(replicas.address) as client:
        for vector in client.bulk_embed(TEXTS, streams=streams):
            got.append(vector)
            if len(got) == len(TEXTS) // 3:  # mid-run: kill a replica that has one of the streams
                open_streams = [replicas.scrape(i).value("embedserve_calls_in_flight", kind="stream") for i in range(3)]
                assert max(open_streams) > 0, open_streams
                victim = open_streams.index(max(open_streams))
                pid, mark = replicas.pid(f"server-{victim}"), len(replicas.lines)
                os.kill(pid, signal.SIGKILL)
    assert len(got) == len(TEXTS)
    assert_vectors(got, reference)
    replicas.await_restart(victim, pid, mark, "on SIGKILL")


def test_rolling_restart_of_every_replica_during_a_bulk_run_fails_nothing(
    replicas: Replicas, reference: Vectors
) -> None:
    replicas.await_all_serving()
    rolled = threading.Event()
    roll_errors: list[BaseException] = []

    def roll_each() -> None:
        try:
            for i in range(REPLICAS):
                replicas.roll(i)
        except BaseException as error:  # reported by the test's thread
            roll_errors.append(error)
        finally:
            rolled.set()

    def texts() -> Iterator[str]:
        """TEXTS over and over until the roll is done, and 2,000 more."""
        end: int | None = None
        for n in itertools.count():
            if end is None and rolled.is_set():
                end = n + 2_000
            if n == end or n == 100 * len(TEXTS):
                return
            yield TEXTS[n % len(TEXTS)]

    roller = threading.Thread(target=roll_each, daemon=True)
    unary = Calls()  # and unary calls beside it, none of which fails either

    def call_in_a_loop() -> None:
        stub = embed_stub(replicas.address)
        for n in itertools.count():
            try:
                stub.Embed(pb.EmbedRequest(inputs=[TEXTS[n % len(TEXTS)]]), timeout=30)
            except grpc.RpcError as error:
                unary.failed(error)
            if not unary.answered():
                return

    caller = threading.Thread(target=call_in_a_loop, daemon=True)
    got: list[Vectors] = []
    with Client(replicas.address) as client:
        for vector in client.bulk_embed(texts()):
            got.append(vector)
            if len(got) == 1_000:
                roller.start()
                caller.start()
    unary.stop()
    caller.join(timeout=60)
    roller.join(timeout=60)
    assert roll_errors == []
    assert len(got) < 100 * len(TEXTS), "the roll never ended"
    assert_vectors(got, reference)
    assert unary.errors == [] and unary.count > 0
