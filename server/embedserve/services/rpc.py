"""What every unary handler shares: deadlines and the one way errors become status codes."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from embedserve.errors import EmbedServeError, status_for

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def deadline(context: grpc.aio.ServicerContext[Req, Resp]) -> float | None:
    """The caller's deadline on the monotonic clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def unary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turns domain errors into their status code; anything else is a bug: INTERNAL, logged."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await handler(self, request, context)
        except EmbedServeError as exc:
            code, message = status_for(exc)
        except Exception as exc:
            log.exception("bug in %s", handler.__name__)
            code, message = status_for(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return wrapper
