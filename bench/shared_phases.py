"""The phases of bench.shared: a short query sent open loop at a fixed rate, idle and while a bulk
job saturates the server (unary clients, or one EmbedStream); the same bulk jobs without the
queries; two tenants' EmbedStream jobs side by side. Each returns what it measured."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import cycle
from typing import TYPE_CHECKING

import grpc
import numpy as np

from bench.harness import FloatArray, max_abs_diff, percentile, step
from bench.load import Clock, Connections, decode, queue_load
from bench.process import ROOT, Baseline, ServerProcess
from embedserve.v1 import embedding_service_pb2 as pb

if TYPE_CHECKING:
    from embedserve.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

# The interactive query of issue 9: one short input, a unary Embed.
QUERY = "a short query about embeddings"
# The two tenants of phase (t): the server runs with --api-keys "k1;k2", one stream per key.
TENANT_KEYS = ("k1", "k2")
# Seconds the answers still in flight get once a phase has stopped sending.
DRAIN_S = 60.0

# Issue 9's targets, printed beside the figures of this checkout (nothing asserts them).
QUERY_P50_MS = 15.0
QUERY_P99_MS = 50.0
WITH_QUERIES_RATIO = 0.90  # bulk with queries / bulk alone, at least
BASELINE_RATIO = 0.97  # bulk alone, this checkout / the baseline, at least
TENANT_RATIO = (0.9, 1.1)  # k1 / k2 texts per second over the time both run


Metadata = tuple[tuple[str, str], ...]


def quotient(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a job that answered nothing)."""
    return a / b if b else float("nan")


def bearer(key: str | None) -> Metadata:
    """The call metadata that presents API key `key` (none for None)."""
    return () if key is None else (("authorization", f"Bearer {key}"),)


class Reference:
    """The first vectors answered for each input (the query, or a corpus request by index), and
    how far every later answer for it strayed: a scheduler that hands one request's rows to
    another shows here, whatever the code or the condition. `kinds` name the sorts of answers
    kept apart (bench.shared's: the queries and the bulk jobs')."""

    def __init__(self, *kinds: str) -> None:
        self._first: dict[tuple[str, object], FloatArray] = {}
        self.worst: dict[str, float] = dict.fromkeys(kinds or ("queries", "bulk"), 0.0)

    def check(self, kind: str, key: object, vectors: FloatArray) -> None:
        """Compares `vectors` with the first ones answered for (kind, key)."""
        first = self._first.setdefault((kind, key), vectors)
        self.worst[kind] = max(self.worst[kind], max_abs_diff(vectors, first))


@dataclass(frozen=True)
class Plan:
    """What every round runs: the corpus cut into requests, the load's shape and the bounds."""

    requests: list[pb.EmbedRequest]
    clients: int
    in_flight: int
    rate: float
    idle_s: float
    limit_s: float


# -- bulk jobs -------------------------------------------------------------------------------


@dataclass
class BulkRun:
    """One bulk job: when it started, when each answer came and with how many texts, whether it
    answered the whole corpus before its time limit, and how much of the machine it got."""

    clock: Clock = field(repr=False)  # watches the server from the start of the job
    started: float = field(default_factory=time.perf_counter)
    answers: list[tuple[float, int]] = field(default_factory=list, repr=False)
    complete: bool = False
    # CPU seconds of bench and server per wall second of the job; set by finish().
    cores_used: float = float("nan")

    @classmethod
    def start(cls, server_pid: int) -> BulkRun:
        """A job starting now against the server process `server_pid`."""
        return cls(Clock(server_pid))

    def answered(self, texts: int) -> None:
        """Records an answer of `texts` texts, now."""
        self.answers.append((time.perf_counter(), texts))

    def finish(self, complete: bool) -> BulkRun:
        """Records the end of the job: whether it ran the whole corpus, and the cores it used."""
        elapsed = self.clock.read()
        self.complete, self.cores_used = complete, (elapsed.own_cpu_s + sum(elapsed.cpu_s)) / elapsed.seconds
        return self

    @property
    def ended(self) -> float:
        """When the last answer came (the start when none did)."""
        return self.answers[-1][0] if self.answers else self.started

    @property
    def texts(self) -> int:
        """Texts answered."""
        return sum(n for _, n in self.answers)

    @property
    def seconds(self) -> float:
        """From the start to the last answer."""
        return self.ended - self.started

    @property
    def texts_per_s(self) -> float:
        """Texts answered per second of the job."""
        return quotient(self.texts, self.seconds)

    def texts_until(self, moment: float) -> float:
        """Texts answered by `moment` (a perf_counter reading), interpolated linearly between
        answers, so that a job whose next answer is just due is not undercounted by a request."""
        times = [self.started, *(at for at, _ in self.answers)]
        counts = np.cumsum([0, *(n for _, n in self.answers)])
        return float(np.interp(moment, times, counts))


async def unary_bulk(stubs: Sequence[Stub], plan: Plan, reference: Reference, server_pid: int) -> BulkRun:
    """The corpus once through Embed, one client per stub taking the next request from a shared
    queue (bench.load's closed loop); the calls still open after plan.limit_s are cancelled."""
    run = BulkRun.start(server_pid)

    async def call(stub: Stub, item: tuple[int, pb.EmbedRequest]) -> None:
        index, request = item
        vectors = decode(await stub.Embed(request))
        reference.check("bulk", index, vectors)
        run.answered(len(vectors))

    try:
        await asyncio.wait_for(queue_load(stubs, list(enumerate(plan.requests)), call), plan.limit_s)
    except TimeoutError:
        return run.finish(complete=False)
    return run.finish(complete=True)


class StreamJob:
    """plan's corpus once on one EmbedStream, presenting API key `key` (None: no key), with at
    most plan.in_flight requests unanswered and none sent after plan.limit_s; each call runs it
    afresh. Every id sent must be answered exactly once and without error, else it raises."""

    def __init__(self, stub: Stub, plan: Plan, reference: Reference, server_pid: int, key: str | None = None) -> None:
        self._stub, self._plan, self._reference, self._pid, self._key = stub, plan, reference, server_pid, key
        self._window = asyncio.Semaphore(plan.in_flight)
        self._sent: set[str] = set()
        self._answered: set[str] = set()
        self.run = BulkRun.start(server_pid)

    async def __call__(self) -> BulkRun:
        """Runs the job; returns what it answered and when."""
        self._window = asyncio.Semaphore(self._plan.in_flight)
        self._sent, self._answered = set(), set()
        self.run = BulkRun.start(self._pid)
        call = self._stub.EmbedStream(metadata=bearer(self._key))
        writer = asyncio.create_task(self._write(call))
        try:
            await asyncio.wait_for(self._read(call), self._plan.limit_s + DRAIN_S)
            await writer
        except TimeoutError:
            waiting = len(self._sent) - len(self._answered)
            raise RuntimeError(f"stream still waits for {waiting} answers {DRAIN_S:g} s after its time limit") from None
        finally:
            writer.cancel()
            call.cancel()
        if missing := self._sent - self._answered:
            raise RuntimeError(f"stream never answered {len(missing)} ids, e.g. {sorted(missing)[:5]}")
        return self.run.finish(complete=len(self._answered) == len(self._plan.requests))

    async def _write(self, call: grpc.aio.StreamStreamCall[pb.EmbedStreamRequest, pb.EmbedStreamResponse]) -> None:
        deadline = self.run.started + self._plan.limit_s
        for index, request in enumerate(self._plan.requests):
            await self._window.acquire()
            if time.perf_counter() >= deadline:
                break
            self._sent.add(str(index))
            await call.write(pb.EmbedStreamRequest(id=str(index), request=request))
        await call.done_writing()

    async def _read(self, call: grpc.aio.StreamStreamCall[pb.EmbedStreamRequest, pb.EmbedStreamResponse]) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            assert isinstance(message, pb.EmbedStreamResponse)
            if message.HasField("error"):
                raise RuntimeError(
                    f"stream request {message.id} failed: {message.error.status} {message.error.message}"
                )
            if message.id not in self._sent or message.id in self._answered:
                raise RuntimeError(f"stream answered id {message.id!r}, which was not waiting for an answer")
            self._answered.add(message.id)
            vectors = decode(message.response)
            self._reference.check("bulk", int(message.id), vectors)
            self.run.answered(len(vectors))
            self._window.release()


# -- the interactive queries --------------------------------------------------------------------


class QuerySender:
    """QUERY through Embed at `rate` per second, open loop: each call goes out on its schedule
    whether or not the earlier ones are answered, and is timed on its own."""

    def __init__(self, stub: Stub, rate: float, reference: Reference) -> None:
        self._stub, self._reference = stub, reference
        self.period = 1.0 / rate
        self._request = pb.EmbedRequest(inputs=[QUERY])

    async def run(self, limit_s: float, stop: asyncio.Future[BulkRun] | None = None) -> list[float]:
        """Sends for `limit_s` seconds, or until `stop` is done; returns each call's latency in
        ms, in the order sent, once all are answered."""
        started = time.perf_counter()
        calls: list[asyncio.Task[float]] = []
        while (due := started + len(calls) * self.period) < started + limit_s:
            delay = max(0.0, due - time.perf_counter())
            if stop is None:
                await asyncio.sleep(delay)
            elif (await asyncio.wait([stop], timeout=delay))[0]:
                break
            calls.append(asyncio.create_task(self._one()))
        if not calls:
            return []
        _, waiting = await asyncio.wait(calls, timeout=DRAIN_S)
        for task in waiting:
            task.cancel()
        if waiting:
            raise RuntimeError(f"{len(waiting)} queries still unanswered {DRAIN_S:g} s after the last was sent")
        return [task.result() for task in calls]  # raises the first failed call's error

    async def _one(self) -> float:
        sent = time.perf_counter()
        response = await self._stub.Embed(self._request)
        latency_ms = (time.perf_counter() - sent) * 1e3
        self._reference.check("queries", QUERY, decode(response))
        return latency_ms


# -- what a round measured ----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One bulk job alone, then again while the queries run, and the queries' latencies in ms."""

    alone: BulkRun
    loaded: BulkRun
    queries_ms: list[float]

    @property
    def ratio(self) -> float:
        """Bulk throughput with the queries / without."""
        return quotient(self.loaded.texts_per_s, self.alone.texts_per_s)


@dataclass(frozen=True)
class Tenants:
    """Two tenants' EmbedStream jobs started together, one per key of TENANT_KEYS."""

    runs: tuple[BulkRun, BulkRun]

    @property
    def window(self) -> tuple[float, float]:
        """The time both ran: from the later start to the earlier last answer."""
        return max(r.started for r in self.runs), min(r.ended for r in self.runs)

    @property
    def texts_per_s(self) -> tuple[float, float]:
        """Each tenant's texts answered per second over the time both ran."""
        begin, end = self.window
        first, second = (quotient(r.texts_until(end), end - begin) if end > begin else float("nan") for r in self.runs)
        return first, second

    @property
    def ratio(self) -> float:
        """The first tenant's rate over the second's."""
        first, second = self.texts_per_s
        return quotient(first, second)


@dataclass(frozen=True)
class Round:
    """What one round measured against one server's code."""

    idle_ms: list[float]
    unary: Load
    stream: Load
    tenants: Tenants

    @property
    def runs(self) -> list[BulkRun]:
        """Every bulk job of the round."""
        return [self.unary.alone, self.unary.loaded, self.stream.alone, self.stream.loaded, *self.tenants.runs]

    @property
    def complete(self) -> bool:
        """Whether every bulk job ran the whole corpus within its time limit."""
        return all(r.complete for r in self.runs)

    def figures(self) -> dict[str, float]:
        """The round's figures by name: query latency percentiles in ms, bulk texts/s and ratios."""
        k1, k2 = self.tenants.texts_per_s
        latencies = {"idle": self.idle_ms, "unary": self.unary.queries_ms, "stream": self.stream.queries_ms}
        return {
            **{f"{name}_p{q}_ms": percentile(ms, q) for name, ms in latencies.items() for q in (50, 99)},
            **{f"{name}_queries": float(len(ms)) for name, ms in latencies.items()},
            "unary_alone_texts_per_s": self.unary.alone.texts_per_s,
            "unary_loaded_texts_per_s": self.unary.loaded.texts_per_s,
            "unary_ratio": self.unary.ratio,
            "stream_alone_texts_per_s": self.stream.alone.texts_per_s,
            "stream_loaded_texts_per_s": self.stream.loaded.texts_per_s,
            "stream_ratio": self.stream.ratio,
            "tenant_k1_texts_per_s": k1,
            "tenant_k2_texts_per_s": k2,
            "tenant_ratio": self.tenants.ratio,
        }


@dataclass(frozen=True)
class Spread:
    """The median of a figure over the rounds, and its range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Of one value per round."""
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class SharedBench:
    """All that bench.shared measured: the rounds against this checkout's server and against the
    baseline's (none without one), and the largest vector differences (Reference)."""

    commit: str  # this checkout's HEAD, "+changes" when server/ or proto/ differ from it
    baseline_commit: str | None
    checkout: list[Round]
    baseline: list[Round]
    diffs: dict[str, float]

    def spread(self, name: str, baseline: bool = False) -> Spread:
        """A figure of Round.figures over the rounds of one code."""
        return Spread.of([r.figures()[name] for r in (self.baseline if baseline else self.checkout)])

    def versus(self, name: str) -> Spread | None:
        """A figure of this checkout over the baseline's, round by round; None without a baseline."""
        if not self.baseline:
            return None
        pairs = zip(self.checkout, self.baseline, strict=True)
        return Spread.of([quotient(new.figures()[name], old.figures()[name]) for new, old in pairs])


# -- running the phases --------------------------------------------------------------------------


async def warm_up(stubs: Sequence[Stub], plan: Plan, key: str | None) -> None:
    """One corpus request on every connection at once (ONNX Runtime's first runs of a shape
    allocate). Bulk-sized, so that the scheduler has seen no interactive request yet."""
    metadata = bearer(key)
    await asyncio.gather(*(stub.Embed(r, metadata=metadata) for stub, r in zip(stubs, cycle(plan.requests))))


async def with_queries(job: Awaitable[BulkRun], sender: QuerySender, limit_s: float) -> tuple[BulkRun, list[float]]:
    """Runs the bulk job, and the queries from one query period after it starts (when its
    requests are queued) until it is done."""
    bulk = asyncio.ensure_future(job)
    try:
        await asyncio.wait([bulk], timeout=sender.period)
        latencies = await sender.run(limit_s, stop=bulk)
        return await bulk, latencies
    finally:
        bulk.cancel()


async def measure_traffic(server: ServerProcess, plan: Plan, reference: Reference) -> tuple[list[float], Load, Load]:
    """Phases (u) and (s) first, before any interactive request (a scheduler may keep bulk
    batches short for a while after one), then (q), (u+q), (s+q), against one server."""
    pid = server.proc.pid
    async with Connections(server.address, plan.clients + 2) as connections:
        await connections.ready()
        *stubs, stream_stub, query_stub = connections.stubs
        await warm_up([*stubs, stream_stub], plan, None)
        unary_job = partial(unary_bulk, stubs, plan, reference, pid)
        stream_job = StreamJob(stream_stub, plan, reference, pid)
        size = len(plan.requests[0].inputs)
        step(f"(u) {plan.clients} unary clients x {size} texts, then (s) one EmbedStream, {plan.in_flight} in flight")
        unary_alone, stream_alone = await unary_job(), await stream_job()
        sender = QuerySender(query_stub, plan.rate, reference)
        await sender.run(3 * sender.period)  # the query's connection and path, untimed
        step(f"(q) idle, {plan.rate:g} queries/s for {plan.idle_s:g} s")
        idle = await sender.run(plan.idle_s)
        limit_s = plan.limit_s + DRAIN_S
        step("(u+q) the unary clients again, with the queries")
        unary = Load(unary_alone, *await with_queries(unary_job(), sender, limit_s))
        step("(s+q) the EmbedStream again, with the queries")
        stream = Load(stream_alone, *await with_queries(stream_job(), sender, limit_s))
    return idle, unary, stream


async def measure_tenants(server: ServerProcess, plan: Plan, reference: Reference) -> Tenants:
    """Phase (t): one EmbedStream per key of TENANT_KEYS, each on its own connection, started together."""
    async with Connections(server.address, len(TENANT_KEYS)) as connections:
        await connections.ready()
        for stub, key in zip(connections.stubs, TENANT_KEYS, strict=True):
            await warm_up([stub], plan, key)
        step(f"(t) two tenants ({', '.join(TENANT_KEYS)}), one EmbedStream each, started together")
        jobs = [
            StreamJob(stub, plan, reference, server.proc.pid, key)()
            for stub, key in zip(connections.stubs, TENANT_KEYS, strict=True)
        ]
        first, second = await asyncio.gather(*jobs)
    return Tenants((first, second))


def measure_round(
    flags: Sequence[str], startup_timeout: float, code: Baseline | None, plan: Plan, reference: Reference
) -> Round:
    """One round against one code: a server for (q), (u), (s); one with TENANT_KEYS for (t)."""
    with ServerProcess(flags, startup_timeout, code, queue_limit=False) as server:
        step(f"server on {server.address} ({' '.join(server.command[1:])})")
        idle, unary, stream = asyncio.run(measure_traffic(server, plan, reference))
    with ServerProcess(
        [*flags, "--api-keys", ";".join(TENANT_KEYS)], startup_timeout, code, queue_limit=False
    ) as server:
        tenants = asyncio.run(measure_tenants(server, plan, reference))
    measured = Round(idle, unary, stream, tenants)
    step(
        f"bulk alone: unary {unary.alone.texts_per_s:.1f}, stream {stream.alone.texts_per_s:.1f} texts/s; "
        f"query p99 under load: unary {percentile(unary.queries_ms, 99):.0f}, "
        f"stream {percentile(stream.queries_ms, 99):.0f} ms; tenants {tenants.ratio:.2f}"
    )
    return measured


def checkout_commit() -> str:
    """HEAD of this checkout, with "+changes" when server/ or proto/ differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True)
    changes = subprocess.run([*git, "status", "--porcelain", "server", "proto"], capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if changes.stdout.strip() else "")
