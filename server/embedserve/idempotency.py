"""Safe retries: a unary call that carries an idempotency key runs once, and its retries get the
answer it got.

The key is gRPC metadata `idempotency-key`; over REST it is the `Idempotency-Key` header of the
IETF httpapi draft (draft-ietf-httpapi-idempotency-key-header), which Envoy passes on as that
metadata. The draft's value is a Structured Field string (`"8e03978e-..."`); a bare token is taken
as it is. Semantics, as the draft asks:

* the first call with a key runs; a retry with the same key and the same request gets the stored
  answer without running again, marked `idempotent-replayed: true` in its trailing metadata
  (a header for REST clients; see `headers`);
* the same key with another request is FAILED_PRECONDITION, with trailing metadata
  `embedserve-http-status: 422` that Envoy's error filter turns into 422 Unprocessable Content;
* a retry that arrives while the first call still runs is ABORTED (409 Conflict over REST);
* keys are scoped per tenant (the fingerprint of the caller's bearer key) and per method, so no
  caller ever sees another's answers.

What is stored: answers, and the client errors that a retry would get again (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION), as status and message. Anything else (overload, a deadline,
cancellation, a crash) releases the key, so the retry runs. The store is bounded in bytes, least
recently used first out, and entries expire; see `IdempotencyStore`. `EmbedStream` is out of
scope: a stream with a key is refused with INVALID_ARGUMENT rather than silently run without
the guarantee the caller asked for (bulk_embed already resumes a stream where it broke).
"""

from __future__ import annotations

import enum
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from embedserve import headers
from embedserve.errors import EmbedServeError, InvalidInputError, quoted, status_for
from embedserve.intercept import ServiceInterceptor
from embedserve.services.rpc import tenant_of

Req = TypeVar("Req")
Resp = TypeVar("Resp")

KEY_HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
STORED_HEADER = "idempotency-stored"
# Read (and removed) by envoy/openai_errors.lua: the HTTP status a REST error gets instead of the
# transcoder's mapping of its grpc-status.
HTTP_STATUS_HEADER = "embedserve-http-status"
MAX_KEY_LENGTH = 255

# Final client errors: the same request would get them again, so a retry gets them from the store.
STORED_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
)
# What an entry costs beyond its answer, scope and fingerprint (the object, dict slots, tuples):
# counted, so that a flood of keys with tiny answers is bounded by the byte budget too.
ENTRY_OVERHEAD = 512
# An answer bigger than this share of the store is not stored: a few of them would evict all else.
LARGEST_SHARE = 8

# Who asked (tenant), which RPC (the full method name) and the key.
Scope = tuple[str, str, str]

_SF_STRING = re.compile(r'"((?:[^"\\]|\\["\\])*)"')


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended: its serialized answer, or an error status and message."""

    response: bytes | None
    code: grpc.StatusCode | None = None
    message: str = ""


class Begun(enum.Enum):
    """What `IdempotencyStore.begin` says when there is no stored outcome to replay."""

    RUN = "run"  # the key is the caller's now: run the call, then `finish` or `release`
    IN_FLIGHT = "in flight"  # a call with this key and request is running
    MISMATCH = "mismatch"  # the key was used with another request


@dataclass(slots=True)
class _Entry:
    fingerprint: bytes
    outcome: Outcome
    size: int
    expires: float


class IdempotencyStore:
    """Outcomes by scope, at most `max_bytes` of them (least recently used out first), each
    kept for `ttl` seconds after its call ended.

    Calls in flight are held apart and not counted in bytes: each belongs to a running call,
    so there are never more of them than calls the server runs. Everything runs on the
    server's event loop, between awaits, so nothing here needs a lock.
    """

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // LARGEST_SHARE
        self._ttl = ttl
        self._clock = clock
        self._running: dict[Scope, bytes] = {}
        self._done: OrderedDict[Scope, _Entry] = OrderedDict()  # least recently used first
        # The same entries in the order they expire: the TTL is one for all, so that is the
        # order they were stored in, and purging is a walk from the front.
        self._by_expiry: OrderedDict[Scope, None] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._done)

    def begin(self, scope: Scope, fingerprint: bytes) -> Outcome | Begun:
        """The stored outcome for `scope` when `fingerprint` matches it, or what to do instead."""
        self._purge()
        entry = self._done.get(scope)
        if entry is not None:
            if entry.fingerprint != fingerprint:
                return Begun.MISMATCH
            self._done.move_to_end(scope)
            return entry.outcome
        running = self._running.get(scope)
        if running is not None:
            return Begun.IN_FLIGHT if running == fingerprint else Begun.MISMATCH
        self._running[scope] = fingerprint
        return Begun.RUN

    def finish(self, scope: Scope, outcome: Outcome) -> bool:
        """Stores the outcome of the call that began `scope`; False when it is too large to keep
        (the key is then released, and a retry runs again)."""
        fingerprint = self._running.pop(scope, None)
        if fingerprint is None:
            return False
        size = ENTRY_OVERHEAD + sum(map(len, scope)) + len(fingerprint) + len(outcome.message.encode())
        size += len(outcome.response or b"")
        if size > self.max_entry_bytes:
            return False
        while self._done and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._done)))
        self._done[scope] = _Entry(fingerprint, outcome, size, self._clock() + self._ttl)
        self._by_expiry[scope] = None
        self.bytes += size
        return True

    def release(self, scope: Scope) -> None:
        """Forgets the call in flight for `scope`, so that a retry runs."""
        self._running.pop(scope, None)

    def _purge(self) -> None:
        now = self._clock()
        while self._by_expiry:
            scope = next(iter(self._by_expiry))
            if self._done[scope].expires > now:
                break
            self._drop(scope)

    def _drop(self, scope: Scope) -> None:
        entry = self._done.pop(scope)
        del self._by_expiry[scope]
        self.bytes -= entry.size


def idempotency_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The call's idempotency key, None when it has none; raises InvalidInputError for a key
    that cannot be one (empty, over 255 characters, not printable ASCII, sent twice)."""
    values = [value for key, value in metadata or () if key.lower() == KEY_HEADER]
    if not values:
        return None
    how = (
        f"send one {KEY_HEADER} (REST: Idempotency-Key header) of 1 to {MAX_KEY_LENGTH} printable ASCII "
        "characters, a UUID say, the same on every retry of one request"
    )
    if len(values) > 1:
        raise InvalidInputError(f"the call carries {len(values)} {KEY_HEADER} values: {how}")
    value = values[0]
    key = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    if key.startswith('"'):  # the draft's form: a Structured Field string
        quoted = _SF_STRING.fullmatch(key)
        if quoted is None:
            raise InvalidInputError(f"the quoted {KEY_HEADER} is not a Structured Field string: {how}")
        key = re.sub(r'\\(["\\])', r"\1", quoted.group(1))
    if not key:
        raise InvalidInputError(f"the {KEY_HEADER} is empty: {how}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidInputError(f"the {KEY_HEADER} is {len(key)} characters long: {how}")
    if not all(" " <= c <= "~" for c in key):
        raise InvalidInputError(f"the {KEY_HEADER} has characters outside printable ASCII: {how}")
    return key


def fingerprint(method: str, request: Message) -> bytes:
    """What identifies a request: its method and a SHA-256 of the message serialized
    deterministically, so that encodings of one message (REST JSON whose keys come in another
    order or spacing, fields sent in another order) match, and any change of a field does not."""
    digest = hashlib.sha256(method.encode())
    digest.update(b"\0")
    digest.update(request.SerializeToString(deterministic=True))
    return digest.digest()


class IdempotencyInterceptor(ServiceInterceptor):
    """Runs the unary calls of `services` that carry an idempotency key at most once per key
    (see the module's docstring), with `store` holding their outcomes."""

    def __init__(self, services: Iterable[str], store: IdempotencyStore) -> None:
        services = tuple(services)
        super().__init__(services)
        self.store = store
        pool = descriptor_pool.Default()
        self._request_types: dict[str, type[Message]] = {
            f"/{service}/{method.name}": message_factory.GetMessageClass(method.input_type)
            for service in services
            for method in pool.FindServiceByName(service).methods
        }

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        metadata = details.invocation_metadata
        try:
            key = idempotency_key(metadata)
        except InvalidInputError as error:
            return _refusing(handler, error)
        if key is None:
            return handler
        if handler.request_streaming or handler.response_streaming:
            return _refusing(
                handler,
                InvalidInputError(
                    f"{KEY_HEADER} applies to unary calls, not streams: send the stream without it (a client "
                    "resumes a broken stream by resending the requests it has no answer for)"
                ),
            )
        authorization = {name.lower(): value for name, value in metadata or ()}.get("authorization")
        scope = (tenant_of(authorization), details.method, key)
        return _Once(self.store, handler, self._request_types[details.method], scope).handler()


class _Once:
    """One keyed unary call: replays a stored outcome, refuses a misused key, or runs the call
    and stores how it ended."""

    def __init__(
        self,
        store: IdempotencyStore,
        handler: grpc.RpcMethodHandler[Any, Any],
        request_type: type[Message],
        scope: Scope,
    ) -> None:
        self._store = store
        self._behavior: Any = handler.unary_unary
        self._serialize: Callable[[Any], bytes] = handler.response_serializer or _as_bytes
        self._deserializer = handler.request_deserializer
        self._request_type = request_type
        self._scope = scope

    def handler(self) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler of the call; it answers serialized bytes, once serialized here to be stored."""
        return grpc.unary_unary_rpc_method_handler(self._unary, self._deserializer, None)

    async def _unary(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        # Inside DecodeGuard's position the request is a message; outside it (where app.py puts
        # this) it is still the bytes DecodeGuard decodes. Either way the fingerprint is the
        # decoded message's, re-serialized deterministically.
        _, method, key = self._scope
        if isinstance(request, bytes):
            try:
                message = self._request_type.FromString(request)
            except Exception:  # DecodeGuard, inside, answers INVALID_ARGUMENT saying what is wrong
                return self._serialize(await self._behavior(request, context))
        else:
            message = request
        begun = self._store.begin(self._scope, fingerprint(method, message))
        if isinstance(begun, Outcome):
            return await _replay(begun, context)
        if begun is Begun.MISMATCH:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the {KEY_HEADER} {quoted(key, 64)} was used with a different {_rpc(method)} request: resend that "
                "same request to get its answer, or use a new key for a new request",
                trailing_metadata=((HTTP_STATUS_HEADER, "422"),),
            )
        if begun is Begun.IN_FLIGHT:
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"a {_rpc(method)} request with this {KEY_HEADER} is still being answered: retry later, with "
                "backoff and the same key, to get its answer",
            )
        return await self._run(request, context)

    async def _run(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            data = self._serialize(await self._behavior(request, context))
        except BaseException:  # an abort, a cancellation or a bug: store only what a retry gets again
            code = context.code()
            if code in STORED_CODES:
                details = context.details()
                message = details.decode(errors="replace") if isinstance(details, bytes) else details or ""
                self._store.finish(self._scope, Outcome(None, code, message))
            else:
                self._store.release(self._scope)
            raise
        if not self._store.finish(self._scope, Outcome(data)):
            headers.add(context, [(STORED_HEADER, "false")])
        return data


async def _replay(outcome: Outcome, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """Answers as the first call was answered, marked as a replay."""
    marker = ((REPLAYED_HEADER, "true"),)
    if outcome.response is not None:
        headers.add(context, list(marker))
        return outcome.response
    assert outcome.code is not None
    await context.abort(outcome.code, outcome.message, trailing_metadata=marker)
    raise AssertionError("unreachable: abort raises")


def _rpc(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _as_bytes(response: Any) -> bytes:
    return response if isinstance(response, bytes) else bytes(response.SerializeToString())


def _refusing(handler: grpc.RpcMethodHandler[Req, Resp], error: EmbedServeError) -> grpc.RpcMethodHandler[Req, Resp]:
    """A handler of `handler`'s shape that ends the call with `error`'s status before it runs
    (grpc.aio takes a coroutine for every shape)."""
    code, message = status_for(error)

    async def abort(_request: object, context: grpc.aio.ServicerContext[Req, Resp]) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(abort, handler.request_deserializer, handler.response_serializer)
