"""What every handler shares: deadlines and the one way errors become status codes."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from embedserve.errors import EmbedServeError, Words, status_for

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Servicer(Protocol):
    """A servicer names the engine's capabilities in its own words in error messages."""

    words: Words


# What a handler uses of its call: the deadline and abort, whatever the message types.
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def deadline(context: Context) -> float | None:
    """The caller's deadline on the monotonic clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def status(error: Exception, rpc: str, words: Words) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed request gets, unary or on a stream; anything but a
    domain error is a bug: INTERNAL, logged."""
    if not isinstance(error, EmbedServeError):
        log.error("bug in %s", rpc, exc_info=error)
    return status_for(error, words)


def unary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turns an error into its status code (`status`) and aborts the call with it."""

    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Req, context: Context) -> Resp:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            code, message = status(exc, handler.__name__, self.words)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return wrapper
