"""What every handler shares: what a call says beyond its message (deadline, tenant, priority)
and the one way errors become status codes."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from embedserve.engine.types import Call, Priority
from embedserve.errors import EmbedServeError, InvalidInputError, Words, quoted, status_for, trailing_metadata

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Servicer(Protocol):
    """A servicer names the engine's capabilities in its own words in error messages."""

    words: Words


# What a handler uses of its call: deadline, metadata and abort, whatever the message types.
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


# Metadata (an HTTP header through Envoy) that asks for a lane: "interactive" or "bulk".
PRIORITY_HEADER = "x-embedserve-priority"


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


def status(error: Exception, rpc: str, words: Words) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed request gets, unary or on a stream; anything but a
    domain error is a bug: INTERNAL, logged."""
    if not isinstance(error, EmbedServeError):
        log.error("bug in %s", rpc, exc_info=error)
    return status_for(error, words)


def unary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turns an error into its status code (`status`) and aborts the call with it, and with its
    trailing metadata (an overload's retry-after)."""

    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Req, context: Context) -> Resp:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            code, message = status(exc, handler.__name__, self.words)
            trailers = trailing_metadata(exc)
        await context.abort(code, message, trailing_metadata=trailers)
        raise AssertionError("unreachable: abort raises")

    return wrapper
