"""Concurrency limits that count work, not connections: unary calls of the embedding services
against MAX_CONCURRENCY, open streams against MAX_STREAMS. Health and reflection are never
counted, so no number of open streams or calls can make health lie or lock grpcurl out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import grpc

from embedserve.errors import OverloadedError, status_for, trailing_metadata
from embedserve.intercept import ServiceInterceptor

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class WorkLimiter(ServiceInterceptor):
    """Refuses, with RESOURCE_EXHAUSTED at once, a unary call or a stream of the limited services
    beyond its limit; `unary` and `streams` say how many run now, and `on_refused` (the server's
    metrics) hears of each refusal with the limit's name: `max_concurrency` or `max_streams`."""

    def __init__(self, services: Iterable[str], max_unary: int, max_streams: int) -> None:
        super().__init__(services)
        self.max_unary = max_unary
        self.max_streams = max_streams
        self.unary = 0
        self.streams = 0
        self.on_refused: Callable[[str], None] | None = None

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        if handler.request_streaming and handler.response_streaming:
            return self._counted_stream(handler)
        if not handler.request_streaming and not handler.response_streaming:
            return self._counted_unary(handler)
        return handler  # no such method in our services

    def _counted_unary(self, handler: grpc.RpcMethodHandler[Req, Resp]) -> grpc.RpcMethodHandler[Req, Resp]:
        behavior: Any = handler.unary_unary

        async def unary(request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
            if self.unary >= self.max_unary:
                self._refused("max_concurrency")
                await _refuse(
                    context,
                    f"the server is answering {self.unary} unary requests, its MAX_CONCURRENCY: retry later "
                    "with backoff",
                )
            self.unary += 1
            try:
                result: Resp = await behavior(request, context)
                return result
            finally:
                self.unary -= 1

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)

    def _counted_stream(self, handler: grpc.RpcMethodHandler[Req, Resp]) -> grpc.RpcMethodHandler[Req, Resp]:
        behavior: Any = handler.stream_stream

        async def stream(requests: AsyncIterator[Req], context: grpc.aio.ServicerContext[Req, Resp]) -> None:
            if self.streams >= self.max_streams:
                self._refused("max_streams")
                await _refuse(
                    context,
                    f"the server has {self.streams} streams open, its MAX_STREAMS: close idle streams, or retry "
                    "later with backoff",
                )
            self.streams += 1
            try:
                async for response in behavior(requests, context):
                    await context.write(response)
            finally:
                self.streams -= 1

        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)

    def _refused(self, limit: str) -> None:
        if self.on_refused is not None:
            self.on_refused(limit)


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], message: str) -> None:
    """Ends the call with RESOURCE_EXHAUSTED, `message` and a retry-after of 1 s, the floor:
    the limit counts calls in flight, and the next one to end makes room."""
    error = OverloadedError(message, retry_after_s=1)
    await context.abort(*status_for(error), trailing_metadata=trailing_metadata(error))
