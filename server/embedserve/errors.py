"""Domain errors and the one table that maps them to gRPC status codes.

Everything a user can get wrong raises one of these with a message that says what to
change. Anything else that escapes is a bug and becomes INTERNAL.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc

from embedserve.kinds import Capability

# How a transport names a capability: the RPCs (or routes) that use it, most direct first.
Words = Callable[[Capability], tuple[str, ...]]


def own_words(capability: Capability) -> tuple[str, ...]:
    """A capability in the engine's words."""
    return (capability.value,)


def quoted(text: str, limit: int = 80) -> str:
    """A caller's text as an error message echoes it: quoted, and cut to `limit` characters with
    its length said. Echoed whole, an 8 KB model name made the gRPC error's metadata too large
    (the client saw a retry-inviting RESOURCE_EXHAUSTED instead of NOT_FOUND) and 100 KB a 502
    over REST."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class EmbedServeError(Exception):
    """Base of every error whose message is meant for the caller.

    A message that names capabilities is given as a function of `Words`, so that each transport
    renders it in its own vocabulary (`render`); str() renders it in the engine's words.
    """

    def __init__(self, message: str | Callable[[Words], str]) -> None:
        self._say = message if callable(message) else None
        super().__init__(message(own_words) if callable(message) else message)

    def render(self, words: Words) -> str:
        """The message, capabilities named in `words`."""
        return str(self) if self._say is None else self._say(words)


class InvalidInputError(EmbedServeError):
    """The request itself is malformed: empty, too long, out of range."""


class ModelNotFoundError(EmbedServeError):
    """The request names a model this server does not serve."""


class WrongModelKindError(EmbedServeError):
    """The named model exists but cannot answer this RPC."""


class OverloadedError(EmbedServeError):
    """The queue is full; the caller should back off and retry, after `retry_after_s` seconds
    where the raiser can estimate when room frees (None: no estimate, the floor of 1 s). Sent
    as the `retry-after` trailer, which Envoy turns into the 429's Retry-After header."""

    def __init__(self, message: str | Callable[[Words], str], *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExpiredError(EmbedServeError):
    """The request's deadline passed before its inputs reached the model."""


class CancelledRequestError(EmbedServeError):
    """The caller went away; its queued work was dropped."""


class UnauthenticatedError(EmbedServeError):
    """The request carries no valid API key."""


class StreamIdleError(EmbedServeError):
    """A stream sent nothing for too long with nothing in flight; the caller may open a new one."""


class ShuttingDownError(EmbedServeError):
    """The server is stopping (SIGTERM); the caller may send what is unanswered again, to another
    replica or once this one is back."""


class EngineFailedError(EmbedServeError):
    """The model worker crashed; a bug or a broken device, never the caller's fault."""


class ConfigError(Exception):
    """Startup configuration that cannot work; the message says what to change. Raised before
    the server serves, so it never reaches a caller and has no status code."""


STATUS_CODES: dict[type[EmbedServeError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    WrongModelKindError: grpc.StatusCode.FAILED_PRECONDITION,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
    CancelledRequestError: grpc.StatusCode.CANCELLED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    StreamIdleError: grpc.StatusCode.UNAVAILABLE,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    EngineFailedError: grpc.StatusCode.INTERNAL,
}


# The trailing metadata key of an overload's retry hint (RFC 9110 Retry-After, delay-seconds).
RETRY_AFTER = "retry-after"


def trailing_metadata(error: BaseException) -> tuple[tuple[str, str], ...]:
    """What a call that ends with `error` sends beside its status: for an overload, how many
    whole seconds (at least 1, as delay-seconds cannot say less) to wait before retrying."""
    if not isinstance(error, OverloadedError):
        return ()
    seconds = 1.0 if error.retry_after_s is None else error.retry_after_s
    return ((RETRY_AFTER, str(max(1, math.ceil(seconds)))),)


def status_for(error: BaseException, words: Words = own_words) -> tuple[grpc.StatusCode, str]:
    """Returns the gRPC status code and message for an exception, capabilities in `words`."""
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None and isinstance(error, EmbedServeError):
            return code, error.render(words)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}): {error}"
