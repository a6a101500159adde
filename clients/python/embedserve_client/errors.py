"""Typed exceptions for gRPC status codes, from RPC errors and from in-band stream errors."""

from __future__ import annotations

import grpc


class EmbedServeError(Exception):
    """An RPC failed; `code` is the gRPC status code and `message` the server's details. `index`
    is the 0-based position, in bulk_embed's whole iterable, of the one input the error is about,
    or None when it is not about one input."""

    def __init__(self, code: grpc.StatusCode, message: str, *, index: int | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.index = index


class CancelledError(EmbedServeError):
    """The RPC was cancelled."""


class UnknownError(EmbedServeError):
    """The server failed in an unknown way."""


class InvalidArgumentError(EmbedServeError):
    """The request is malformed: empty input, a limit exceeded, an unknown prompt; `index` names
    the input when one is to blame."""


class DeadlineExceededError(EmbedServeError):
    """The deadline passed before the server answered."""


class NotFoundError(EmbedServeError):
    """The model is not served; the message lists the served models."""


class AlreadyExistsError(EmbedServeError):
    """The resource already exists."""


class PermissionDeniedError(EmbedServeError):
    """The caller may not do this."""


class ResourceExhaustedError(EmbedServeError):
    """The server is at capacity (queue full, too many concurrent RPCs); retry later."""


class FailedPreconditionError(EmbedServeError):
    """The model cannot answer this RPC (a model of the wrong kind)."""


class AbortedError(EmbedServeError):
    """The operation was aborted."""


class OutOfRangeError(EmbedServeError):
    """A value is out of range."""


class UnimplementedError(EmbedServeError):
    """The server does not implement this RPC."""


class InternalError(EmbedServeError):
    """A server bug."""


class UnavailableError(EmbedServeError):
    """The server cannot be reached or is shutting down; retry later."""


class DataLossError(EmbedServeError):
    """Unrecoverable data loss."""


class UnauthenticatedError(EmbedServeError):
    """The API key is missing or wrong."""


_BY_CODE: dict[grpc.StatusCode, type[EmbedServeError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_for(code: grpc.StatusCode, message: str) -> EmbedServeError:
    """Returns the typed exception for a status code."""
    return _BY_CODE.get(code, EmbedServeError)(code, message)


def from_rpc_error(error: grpc.aio.AioRpcError) -> EmbedServeError:
    """Returns the typed exception for a failed RPC."""
    return error_for(error.code(), error.details() or "")


def from_status_number(number: int, message: str) -> EmbedServeError:
    """Returns the typed exception for a numeric status (an in-band `Error.code`)."""
    return error_for(_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN), message)
