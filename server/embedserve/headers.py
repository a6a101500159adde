"""The headers a unary answer carries (initial metadata; HTTP headers through Envoy), sent once.

gRPC sends a call's initial metadata once, before the answer. Its timing headers are known only
when the handler is done, and an interceptor further out may have more to add once it sees the
answer (the idempotency store's `idempotency-stored: false`), so whoever is outermost sends them
all: an interceptor that will calls `collect()` before it runs the handler, and the handler's
`add()` then puts its headers in that collection instead of sending them itself. The collection
is a context variable of the call's task, which the awaited handler shares.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import grpc

Header = tuple[str, str]

_collected: ContextVar[list[Header] | None] = ContextVar("embedserve_response_headers", default=None)


def collect() -> list[Header]:
    """Starts collecting this call's headers for the caller to send; returns the collection."""
    headers: list[Header] = []
    _collected.set(headers)
    return headers


async def add(context: grpc.aio.ServicerContext[Any, Any], headers: list[Header]) -> None:
    """Gives a unary answer's headers to the collection, or sends them when nobody collects."""
    collection = _collected.get()
    if collection is not None:
        collection.extend(headers)
    elif headers:
        await context.send_initial_metadata(tuple(headers))
