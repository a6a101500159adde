"""The headers a unary answer carries besides its message (TEI's timing headers, the idempotency
markers): trailing metadata over gRPC, HTTP headers through Envoy's REST routes.

They go in the trailing metadata because gRPC sends that in one batch with the message and its
status. Initial metadata sent on its own (`send_initial_metadata`) leaves the server before the
message, and Envoy passes headers on as soon as it has them: a replica that died in between left
Envoy with a call it could no longer retry (it retries a call only until a response's headers
come), and the caller got INTERNAL ("Stream removed") instead of the answer of another replica.
Envoy's lua filter (envoy/openai_errors.lua) copies them into a REST answer's HTTP headers, which
the transcoder holds until the trailers are in.
"""

from __future__ import annotations

from typing import Any

import grpc

Header = tuple[str, str]


def add(context: grpc.aio.ServicerContext[Any, Any], headers: list[Header]) -> None:
    """Adds a unary answer's headers to its trailing metadata (after what is set there already)."""
    if headers:
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), *headers))
