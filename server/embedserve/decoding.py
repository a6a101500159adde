"""Requests that do not decode get INVALID_ARGUMENT, not UNKNOWN with a Python class name.

grpc decodes each message before the handler runs, and a deserializer that raises (a corrupt
message, a string field that is not UTF-8, JSON nested past protobuf's depth limit once Envoy
transcoded it) ends the call with a status the server cannot choose. So the services' messages
arrive as bytes, and are decoded here, where a failure becomes INVALID_ARGUMENT saying what is wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from embedserve.errors import InvalidInputError, status_for
from embedserve.intercept import ServiceInterceptor

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class DecodeGuard(ServiceInterceptor):
    """Decodes the requests of the guarded services itself (unary and bidirectional streaming)."""

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        decode = handler.request_deserializer
        if decode is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if not handler.request_streaming and not handler.response_streaming:
            return _guarded_unary(handler, decode, method)
        if handler.request_streaming and handler.response_streaming:
            return _guarded_stream(handler, decode, method)
        return handler


def _invalid(method: str, error: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"the {method} request is not a valid message ({error}): send a well-formed protobuf message, "
        "with UTF-8 text in every string field (or, over REST, JSON nested at most a few levels deep)"
    )


def _guarded_unary(
    handler: grpc.RpcMethodHandler[Any, Any], decode: Callable[[bytes], Any], method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    behavior: Any = handler.unary_unary

    async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = decode(raw)
        except Exception as exc:
            await context.abort(*status_for(_invalid(method, exc)))
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)


def _guarded_stream(
    handler: grpc.RpcMethodHandler[Any, Any], decode: Callable[[bytes], Any], method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    behavior: Any = handler.stream_stream

    async def stream(
        raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        # A message that does not decode ends the stream: the servicer turns the error into its
        # status once the answers in flight are sent.
        async def requests() -> AsyncIterator[Any]:
            async for raw in raw_requests:
                try:
                    request = decode(raw)
                except Exception as exc:
                    raise _invalid(method, exc) from None
                yield request

        async for response in behavior(requests(), context):
            yield response  # WorkLimiter, outside, writes them

    return grpc.stream_stream_rpc_method_handler(stream, None, handler.response_serializer)
