"""`make run`'s launcher (envoy/gateway.py --with-server): server and Envoy up, both down on
SIGTERM, and each restarted when it dies while the other keeps running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import CACHE_DIR
from tests.e2e.conftest import ROOT, free_port

SERVING = re.compile(r"serving embedserve\.v1\.EmbeddingService")
# How long a restarted server may take to load the dense model and serve again.
SERVER_START_S = 120.0
# How long Envoy may take to answer /health 200 again after a server restart: its health checks
# run every second (and a server that it could not reach twice in a row stays out for 5 s).
HEALTH_RECOVERY_S = 20.0


def test_with_server_serves_rest_and_stops_both_on_sigterm() -> None:
    grpc_port, rest_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        sys.executable, str(ROOT / "envoy" / "gateway.py"), "--with-server",
        "--listen", f"127.0.0.1:{rest_port}", "--upstream", f"127.0.0.1:{grpc_port}",
        "--", "--host", "127.0.0.1", "--port", str(grpc_port), "--model-names", DEFAULT_DENSE_MODEL,
        "--cache-dir", str(CACHE_DIR), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen: list[str] = []
    try:
        for line in process.stderr:  # both announce themselves; the server once its model is loaded
            seen.append(line)
            if "serving embedserve.v1.EmbeddingService" in line:
                break
        assert any("envoy: REST and gRPC on" in line for line in seen), "".join(seen)
        models = httpx.get(f"http://127.0.0.1:{rest_port}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [DEFAULT_DENSE_MODEL]
        # Envoy forwards /metrics to the METRICS_PORT the server's arguments set.
        metrics = httpx.get(f"http://127.0.0.1:{rest_port}/metrics", timeout=30)
        assert metrics.status_code == 200 and "embedserve_requests_total{" in metrics.text
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=90)[1]
    assert process.returncode == 0, "".join(seen) + rest
    assert "stopped" in rest  # the server drained and said so
    with pytest.raises(ConnectionRefusedError):  # Envoy is gone too
        socket.create_connection(("127.0.0.1", rest_port), timeout=5)


class Launcher:
    """envoy/gateway.py --with-server on free loopback ports, serving the dense model only; a
    thread keeps every line it (and its children) log, so that a test can wait for one."""

    def __init__(self) -> None:
        grpc_port, rest_port, metrics_port = free_port(), free_port(), free_port()
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.base_url = f"http://127.0.0.1:{rest_port}"
        command = [
            sys.executable, str(ROOT / "envoy" / "gateway.py"), "--with-server",
            "--listen", f"127.0.0.1:{rest_port}", "--upstream", self.grpc_address,
            "--", "--host", "127.0.0.1", "--port", str(grpc_port), "--model-names", DEFAULT_DENSE_MODEL,
            "--cache-dir", str(CACHE_DIR), "--metrics-port", str(metrics_port),
        ]  # fmt: skip
        self._follow(command)

    def _follow(self, command: list[str]) -> None:
        """Starts `command` and keeps every line it logs."""
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for(
        self, pattern: str | re.Pattern[str], after: int = 0, timeout: float = 30.0
    ) -> tuple[int, re.Match[str]]:
        """The first line from index `after` on that matches `pattern` (its index and match),
        waiting for it at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        searched = after
        with self._changed:
            while True:
                for index in range(searched, len(self.lines)):
                    if match := re.search(pattern, self.lines[index]):
                        return index, match
                searched = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    raise AssertionError(f"no line matches {pattern!r}:\n{self.log}")
                self._changed.wait(remaining)

    def pid(self, name: str) -> int:
        """The pid of the launcher's child `name` ("server" or "envoy"), as it last logged it."""
        with self._changed:
            pids = [m[1] for line in self.lines if (m := re.search(rf"gateway: {name} \w+ \(pid (\d+)\)", line))]
        assert pids, self.log
        return int(pids[-1])

    def is_child(self, pid: int) -> bool:
        """Whether `pid` runs and is a child of the launcher (Linux /proc)."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return fields[0] != "Z" and int(fields[1]) == self.process.pid

    @property
    def log(self) -> str:
        """Everything logged so far."""
        return "".join(self.lines)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; returns the exit code and the log."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        with self._changed:  # the last lines, up to the pipe's end
            self._changed.wait_for(lambda: self._closed, timeout=30)
        return code, self.log


class DirectCalls:
    """Embed calls straight to the server's own port, one after another in a thread until
    `stop`, counting the answers and keeping every error."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self.answered = 0
        self.errors: list[grpc.RpcError] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._stub.Embed(pb.EmbedRequest(inputs=["still here?"]), timeout=30)
                self.answered += 1
            except grpc.RpcError as error:
                self.errors.append(error)

    def stop(self) -> None:
        """Stops after the call in flight."""
        self._stopping.set()
        self._thread.join(timeout=60)
        self._channel.close()


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    """One launcher for the restart tests, serving; SIGTERM after them still stops both and
    exits 0."""
    running = Launcher()
    try:
        running.wait_for(SERVING, timeout=SERVER_START_S)
        yield running
    finally:
        code, log = running.stop()
    assert code == 0, log
    assert "stopped" in log  # the server drained and said so


def test_killed_envoy_is_restarted_while_the_server_serves_on(launcher: Launcher) -> None:
    server_pid, envoy_pid = launcher.pid("server"), launcher.pid("envoy")
    assert httpx.get(launcher.base_url + "/v1/models", timeout=30).status_code == 200
    direct = DirectCalls(launcher.grpc_address)
    try:
        launcher.wait_for(SERVING)  # (already logged) the direct calls have a server to talk to
        mark = len(launcher.lines)
        os.kill(envoy_pid, signal.SIGKILL)
        launcher.wait_for(
            rf"gateway: envoy \(pid {envoy_pid}\) exited on SIGKILL; restarting it in [\d.]+ s, server untouched",
            after=mark,
        )
        answered_while_down = direct.answered
        # Logged once the new Envoy accepts connections.
        _, restarted = launcher.wait_for(r"gateway: envoy restarted \(pid (\d+)\)", after=mark)
        models = httpx.get(launcher.base_url + "/v1/models", timeout=30)
        assert models.status_code == 200, models.text
        assert [m["id"] for m in models.json()["data"]] == [DEFAULT_DENSE_MODEL]
    finally:
        direct.stop()
    assert int(restarted[1]) != envoy_pid and launcher.is_child(int(restarted[1]))
    assert direct.errors == []
    assert direct.answered > answered_while_down  # the server answered while Envoy restarted
    assert launcher.pid("server") == server_pid and launcher.is_child(server_pid)
    assert "server (pid" not in "".join(launcher.lines[mark:]), launcher.log


def test_killed_server_is_restarted_and_rest_answers_again(launcher: Launcher) -> None:
    server_pid, envoy_pid = launcher.pid("server"), launcher.pid("envoy")
    mark = len(launcher.lines)
    os.kill(server_pid, signal.SIGKILL)
    launcher.wait_for(
        rf"gateway: server \(pid {server_pid}\) exited on SIGKILL; restarting it in [\d.]+ s, envoy untouched",
        after=mark,
    )
    index, restarted = launcher.wait_for(r"gateway: server restarted \(pid (\d+)\)", after=mark)
    launcher.wait_for(SERVING, after=index, timeout=SERVER_START_S)
    assert int(restarted[1]) != server_pid and launcher.is_child(int(restarted[1]))
    response = httpx.post(launcher.base_url + "/v1/embeddings", json={"input": "back again"}, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384
    # Envoy learns that the server is back from its health checks (no event to wait for).
    deadline = time.monotonic() + HEALTH_RECOVERY_S
    while (health := httpx.get(launcher.base_url + "/health", timeout=10).status_code) != 200:
        assert time.monotonic() < deadline, f"/health still {health} {HEALTH_RECOVERY_S:g} s after the restart"
        time.sleep(0.2)
    assert launcher.pid("envoy") == envoy_pid and launcher.is_child(envoy_pid)
    assert "envoy (pid" not in "".join(launcher.lines[mark:]), launcher.log
