"""API keys: every EmbeddingService RPC needs `authorization: Bearer <key>` when keys are configured.

Health and server reflection stay open, so load balancers, orchestrators and grpcurl `list`
work without a key. A refused RPC ends with UNAUTHENTICATED (through the one table in
errors.py) before its handler runs, and its message says what to send.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import TypeVar

import grpc

from embedserve.errors import UnauthenticatedError, status_for
from embedserve.intercept import ServiceInterceptor

Req = TypeVar("Req")
Resp = TypeVar("Resp")

HOW_TO_SEND = "send 'authorization: Bearer <key>' (gRPC metadata, or the HTTP Authorization header over REST)"


class ApiKeyInterceptor(ServiceInterceptor):
    """Refuses calls to the protected services whose metadata carries none of the configured keys."""

    def __init__(self, api_keys: Iterable[str], services: Iterable[str]) -> None:
        super().__init__(services)
        # Digests, so that the comparison takes the same time whatever the keys' lengths.
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in api_keys if key)
        if not self._digests:
            raise ValueError("ApiKeyInterceptor needs at least one non-empty API key")

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        error = self.check(details.invocation_metadata)
        if error is None:
            return handler
        return _aborting_handler(handler, error)

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> UnauthenticatedError | None:
        """Returns why the metadata is refused, or None when it carries a configured key."""
        values = [value for key, value in metadata or () if key.lower() == "authorization"]
        if not values:
            return UnauthenticatedError(f"this server requires an API key: {HOW_TO_SEND}")
        value = values[-1]
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return UnauthenticatedError(f"the authorization metadata is not of the form 'Bearer <key>': {HOW_TO_SEND}")
        if not self._matches(token.strip().encode()):
            return UnauthenticatedError(f"the API key is not valid: {HOW_TO_SEND} with a key this server was given")
        return None

    def _matches(self, token: bytes) -> bool:
        # Every key is compared, in constant time, so timing tells nothing about which one nearly matched.
        digest = hashlib.sha256(token).digest()
        matched = False
        for key_digest in self._digests:
            matched |= hmac.compare_digest(digest, key_digest)
        return matched


def _aborting_handler(
    handler: grpc.RpcMethodHandler[Req, Resp], error: UnauthenticatedError
) -> grpc.RpcMethodHandler[Req, Resp]:
    """A handler of the same shape as `handler` that ends the call with `error`'s status.

    grpc.aio accepts a coroutine for every shape (streaming ones then write through the
    context), so one coroutine that aborts serves unary and streaming methods alike.
    """
    code, message = status_for(error)

    async def abort(_request: object, context: grpc.aio.ServicerContext[Req, Resp]) -> None:
        await context.abort(code, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(abort, handler.request_deserializer, handler.response_serializer)
