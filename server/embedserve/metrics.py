"""The server's Prometheus metrics, served on an HTTP port of their own (METRICS_PORT).

Each server has a registry of its own (never prometheus_client's global one), so that several
servers in one process (the tests run them in threads) count apart. What is counted comes from
where it happens, and the layers below stay free of Prometheus:

* every call of the embedding services, by RPC, model and status code, and how long a unary
  call took: an interceptor, outermost, so that calls refused by the interceptors inside it
  (API keys, the concurrency limit, messages that do not decode) count too;
* the model of a call: the engine reports it (`EngineObserver.resolved`) once it has found the
  model a request names, or the default of its kind, and the interceptor's record of the call,
  held in a context variable, takes it. A call refused before that has no model (`model=""`),
  so a label value is always a served model, never a caller's text;
* where an answered request's time went (queue, tokenization, inference, total): the engine's
  `Timing` of each answer (`EngineObserver.answered`), streamed requests included;
* forward passes (inputs, tokens, padded tokens, seconds) and refusals for want of queue room:
  each model's scheduler (`SchedulerObserver`); refusals by the concurrency limits: WorkLimiter;
* queue depth and calls in flight: read from the scheduler and the limiter at scrape time;
* the vector cache's hits, misses and bytes: read from the engine's cache at scrape time.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from embedserve.engine.engine import Engine
from embedserve.engine.kinds import DENSE
from embedserve.engine.registry import is_kind
from embedserve.engine.types import Priority, Result
from embedserve.intercept import ServiceInterceptor
from embedserve.limits import WorkLimiter

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Seconds, from a query on a GPU (1 ms) to 2,048 long inputs on a CPU (minutes).
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_INPUTS = tuple(float(2**k) for k in range(11))  # 1 .. 1,024 inputs
BATCH_TOKENS = tuple(float(2**k) for k in range(4, 18))  # 16 .. 131,072 tokens
# The reasons a request is refused with RESOURCE_EXHAUSTED: the scheduler's (per model, see
# SchedulerObserver.shed) and the limiter's (before the model is known).
QUEUE_REASONS = ("queue_inputs", "queue_tokens", "streams_waiting")
LIMIT_REASONS = ("max_concurrency", "max_streams")


@dataclass(eq=False)
class _Call:
    """One call being handled: its RPC and, once the engine has found it, its model."""

    rpc: str
    model: str = ""


# The call the running code serves; tasks a call starts (a stream's requests) share its record.
_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("embedserve_metrics_call", default=None)


class ServerMetrics:
    """One server's metrics. Constructing it wires the engine's and each model's scheduler's
    observers to it; `interceptor` and `watch` wire the gRPC side; `serve` starts the HTTP port."""

    def __init__(self, engine: Engine) -> None:
        # The `_created` series prometheus_client adds to every counter and histogram double the
        # output for a figure Prometheus does not use (a process-wide switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._declare_calls()
        self._declare_work()
        models = Info("embedserve_model", "A served model and how it runs.", ["model"], registry=self.registry)
        for model in engine.describe():
            models.labels(model.id).info(
                {"kind": model.kind.value, "backend": model.backend, "provider": model.provider, "dtype": model.dtype}
            )
            # Present from the start, so that rate() and increase() see the first ones.
            self.tokens.labels(model.id)
            for reason in QUEUE_REASONS:
                self.shed.labels(model.id, reason)
        for reason in LIMIT_REASONS:
            self.shed.labels("", reason)
        self.registry.register(_Queues(engine))
        self.registry.register(_VectorCache(engine))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        engine.observer = self
        for served in engine.registry:
            served.scheduler.observer = _ModelWatch(self, served.id)

    def _counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def _histogram(self, name: str, documentation: str, labels: list[str], buckets: Sequence[float]) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def _declare_calls(self) -> None:
        """What the interceptor and the limiters count: calls, their duration, refusals."""
        self.requests = self._counter(
            "embedserve_requests_total",
            "Calls of the embedding services, unary or streams, when they end, by RPC, model (empty: the call "
            "reached none, refused before one was found, or answered without one) and gRPC status code.",
            ["rpc", "model", "code"],
        )
        self.duration = self._histogram(
            "embedserve_request_duration_seconds",
            "Time the server took to handle a unary call, whatever its outcome, by RPC and model.",
            ["rpc", "model"],
            SECONDS,
        )
        self.in_flight = Gauge(
            "embedserve_requests_in_flight",
            "Calls being handled now for a model (a stream counts for the model of its first request).",
            ["model"],
            registry=self.registry,
        )
        self.shed = self._counter(
            "embedserve_requests_shed_total",
            "Requests refused with RESOURCE_EXHAUSTED, by model (empty: refused by a concurrency limit, before "
            "the message was read) and the limit that refused them.",
            ["model", "reason"],
        )

    def _declare_work(self) -> None:
        """What the engine and the schedulers report: where requests' time went, forward passes."""
        self.stages = {
            stage: self._histogram(
                f"embedserve_{stage}_duration_seconds",
                f"{what} of each answered request (a stream's requests each count), by model.",
                ["model"],
                SECONDS,
            )
            for stage, what in (
                ("engine", "Time from its arrival at the engine to its answer"),
                ("queue", "Time from its admission to the start of its last forward pass"),
                ("tokenization", "Tokenization time"),
                ("inference", "Forward-pass time (the sum over the batches that held its inputs)"),
            )
        }
        per_pass = ["model", "lane"]
        self.batch_inputs = self._histogram(
            "embedserve_batch_inputs", "Inputs in one forward pass, by model and lane.", per_pass, BATCH_INPUTS
        )
        self.batch_padded_tokens = self._histogram(
            "embedserve_batch_padded_tokens",
            "Tokens one forward pass computed, padding included (longest input x inputs), by model and lane.",
            per_pass,
            BATCH_TOKENS,
        )
        self.batch_duration = self._histogram(
            "embedserve_batch_duration_seconds", "Time one forward pass took, by model and lane.", per_pass, SECONDS
        )
        self.tokens = self._counter(
            "embedserve_tokens_total",
            "Tokens of the inputs forward passes computed (padding excluded), by model.",
            ["model"],
        )

    # -- what the engine reports (EngineObserver) ---------------------------------------

    def resolved(self, model: str) -> None:
        """Labels the call being served with its model, the first one found for it."""
        call = _current.get()
        if call is not None and not call.model:
            call.model = model
            self.in_flight.labels(model).inc()

    def answered(self, result: Result) -> None:
        """Observes where an answered request's time went."""
        timing = result.timing
        for stage, ms in (
            ("engine", timing.total_ms),
            ("queue", timing.queue_ms),
            ("tokenization", timing.tokenize_ms),
            ("inference", timing.inference_ms),
        ):
            self.stages[stage].labels(result.model).observe(ms / 1e3)

    # -- the gRPC side -----------------------------------------------------------------

    def interceptor(self, services: Iterable[str]) -> grpc.aio.ServerInterceptor:
        """The interceptor that counts and times every call of `services`; to be the outermost."""
        return _Counted(services, self)

    def watch(self, limiter: WorkLimiter) -> None:
        """Counts the limiter's refusals and reports its calls in flight at scrape time."""
        limiter.on_refused = lambda reason: self.shed.labels("", reason).inc()
        self.registry.register(_Limits(limiter))

    def finished(self, call: _Call, code: grpc.StatusCode, seconds: float | None) -> None:
        """Counts a call that ended with `code`; `seconds`: how long a unary one took."""
        self.requests.labels(call.rpc, call.model, code.name).inc()
        if seconds is not None:
            self.duration.labels(call.rpc, call.model).observe(seconds)
        if call.model:
            self.in_flight.labels(call.model).dec()

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serves the metrics over HTTP on host:port (0: a free port), in a thread of its own, so
        that a scrape is answered however busy the event loop is."""
        return MetricsEndpoint(self.registry, host, port)


class _ModelWatch:
    """What one model's scheduler reports (SchedulerObserver), labelled with the model."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model

    def ran(self, lane: Priority, inputs: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        m, labels = self._metrics, (self._model, lane.value)
        m.batch_inputs.labels(*labels).observe(inputs)
        m.batch_padded_tokens.labels(*labels).observe(padded_tokens)
        m.batch_duration.labels(*labels).observe(seconds)
        m.tokens.labels(self._model).inc(tokens)

    def shed(self, reason: str) -> None:
        self._metrics.shed.labels(self._model, reason).inc()


class _Queues(Collector):
    """Each model's queue, per lane, and its limits, as the scheduler holds them at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "lane"]
        inputs = GaugeMetricFamily(
            "embedserve_queue_inputs",
            "Inputs a model's lane holds: queued, in a forward pass, or reserved for requests being tokenized.",
            labels=labels,
        )
        tokens = GaugeMetricFamily("embedserve_queue_tokens", "Tokens a model's lane holds, as inputs.", labels=labels)
        max_inputs = GaugeMetricFamily(
            "embedserve_queue_max_inputs", "Inputs each lane of a model holds at most (QUEUE_SIZE).", labels=["model"]
        )
        max_tokens = GaugeMetricFamily(
            "embedserve_queue_max_tokens",
            "Tokens beyond which a model's lane refuses unary requests (QUEUE_SECONDS of work); absent: no limit.",
            labels=["model"],
        )
        for model in self._engine.registry:
            scheduler = model.scheduler
            for lane in Priority:
                inputs.add_metric([model.id, lane.value], scheduler.queued_inputs(lane))
                tokens.add_metric([model.id, lane.value], scheduler.queued_tokens(lane))
            max_inputs.add_metric([model.id], scheduler.queue_size)
            if scheduler.queue_tokens is not None:
                max_tokens.add_metric([model.id], scheduler.queue_tokens)
        yield from (inputs, tokens, max_inputs, max_tokens)


class _VectorCache(Collector):
    """The engine's vector cache: inputs it answered and those computed, per dense model, and
    the bytes it holds against its bound."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cache = self._engine.vectors
        hits = CounterMetricFamily(
            "embedserve_vector_cache_hits",
            "Inputs of dense requests answered without a forward pass of their own: found in the vector cache, "
            "or repeating an earlier input of the request, by model.",
            labels=["model"],
        )
        misses = CounterMetricFamily(
            "embedserve_vector_cache_misses",
            "Inputs of dense requests computed by a forward pass (each distinct text of a request once), by model.",
            labels=["model"],
        )
        for model in self._engine.registry:
            if is_kind(model, DENSE):
                hits.add_metric([model.id], cache.hits[model.id])
                misses.add_metric([model.id], cache.misses[model.id])
        held = GaugeMetricFamily(
            "embedserve_vector_cache_bytes", "Bytes the vector cache holds: vectors, keys and their overhead."
        )
        held.add_metric([], cache.bytes_held)
        bound = GaugeMetricFamily("embedserve_vector_cache_max_bytes", "VECTOR_CACHE_BYTES; 0: the cache is off.")
        bound.add_metric([], cache.max_bytes)
        entries = GaugeMetricFamily("embedserve_vector_cache_entries", "Vectors the vector cache holds.")
        entries.add_metric([], len(cache))
        yield from (hits, misses, held, bound, entries)


class _Limits(Collector):
    """The calls the limiter counts now, and its limits."""

    def __init__(self, limiter: WorkLimiter) -> None:
        self._limiter = limiter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        limiter = self._limiter
        now = GaugeMetricFamily(
            "embedserve_calls_in_flight",
            "Unary calls (MAX_CONCURRENCY counts them) and open streams (MAX_STREAMS) of the embedding services.",
            labels=["kind"],
        )
        limit = GaugeMetricFamily(
            "embedserve_calls_in_flight_limit", "MAX_CONCURRENCY (unary) and MAX_STREAMS (stream).", labels=["kind"]
        )
        counts = (("unary", limiter.unary, limiter.max_unary), ("stream", limiter.streams, limiter.max_streams))
        for kind, count, most in counts:
            now.add_metric([kind], count)
            limit.add_metric([kind], most)
        yield from (now, limit)


class _Counted(ServiceInterceptor):
    """Counts every call of the services when it ends, with its status code, and times unary ones."""

    def __init__(self, services: Iterable[str], metrics: ServerMetrics) -> None:
        super().__init__(services)
        self._metrics = metrics

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        rpc = details.method.lstrip("/")
        if not handler.request_streaming and not handler.response_streaming:
            return self._unary(handler, rpc)
        if handler.request_streaming and handler.response_streaming:
            return self._stream(handler, rpc)
        return handler  # no such method in our services

    def _unary(self, handler: grpc.RpcMethodHandler[Req, Resp], rpc: str) -> grpc.RpcMethodHandler[Req, Resp]:
        behavior: Any = handler.unary_unary

        async def unary(request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
            with _Counting(self._metrics, rpc, context, timed=True):
                response: Resp = await behavior(request, context)
                return response

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)

    def _stream(self, handler: grpc.RpcMethodHandler[Req, Resp], rpc: str) -> grpc.RpcMethodHandler[Req, Resp]:
        behavior: Any = handler.stream_stream

        async def stream(requests: AsyncIterator[Req], context: grpc.aio.ServicerContext[Req, Resp]) -> None:
            with _Counting(self._metrics, rpc, context, timed=False):
                answers = behavior(requests, context)
                if hasattr(answers, "__aiter__"):  # a generator of answers, not a handler that writes them
                    async for answer in answers:
                        await context.write(answer)
                else:
                    await answers

        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class _Counting:
    """The record of one call while it runs (the engine's reports find it in `_current`), counted
    on exit with the status code it ended with: the one it set or aborted with, else OK when it
    returned, CANCELLED when it was cancelled (its caller went away) and UNKNOWN when it raised,
    as gRPC reports them. `timed`: its duration is observed too (unary calls; a stream's is how
    long its client kept it open)."""

    def __init__(
        self, metrics: ServerMetrics, rpc: str, context: grpc.aio.ServicerContext[Any, Any], timed: bool
    ) -> None:
        self._metrics = metrics
        self._call = _Call(rpc)
        self._context = context
        self._timed = timed
        self._started = 0.0
        self._token: contextvars.Token[_Call | None] | None = None

    def __enter__(self) -> _Counting:
        self._started = time.monotonic()
        self._token = _current.set(self._call)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        assert self._token is not None
        _current.reset(self._token)
        code: grpc.StatusCode | None = self._context.code()
        if code is None:
            if kind is None:
                code = grpc.StatusCode.OK
            elif issubclass(kind, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        self._metrics.finished(self._call, code, time.monotonic() - self._started if self._timed else None)


class MetricsEndpoint:
    """The HTTP server of a registry's metrics (prometheus_client's, on a daemon thread)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({exc}): set METRICS_PORT to a free port, 0 for any, or off"
            ) from exc
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        """Stops serving and frees the port (blocks for up to half a second: run it off the loop)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
