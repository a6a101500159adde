"""The base of the server's interceptors: they act on the RPCs of some services only (the
embedding services), and every other RPC (health, reflection) passes untouched."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class ServiceInterceptor(grpc.aio.ServerInterceptor, ABC):
    """Hands the handler of every RPC of `services` to `wrap`, which returns the one to run."""

    def __init__(self, services: Iterable[str]) -> None:
        self._prefixes = tuple(f"/{service}/" for service in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        return self.wrap(handler, handler_call_details)

    @abstractmethod
    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        """The handler to run instead of `handler` for this call."""
