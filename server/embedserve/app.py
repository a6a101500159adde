"""Builds the gRPC server around an Engine and runs it until SIGTERM, draining in-flight RPCs."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedserve.auth import ApiKeyInterceptor
from embedserve.decoding import DecodeGuard
from embedserve.engine.engine import Engine
from embedserve.idempotency import IdempotencyInterceptor, IdempotencyStore
from embedserve.limits import WorkLimiter
from embedserve.metrics import MetricsEndpoint, ServerMetrics
from embedserve.services.compat import CompatService
from embedserve.services.embedding import EmbeddingService
from embedserve.services.openai import OpenAIService
from embedserve.settings import Settings
from embedserve.v1 import compat_service_pb2 as compat
from embedserve.v1 import compat_service_pb2_grpc as compat_grpc
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from embedserve.v1 import openai_service_pb2 as rest
from embedserve.v1 import openai_service_pb2_grpc as rest_grpc

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
REST_SERVICE_NAME: str = rest.DESCRIPTOR.services_by_name["OpenAIService"].full_name
COMPAT_SERVICE_NAME: str = compat.DESCRIPTOR.services_by_name["CompatService"].full_name


def build_server(
    settings: Settings, engine: Engine, metrics: ServerMetrics | None = None
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Creates the server with the embedding services (native and the REST one Envoy transcodes
    onto), health and reflection; binds the port.

    With API keys configured, both embedding services need one; health and reflection stay open.
    With `metrics`, every call of the embedding services is counted.
    """
    services = (SERVICE_NAME, REST_SERVICE_NAME, COMPAT_SERVICE_NAME)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if metrics is not None:
        # Outermost: the calls that the interceptors below refuse are counted too.
        interceptors.append(metrics.interceptor(services))
    if settings.api_keys:
        interceptors.append(ApiKeyInterceptor(settings.api_keys, services))
    if settings.idempotency_ttl > 0:
        # After auth: the tenant that scopes a key is known, and unauthenticated calls never touch
        # the store. Before the limiter: a replay, or a duplicate refused while the first call
        # runs, costs no concurrency slot. Outside DecodeGuard the request is still bytes; the
        # interceptor decodes it to fingerprint the message, not its encoding.
        store = IdempotencyStore(settings.idempotency_max_bytes, settings.idempotency_ttl)
        interceptors.append(IdempotencyInterceptor(services, store))
    # Not gRPC's maximum_concurrent_rpcs: it counts health checks and idle streams alike, so
    # enough idle streams made health RESOURCE_EXHAUSTED and an orchestrator restart a healthy server.
    limiter = WorkLimiter(services, settings.max_concurrency, settings.max_streams)
    if metrics is not None:
        metrics.watch(limiter)
    interceptors.append(limiter)
    interceptors.append(DecodeGuard(services))  # innermost: it decodes what the handler gets
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # A connection with no call for 5 minutes is closed (GOAWAY; clients reconnect on their
            # next call), and one whose peer stopped answering pings is dropped after 60 + 20 s.
            ("grpc.max_connection_idle_ms", 300_000),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ],
    )
    pb_grpc.add_EmbeddingServiceServicer_to_server(EmbeddingService(engine), server)
    rest_grpc.add_OpenAIServiceServicer_to_server(OpenAIService(engine), server)
    compat_grpc.add_CompatServiceServicer_to_server(CompatService(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(settings.address)
    if port == 0:
        raise OSError(f"cannot bind {settings.address}: is another server using the port?")
    return server, port, health_servicer


def exposure_warning(host: str, keyed: bool) -> str | None:
    """What to say when the server listens beyond loopback with no API key: anyone who can reach
    the port can use it."""
    if keyed or _loopback(host):
        return None
    return (
        f"listening on {host}, beyond this machine, with no API key: anyone who can reach the port can use "
        "the server. Set API_KEYS, or EMBEDSERVE_HOST=127.0.0.1 to serve this machine only"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def freeze_startup_objects() -> None:
    """Moves every object alive now (models' Python side, modules, descriptors, settings) out of
    the garbage collector's sight: a full collection then walks only what serving made, and
    pauses the whole process (the event loop and every worker thread) for less."""
    gc.collect()
    gc.freeze()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """The event loop's implementation, as the startup log names it: "uvloop" or "asyncio"."""
    return type(loop).__module__.split(".")[0]


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Sets the overall and per-service health status."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME, REST_SERVICE_NAME, COMPAT_SERVICE_NAME):
        await health_servicer.set(name, status)


# What the streams still open at the end of the grace period get to send their UNAVAILABLE
# (StreamDrain) before gRPC cancels every call left.
STREAM_END_S = 1.0


async def drain(
    settings: Settings, engine: Engine, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer
) -> None:
    """Stops serving without failing what a load balancer sends meanwhile: health goes
    NOT_SERVING at once, new RPCs are still accepted for DRAIN_DELAY (long enough for the load
    balancer's health checks to see it and send new work elsewhere), then refused (gRPC's GOAWAY:
    what is still sent here is refused before it starts, and Envoy retries it on another replica);
    the RPCs in flight get GRACE_PERIOD to finish. Each open EmbedStream answers the requests it
    has read and ends with UNAVAILABLE, on which its client re-sends the rest on a new stream."""
    delay_s = settings.drain_delay or 0.0
    log.info(
        "shutting down: NOT_SERVING%s",
        f", still accepting new RPCs for {delay_s:g} s (DRAIN_DELAY) while load balancers notice" if delay_s else "",
    )
    await set_serving(health_servicer, False)
    if delay_s:
        await asyncio.sleep(delay_s)
    log.info(
        "draining: new RPCs refused, in-flight ones get up to %g s (GRACE_PERIOD); open streams end with "
        "UNAVAILABLE once they have answered what they read",
        settings.grace_period,
    )
    engine.end_streams(settings.grace_period)
    await server.stop(settings.grace_period + STREAM_END_S)


async def serve(
    settings: Settings,
    engine: Engine,
    stop: asyncio.Event | None = None,
    ready: asyncio.Future[int] | None = None,
    metrics_ready: asyncio.Future[int | None] | None = None,
) -> None:
    """Runs until SIGTERM/SIGINT (or `stop`), then drains (`drain`) and shuts the engine down.
    The metrics port (`metrics_ready` gets it once bound; None: METRICS_PORT is off) serves
    until the end."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    health_ref: list[health.aio.HealthServicer] = []
    background: set[asyncio.Task[None]] = set()

    def on_engine_failure(error: BaseException) -> None:
        log.critical("a model worker crashed (%r): reporting NOT_SERVING", error)
        if health_ref:
            task = loop.create_task(set_serving(health_ref[0], False))
            background.add(task)
            task.add_done_callback(background.discard)

    engine.set_failure_callback(on_engine_failure)
    engine.start()
    metrics = None if settings.metrics_port is None else ServerMetrics(engine)
    server, port, health_servicer = build_server(settings, engine, metrics)
    endpoint: MetricsEndpoint | None = None
    if metrics is not None and settings.metrics_port is not None:
        endpoint = metrics.serve(settings.host, settings.metrics_port)
    health_ref.append(health_servicer)
    freeze_startup_objects()
    await server.start()
    await set_serving(health_servicer, True)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    except (NotImplementedError, RuntimeError):  # not the main thread (tests run servers in threads)
        pass
    log.info(
        "serving embedserve.v1.EmbeddingService on %s:%d (and OpenAIService for REST through Envoy; health, "
        "reflection on; %s; event loop: %s)",
        settings.host,
        port,
        f"API key required, {len(settings.api_keys)} configured" if settings.api_keys else "no API key required",
        loop_name(loop),
    )
    if endpoint is None:
        log.info("metrics off (METRICS_PORT=off)")
    else:
        log.info("serving Prometheus metrics on http://%s:%d/metrics", settings.host, endpoint.port)
    warning = exposure_warning(settings.host, bool(settings.api_keys))
    if warning:
        log.warning("%s", warning)
    if ready is not None:
        ready.set_result(port)
    if metrics_ready is not None:
        metrics_ready.set_result(None if endpoint is None else endpoint.port)
    await stop.wait()
    await drain(settings, engine, server, health_servicer)
    if endpoint is not None:
        await asyncio.to_thread(endpoint.close)
    await engine.close()
    log.info("stopped")
