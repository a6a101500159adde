"""`make run`'s launcher (envoy/gateway.py --with-server): server and Envoy up, both down on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import CACHE_DIR
from tests.e2e.conftest import ROOT, free_port


def test_with_server_serves_rest_and_stops_both_on_sigterm() -> None:
    grpc_port, rest_port = free_port(), free_port()
    command = [
        sys.executable, str(ROOT / "envoy" / "gateway.py"), "--with-server",
        "--listen", f"127.0.0.1:{rest_port}", "--upstream", f"127.0.0.1:{grpc_port}",
        "--", "--host", "127.0.0.1", "--port", str(grpc_port), "--model-names", DEFAULT_DENSE_MODEL,
        "--cache-dir", str(CACHE_DIR),
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
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=90)[1]
    assert process.returncode == 0, "".join(seen) + rest
    assert "stopped" in rest  # the server drained and said so
    with pytest.raises(ConnectionRefusedError):  # Envoy is gone too
        socket.create_connection(("127.0.0.1", rest_port), timeout=5)
