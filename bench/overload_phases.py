"""The phases of bench.overload: a server's capacity (texts/s answered at saturation with a few
clients), then overloads of it: many paced clients, in a closed and in an open loop, unary Embed
straight to the server and POST /v1/embeddings through Envoy, while a process of its own
(bench.probe) times grpc.health.v1 Check. Every request's end is recorded as its client saw it: status, latency, the
retry hint and, over REST, whether the error body is OpenAI's. tests/e2e/test_overload.py runs the
same load and asserts on what it records."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import random
import re
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import numpy as np

from bench.harness import FloatArray, make_corpus, percentile, step
from bench.load import Clock, Connections, Elapsed, decode
from bench.process import Baseline, Gateway, HealthProber, ServerProcess, machine_busy_s
from bench.shared_phases import Reference, quotient
from embedserve.v1 import embedding_service_pb2 as pb

if TYPE_CHECKING:
    from embedserve.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

GRPC, REST = "grpc", "rest"
PATHS = (GRPC, REST)
# How each path says "answered" and "refused for overload".
ANSWERED = {GRPC: "OK", REST: "200"}
SHED = {GRPC: "RESOURCE_EXHAUSTED", REST: "429"}
# The error.code of an overload's OpenAI JSON body over REST.
SHED_CODE = "resource_exhausted"
# The retry hint: a trailer over gRPC, a header over REST (RFC 9110 Retry-After).
RETRY_AFTER = "retry-after"
# How long one request may wait for its answer; then it ends as DEADLINE_EXCEEDED / ReadTimeout.
CALL_TIMEOUT_S = 60.0
# Issue 10's targets, printed beside the figures (nothing asserts them).
GOODPUT_RATIO = 0.90  # texts/s answered under the overload / capacity, at least ("near capacity")
REFUSAL_P99_MS = 100.0  # a refusal comes in milliseconds
HEALTH_P99_MS = 50.0  # health stays fast
# Characters of an error's message an Outcome keeps, to say what went wrong.
DETAIL_CHARS = 200
# What this checkout's server logs at startup about its queue (older servers log nothing like it).
QUEUE_LINE = re.compile(r"model \S+: (each lane queues at most [^\n]*)")
# A server log line worth quoting in the report, and how many of them.
PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
LOGGED_PROBLEMS = 5


def make_requests(texts: int, sizes: tuple[int, int], words: tuple[int, int], seed: int) -> list[list[str]]:
    """`texts` seeded texts of words[0]..words[1] words, cut into requests of sizes[0]..sizes[1]
    texts (the last may hold fewer)."""
    rng = random.Random(seed)
    corpus = make_corpus(texts, seed, *words)
    requests, start = [], 0
    while start < len(corpus):
        size = rng.randint(*sizes)
        requests.append(corpus[start : start + size])
        start += size
    return requests


@dataclass(frozen=True)
class Outcome:
    """How one request ended, as its client saw it."""

    path: str  # GRPC or REST
    status: str  # the gRPC code's name or the HTTP status; the exception's class name when none came
    sent: float  # time.perf_counter() when it was sent
    seconds: float  # until its answer or its error
    texts: int  # texts it carried
    retry_after: str | None = None  # the retry-after trailer (gRPC) or header (REST) of an error
    error_code: str | None = None  # a REST error's OpenAI JSON error.code; None for any other body
    detail: str = field(default="", repr=False)  # an error's message or body, cut to DETAIL_CHARS

    @property
    def answered(self) -> bool:
        """Answered with vectors."""
        return self.status == ANSWERED[self.path]

    @property
    def shed(self) -> bool:
        """Refused for overload: RESOURCE_EXHAUSTED, or 429 over REST."""
        return self.status == SHED[self.path]

    @property
    def ended(self) -> float:
        """time.perf_counter() when the answer or the error came."""
        return self.sent + self.seconds


# Sends request `index` of the load's requests; says how it ended.
Send = Callable[[int], Coroutine[Any, Any, Outcome]]


def grpc_sender(stub: Stub, requests: Sequence[pb.EmbedRequest], reference: Reference) -> Send:
    """Unary Embed on `stub`; an answer's vectors are checked against the first ones to the same request."""

    async def send(index: int) -> Outcome:
        request = requests[index]
        sent = time.perf_counter()
        try:
            response = await stub.Embed(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            retry = (error.trailing_metadata() or grpc.aio.Metadata()).get(RETRY_AFTER)
            hint = None if retry is None else str(retry)
            seconds, detail = time.perf_counter() - sent, (error.details() or "")[:DETAIL_CHARS]
            return Outcome(GRPC, error.code().name, sent, seconds, len(request.inputs), hint, detail=detail)
        seconds = time.perf_counter() - sent
        reference.check(GRPC, index, decode(response))
        return Outcome(GRPC, ANSWERED[GRPC], sent, seconds, len(request.inputs))

    return send


def openai_error_code(response: httpx.Response) -> str | None:
    """error.code of an OpenAI JSON error body ({"error": {"message", "type", "code"}}); None for
    a body of another shape."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return None
    with contextlib.suppress(ValueError):
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and all(isinstance(error.get(k), str) for k in ("message", "type", "code")):
            return str(error["code"])
    return None


def rest_vectors(body: Any) -> FloatArray:
    """The vectors of an embeddings answer with encoding_format "base64"."""
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]])


def rest_sender(client: httpx.AsyncClient, model: str, requests: Sequence[Sequence[str]], reference: Reference) -> Send:
    """POST /v1/embeddings on `client` (base64 vectors); an answer's vectors are checked as grpc_sender's."""

    async def send(index: int) -> Outcome:
        texts = requests[index]
        body = {"model": model, "input": list(texts), "encoding_format": "base64"}
        sent = time.perf_counter()
        try:
            response = await client.post("/v1/embeddings", json=body)
        except httpx.HTTPError as error:
            detail = str(error)[:DETAIL_CHARS]
            return Outcome(REST, type(error).__name__, sent, time.perf_counter() - sent, len(texts), detail=detail)
        seconds = time.perf_counter() - sent
        if response.status_code == 200:
            reference.check(REST, index, rest_vectors(response.json()))
            return Outcome(REST, ANSWERED[REST], sent, seconds, len(texts))
        hint, detail = response.headers.get(RETRY_AFTER), response.text[:DETAIL_CHARS]
        status = str(response.status_code)
        return Outcome(REST, status, sent, seconds, len(texts), hint, openai_error_code(response), detail)

    return send


@dataclass(frozen=True)
class Shape:
    """A phase's clients: how many on each path, how long they send, how often each does, and
    whether each waits for one request to end before it sends the next."""

    grpc_clients: int
    rest_clients: int
    seconds: float
    # Each client sends one request per period (0: the next as soon as the last has ended, closed
    # loop only).
    period_s: float = 0.0
    # Closed loop: a client sends its next request only once the last has ended, so a slow
    # server slows its clients down. Open loop: every request goes out on its schedule, answered
    # or not, so the offered load is what it says whatever the server does.
    closed: bool = True

    @property
    def clients(self) -> int:
        """Clients on both paths."""
        return self.grpc_clients + self.rest_clients

    @property
    def label(self) -> str:
        """What the shape is, in words."""
        loop = "closed loop" if self.closed else "open loop"
        return f"{self.grpc_clients} gRPC + {self.rest_clients} REST clients, {loop}"


async def client_loop(send: Send, first: int, count: int, shape: Shape, begin: float, until: float) -> list[Outcome]:
    """One client: requests first, first + 1, ... (mod `count`), the first at `begin`, then one
    every shape.period_s, none at or after `until`. In a closed loop each waits for the last to
    end, and a client behind its schedule sends at once but does not catch up in a burst; in an
    open loop each goes out when due. Returns once every request sent has ended."""
    outcomes: list[Outcome] = []
    pending: list[asyncio.Task[Outcome]] = []
    due, index = begin, first
    while True:
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)  # the client's schedule, not a wait for an event
        if time.perf_counter() >= until:
            return outcomes + list(await asyncio.gather(*pending))
        if shape.closed:
            outcomes.append(await send(index % count))
            due = max(due + shape.period_s, time.perf_counter())
        else:
            pending.append(asyncio.create_task(send(index % count)))
            due += shape.period_s
        index += 1


@dataclass
class Phase:
    """What one phase measured: every request's outcome, when its clients began and for how long
    they sent, the CPU the phase cost (this process, then the server and Envoy) from the first
    send to the last answer and what the whole machine used meanwhile, and the health checks
    (latency in ms, count per status)."""

    shape: Shape
    started: float
    outcomes: list[Outcome] = field(repr=False)
    elapsed: Elapsed
    machine_cpu_s: float = float("nan")
    health_ms: list[float] = field(default_factory=list, repr=False)
    health: dict[str, int] = field(default_factory=dict)

    def on(self, path: str | None = None) -> list[Outcome]:
        """The outcomes of one path (None: both)."""
        return [o for o in self.outcomes if path is None or o.path == path]

    def statuses(self, path: str | None = None) -> collections.Counter[str]:
        """Requests per status."""
        return collections.Counter(o.status for o in self.on(path))

    def latencies_ms(self, path: str | None = None, shed: bool = False) -> list[float]:
        """The latencies of the answered requests (shed: of the refused ones), in ms."""
        return [o.seconds * 1e3 for o in self.on(path) if (o.shed if shed else o.answered)]

    @property
    def goodput(self) -> float:
        """Texts answered per second while the clients sent (answers after that are not counted)."""
        until = self.started + self.shape.seconds
        return sum(o.texts for o in self.outcomes if o.answered and o.ended <= until) / self.shape.seconds

    @property
    def offered(self) -> float:
        """Texts sent per second."""
        return sum(o.texts for o in self.outcomes) / self.shape.seconds

    def unexpected(self) -> collections.Counter[str]:
        """Requests that ended neither answered nor refused for overload, per path and status."""
        return collections.Counter(f"{o.path} {o.status}" for o in self.outcomes if not (o.answered or o.shed))

    def first(self, path_status: str) -> Outcome:
        """The first request that ended as `path_status` (as `unexpected` names it)."""
        return next(o for o in self.outcomes if f"{o.path} {o.status}" == path_status)

    def hinted(self, path: str) -> tuple[int, int]:
        """Of a path's refusals, how many carried a retry-after of whole seconds >= 1 (and, over
        REST, an OpenAI JSON body with code resource_exhausted), and how many there were."""
        shed = [o for o in self.on(path) if o.shed]
        good = [
            o
            for o in shed
            if o.retry_after is not None
            and o.retry_after.isdigit()
            and int(o.retry_after) >= 1
            and (path == GRPC or o.error_code == SHED_CODE)
        ]
        return len(good), len(shed)

    @property
    def cores(self) -> tuple[float, ...]:
        """CPU seconds per wall second of this process, then of each watched process."""
        return tuple(cpu / self.elapsed.seconds for cpu in (self.elapsed.own_cpu_s, *self.elapsed.cpu_s))

    @property
    def other_cores(self) -> float:
        """CPU seconds per wall second that the rest of the machine used (the health prober
        included, a few hundredths): a neighbour that took CPU shows here."""
        return self.machine_cpu_s / self.elapsed.seconds - sum(self.cores)


class Load:
    """Paced clients of one server, in a closed or an open loop as a phase's Shape says: unary
    Embed over at most `connections` gRPC connections to `address`, and POST /v1/embeddings
    through Envoy at `base_url` (one HTTP connection per client), of `model`, each client going
    through `requests` from its own place.
    Every answer's vectors are checked against the first answer to the same request (`reference`,
    kinds GRPC and REST)."""

    def __init__(
        self,
        address: str,
        base_url: str,
        model: str,
        requests: Sequence[Sequence[str]],
        reference: Reference,
        connections: int = 32,
    ) -> None:
        self.address, self.base_url, self.model = address, base_url, model
        self.requests, self.reference, self.connections = requests, reference, connections
        self._messages = [pb.EmbedRequest(model=model, inputs=texts) for texts in requests]

    async def run(self, shape: Shape, pids: Sequence[int] = (), probe: bool = False) -> Phase:
        """One phase of `shape`; the CPU of `pids` is measured, and with `probe` health is timed
        from before the first request until the last has ended."""
        async with Connections(self.address, min(self.connections, shape.grpc_clients)) as connections:
            await connections.ready()
            clients = [self._http() for _ in range(shape.rest_clients)]
            try:
                senders = [
                    grpc_sender(connections.stubs[i % len(connections.stubs)], self._messages, self.reference)
                    for i in range(shape.grpc_clients)
                ] + [rest_sender(client, self.model, self.requests, self.reference) for client in clients]
                with HealthProber(self.address) if probe else contextlib.nullcontext() as prober:
                    phase = await self._clients(shape, senders, pids)
                    if prober is not None:
                        prober.stop()
                        phase.health_ms, phase.health = prober.latencies_ms, prober.statuses
            finally:
                for client in clients:
                    await client.aclose()
        return phase

    def _http(self) -> httpx.AsyncClient:
        """One REST client: its own HTTP/1.1 connection to Envoy, as an SDK client holds."""
        return httpx.AsyncClient(base_url=self.base_url, timeout=CALL_TIMEOUT_S)

    async def _clients(self, shape: Shape, senders: Sequence[Send], pids: Sequence[int]) -> Phase:
        """Every sender in its loop, their first requests spread over one period."""
        clock, busy = Clock(*pids), machine_busy_s()
        started = time.perf_counter()
        until, count, spread = started + shape.seconds, len(self.requests), shape.period_s / max(1, len(senders))
        loops = [
            client_loop(send, i * count // len(senders), count, shape, started + i * spread, until)
            for i, send in enumerate(senders)
        ]
        outcomes = [o for client in await asyncio.gather(*loops) for o in client]
        return Phase(shape, started, outcomes, clock.read(), machine_busy_s() - busy)


# -- one code's server under the plan ------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What each code's server runs: the requests (cycled), the capacity phase (after a warm-up of
    `warmup_s` seconds of it), and the overloads, in order, each paced so that its clients would
    send `factor` times the capacity measured if every request ended at once."""

    model: str
    requests: list[list[str]]
    warmup_s: float
    capacity: Shape
    overloads: tuple[Shape, ...]
    factor: float
    connections: int

    def period(self, shape: Shape, capacity: float) -> float:
        """A client's period in `shape`: all of them together send `factor` x `capacity` texts/s."""
        texts = statistics.fmean(len(r) for r in self.requests)
        return shape.clients * texts / (self.factor * capacity)


@dataclass
class CodeRun:
    """One code's server under the plan: its commit, its queue as it logged it at startup (None
    when it logs nothing of it), the capacity phase, the overload phases in plan order, and the
    first lines it logged at WARNING or above."""

    commit: str
    queue: str | None
    capacity: Phase
    overloads: list[Phase]
    problems: list[str] = field(default_factory=list)

    @property
    def capacity_per_s(self) -> float:
        """Texts/s answered at saturation with the capacity phase's few clients."""
        return self.capacity.goodput

    def figures(self, overload: Phase) -> dict[str, float]:
        """One overload phase's figures by name: rates in texts/s and as shares of the capacity,
        latencies in ms (p50, p99), cores used."""
        o = overload
        kinds = ("answered", "shed")
        latencies = {f"{path}_{kind}": o.latencies_ms(path, kind == "shed") for path in PATHS for kind in kinds}
        bench_cores, server_cores, envoy_cores = o.cores
        refused = o.latencies_ms(shed=True)
        return {
            "capacity_texts_per_s": self.capacity_per_s,
            "offered_texts_per_s": o.offered,
            "offered_ratio": quotient(o.offered, self.capacity_per_s),
            "goodput_texts_per_s": o.goodput,
            "goodput_ratio": quotient(o.goodput, self.capacity_per_s),
            "period_s": o.shape.period_s,
            **{f"{name}_p{q}_ms": percentile(ms, q) for name, ms in latencies.items() for q in (50, 99)},
            # How long an overloaded client waits to hear "no" against how long it waits for an answer.
            "shed_over_answered_p50": quotient(percentile(refused, 50), percentile(o.latencies_ms(), 50)),
            **{f"health_p{q}_ms": percentile(o.health_ms, q) for q in (50, 99, 100)},
            "health_checks": float(len(o.health_ms)),
            "bench_cores": bench_cores,
            "server_cores": server_cores,
            "envoy_cores": envoy_cores,
            "other_cores": o.other_cores,
        }


async def measure_server(
    server: ServerProcess, envoy: Gateway, plan: Plan, reference: Reference, commit: str
) -> CodeRun:
    """The warm-up, the capacity phase, then each overload at `plan.factor` times that capacity."""
    load = Load(server.address, envoy.base_url, plan.model, plan.requests, reference, plan.connections)
    pids = (server.proc.pid, envoy.process.pid)
    await load.run(dataclasses.replace(plan.capacity, seconds=plan.warmup_s))  # first runs of each shape allocate
    step(f"(c) capacity: {plan.capacity.label}, {plan.capacity.seconds:g} s")
    capacity = await load.run(plan.capacity, pids)
    if failed := {status: n for status, n in capacity.statuses().items() if status != ANSWERED[GRPC]}:
        raise RuntimeError(f"requests failed while measuring the capacity: {failed}")
    overloads = []
    for planned in plan.overloads:
        shape = dataclasses.replace(planned, period_s=plan.period(planned, capacity.goodput))
        step(
            f"capacity {capacity.goodput:.0f} texts/s; overload: {shape.label}, one request per "
            f"{shape.period_s:.2f} s each ({plan.factor:g}x), {shape.seconds:g} s"
        )
        overloads.append(phase := await load.run(shape, pids, probe=True))
        step(
            f"goodput {phase.goodput:.0f} texts/s; answered p50 {percentile(phase.latencies_ms(), 50):.0f} ms, "
            f"refused p50 {percentile(phase.latencies_ms(shed=True), 50):.1f} ms; health p99 "
            f"{percentile(phase.health_ms, 99):.1f} ms; {dict(phase.statuses())}"
        )
    queue = QUEUE_LINE.search(server.log)
    problems = [line.strip() for line in server.lines if PROBLEM.search(line)][:LOGGED_PROBLEMS]
    return CodeRun(commit, queue.group(1) if queue else None, capacity, overloads, problems)


def measure_code(
    flags: Sequence[str], startup_timeout: float, code: Baseline | None, plan: Plan, reference: Reference, commit: str
) -> CodeRun:
    """One code's server (`python -m embedserve`) and Envoy in front of it, under the plan."""
    with ServerProcess(flags, startup_timeout, code) as server, Gateway(server.address) as envoy:
        step(f"server on {server.address} ({' '.join(server.command[1:])}), Envoy on {envoy.address}")
        return asyncio.run(measure_server(server, envoy, plan, reference, commit))


@dataclass
class OverloadBench:
    """All that bench.overload measured: each code's run ("checkout", and "baseline" when one
    ran) and the largest vector differences from the first answer to the same request."""

    runs: dict[str, CodeRun]
    diffs: dict[str, float]
