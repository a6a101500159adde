"""Domain errors and the one table that maps them to gRPC status codes.

Everything a user can get wrong raises one of these with a message that says what to
change. Anything else that escapes is a bug and becomes INTERNAL.
"""

from __future__ import annotations

import grpc


class EmbedServeError(Exception):
    """Base of every error whose message is meant for the caller."""


class InvalidInputError(EmbedServeError):
    """The request itself is malformed: empty, too long, out of range."""


class ModelNotFoundError(EmbedServeError):
    """The request names a model this server does not serve."""


class WrongModelKindError(EmbedServeError):
    """The named model exists but cannot answer this RPC."""


class OverloadedError(EmbedServeError):
    """The queue is full; the caller should back off and retry."""


class DeadlineExpiredError(EmbedServeError):
    """The request's deadline passed before its inputs reached the model."""


class CancelledRequestError(EmbedServeError):
    """The caller went away; its queued work was dropped."""


class UnauthenticatedError(EmbedServeError):
    """The request carries no valid API key."""


class EngineFailedError(EmbedServeError):
    """The model worker crashed; a bug or a broken device, never the caller's fault."""


class ConfigError(EmbedServeError):
    """Startup configuration that cannot work; the message says what to change."""


STATUS_CODES: dict[type[EmbedServeError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    WrongModelKindError: grpc.StatusCode.FAILED_PRECONDITION,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
    CancelledRequestError: grpc.StatusCode.CANCELLED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    EngineFailedError: grpc.StatusCode.INTERNAL,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """Returns the gRPC status code and message for an exception."""
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}): {error}"
