"""What every handler shares: what a call says beyond its message (deadline, tenant, priority,
request id), the one way errors become status codes, and what every answer carries (its request
id, TEI's timing headers)."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from embedserve import headers
from embedserve.engine.types import Call, Priority
from embedserve.errors import EmbedServeError, InvalidInputError, Words, quoted, status_for, trailing_metadata

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Servicer(Protocol):
    """A servicer names the engine's capabilities in its own words in error messages, and says
    from how many seconds a request is slow enough to log (0: never)."""

    words: Words
    slow_request_s: float


# What a handler uses of its call: deadline, metadata and abort, whatever the message types.
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


# Metadata (an HTTP header through Envoy) that asks for a lane: "interactive" or "bulk".
PRIORITY_HEADER = "x-embedserve-priority"
# The request's id: Envoy's (it makes one when the client sent none), else the client's, else one
# made here; logged with its errors and slow answers, and echoed in the trailing metadata.
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces


def request_id(context: Context) -> str:
    """The call's request id: its `x-request-id` metadata when that is 1 to 128 printable ASCII
    characters, else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == REQUEST_ID_HEADER:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def timing_headers(response: object) -> list[headers.Header]:
    """TEI's timing headers for an answer that reports its timing (whole milliseconds) and usage,
    and how many of its inputs were cached."""
    timing = getattr(response, "timing", None)
    if timing is None:
        return []
    ms = {
        "x-total-time": timing.total_ms,
        "x-queue-time": timing.queue_ms,
        "x-tokenization-time": timing.tokenize_ms,
        "x-inference-time": timing.inference_ms,
        "x-compute-time": timing.tokenize_ms + timing.inference_ms,
    }
    found = [(name, str(round(value))) for name, value in ms.items()]
    # Not TEI's: inputs the vector cache (or an earlier input of the request) answered.
    found.append(("x-cached-inputs", str(timing.cached_inputs)))
    usage = getattr(response, "usage", None)
    if usage is not None:
        found.append(("x-compute-tokens", str(usage.total_tokens)))
    return found


def call(context: Context) -> Call:
    """What the call says beyond its message: its deadline on the monotonic clock, who sent it
    (a fingerprint of its bearer key, never the key) and the lane its metadata asks for."""
    remaining = context.time_remaining()
    metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
    return Call(
        deadline=None if remaining is None else time.monotonic() + remaining,
        tenant=tenant_of(metadata.get("authorization")),
        priority=_priority(metadata.get(PRIORITY_HEADER)),
    )


def tenant_of(authorization: str | bytes | None) -> str:
    """Who sent a call: a fingerprint of its bearer key (never the key), "" without one."""
    if not authorization:
        return ""
    token = authorization if isinstance(authorization, bytes) else authorization.encode()
    return hashlib.sha256(token).hexdigest()[:16]


def _priority(value: str | bytes | None) -> Priority | None:
    if value is None:
        return None
    name = (value.decode(errors="replace") if isinstance(value, bytes) else value).strip().lower()
    try:
        return Priority(name)
    except ValueError:
        raise InvalidInputError(
            f"{PRIORITY_HEADER} must be {' or '.join(p.value for p in Priority)}, got {quoted(name, 40)}"
        ) from None


def status(error: Exception, rpc: str, words: Words, request: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed request gets, unary or on a stream, logged with its
    request id: a bug (anything but a domain error, INTERNAL) as an error, a caller's mistake at
    INFO, an overload at DEBUG (the metrics count those; one line each would flood the log)."""
    if not isinstance(error, EmbedServeError):
        log.error("request %s: bug in %s", request or "-", rpc, exc_info=error)
    code, message = status_for(error, words)
    if isinstance(error, EmbedServeError):
        level = logging.DEBUG if code is grpc.StatusCode.RESOURCE_EXHAUSTED else logging.INFO
        log.log(level, "request %s: %s %s: %s", request or "-", rpc, code.name, message)
    return code, message


def unary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turns an error into its status code (`status`) and aborts the call with it, and with its
    trailing metadata (an overload's retry-after); an answer gets TEI's timing headers, in its
    trailing metadata too (see `headers`). Either way the request id is echoed in the trailing
    metadata, and a slow answer is logged."""

    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Req, context: Context) -> Resp:
        started = time.monotonic()
        rid = request_id(context)
        try:
            response = await handler(self, request, context)
        except Exception as exc:
            code, message = status(exc, handler.__name__, self.words, rid)
            trailers = (*trailing_metadata(exc), (REQUEST_ID_HEADER, rid))
        else:
            elapsed = time.monotonic() - started
            found = timing_headers(response)
            if self.slow_request_s and elapsed >= self.slow_request_s:
                log.warning(
                    "request %s: slow %s, %.0f ms (%s)",
                    rid,
                    handler.__name__,
                    elapsed * 1e3,
                    ", ".join(f"{name[2:]} {value}" for name, value in found) or "no timing",
                )
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
            headers.add(context, found)
            return response
        await context.abort(code, message, trailing_metadata=trailers)
        raise AssertionError("unreachable: abort raises")

    return wrapper
