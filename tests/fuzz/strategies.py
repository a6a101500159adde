"""Hypothesis strategies for hostile requests: native messages with field values within and far
beyond their ranges, bytes that are almost (or not at all) protobuf, call metadata, and the
JSON bodies, headers, methods and paths a REST client could send.

Sizes are bounded so that one example costs milliseconds on a 2-core CI machine: long texts and
names are a short random piece repeated (cheap to draw), and requests with many inputs are a
minority of examples whose texts are short.
"""

from __future__ import annotations

import json
import operator
import re
import string
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from google.protobuf.message import Message
from hypothesis import strategies as st

from embedserve.settings import DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL, Settings
from embedserve.v1 import embedding_service_pb2 as pb

M = TypeVar("M", bound=Message)
Strategy = st.SearchStrategy

# The `server` fixture runs the default settings.
MAX_INPUTS = Settings().max_inputs_per_request
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# Any code point protobuf can carry: surrogates cannot be encoded as UTF-8, so a client cannot
# send them (the raw-bytes strategies below send their bytes anyway).
CHARS = st.characters(exclude_categories=["Cs"])
# Texts that tokenizers, prompts and JSON escaping treat specially.
EDGE_TEXTS = (
    " ",
    "\x00",
    "\t\n\r\x0b\x0c",
    "\u200b\u200d",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "\U0010ffff",
    "e\u0301\u0301\u0301",
    "\u202eevil",
    "🚀👩‍👩‍👧",
    "İıßﬃ",
    "\u3000",
    "[CLS]",
    "[SEP] [PAD] [MASK]",
    "[UNK]" * 50,
    "<s></s><pad>",
    "query: ",
    '"\\/\b\f',
    "%s%n{0}",
)


def texts() -> Strategy[str]:
    """A text: random unicode, an edge case, or a long repetition (up to 40,000 characters)."""
    return st.one_of(
        st.text(CHARS, max_size=40),
        st.sampled_from(EDGE_TEXTS),
        st.builds(operator.mul, st.text(CHARS, min_size=1, max_size=8), st.integers(100, 5000)),
    )


def input_lists(many: bool = True) -> Strategy[list[str]]:
    """Inputs of a request: mostly a few texts of any kind (or none); with `many`, one time in
    ten many short ones, up to MAX_INPUTS and one past it (refused before any work is done, so
    drawn more often than MAX_INPUTS itself, which costs most of a second on a 2-core machine)."""
    few = mostly(st.lists(texts(), min_size=1, max_size=6), st.just([]))
    if not many:
        return few
    lots = st.builds(
        lambda pieces, count: (pieces * count)[:count],
        st.lists(st.text(CHARS, min_size=1, max_size=6), min_size=1, max_size=3),
        st.sampled_from((64, 300, MAX_INPUTS + 1, MAX_INPUTS + 1, MAX_INPUTS)),
    )
    return mostly(few, lots, tenths=9)


def names(known: tuple[str, ...]) -> Strategy[str]:
    """A model or prompt name: a known one (varied), random, path-like, or up to 100,000
    characters long."""
    odd = st.sampled_from(
        ("", " ", "../../etc/passwd", "/", "\x00", "C:\\model", "https://example.com/model", "%2e%2e", "*")
    )
    varied = st.sampled_from(known).flatmap(
        lambda name: st.sampled_from((name, name.upper(), f" {name}", f"{name}/", f"{name}\x00"))
    )
    long = st.builds(operator.mul, st.text(CHARS, min_size=1, max_size=10), st.integers(500, 10_000))
    return st.one_of(varied, odd, st.text(CHARS, max_size=30), long)


def mostly(usual: Strategy[Any], hostile: Strategy[Any], tenths: int = 8) -> Strategy[Any]:
    """`usual` about `tenths` times in ten, else `hostile`: each field mostly valid, so that most
    requests get past the first check and reach the ones behind it, and the model. (Not
    st.one_of(usual, usual, usual, usual, hostile): one_of flattens the branches of a hostile
    one_of into its own, and draws each branch as often.)"""
    return st.integers(0, 9).flatmap(lambda i: usual if i < tenths else hostile)


def models(served: str) -> Strategy[str]:
    """The model field of a request to an RPC that `served` (or the default, "") answers."""
    return mostly(st.sampled_from(("", served)), names((DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL)))


# The default dense model has no prompts, so any name but "" is INVALID_ARGUMENT: mostly "".
PROMPT_NAMES = mostly(st.just(""), names(("query", "document", "passage")))


def int32s(*interesting: int) -> Strategy[int]:
    """Any int32, with its edges, the values around 0 and `interesting` ones drawn often."""
    edges = (INT32_MIN, INT32_MIN + 1, -1, 0, 1, 2, INT32_MAX - 1, INT32_MAX, *interesting)
    return st.one_of(st.sampled_from(edges), st.integers(-3, 400), st.integers(INT32_MIN, INT32_MAX))


def enum_numbers(declared: Iterable[int]) -> Strategy[int]:
    """An enum field's number: a `declared` value or any other int32 (proto3 enums are open)."""
    return st.one_of(st.sampled_from(sorted(declared)), int32s())


FLOAT32S = st.one_of(
    st.sampled_from((0.0, -0.0, 1e-45, 1.0, 3.4e38, float("inf"), float("-inf"), float("nan"))),
    st.floats(width=32),
)


def message(cls: type[M]) -> Callable[..., M]:
    """A constructor of `cls` that leaves the fields given None unset (proto3 `optional`)."""

    def build(**fields: Any) -> M:
        return cls(**{name: value for name, value in fields.items() if value is not None})

    return build


def maybe(strategy: Strategy[Any]) -> Strategy[Any]:
    """The strategy's values, or None (the field left unset)."""
    return st.none() | strategy


def embed_requests(many: bool = True) -> Strategy[pb.EmbedRequest]:
    """EmbedRequests with every field in range and beyond it (`many`: see input_lists)."""
    return st.builds(
        message(pb.EmbedRequest),
        model=models(DEFAULT_DENSE_MODEL),
        inputs=input_lists(many),
        dimensions=mostly(st.none() | st.integers(1, 384), int32s(383, 384, 385)),
        normalize=maybe(st.booleans()),
        truncate=maybe(st.booleans()),
        prompt_name=PROMPT_NAMES,
        prompt=mostly(st.none(), texts()),
        encoding=enum_numbers(pb.VectorEncoding.values()),
        priority=enum_numbers(pb.Priority.values()),
    )


def sparse_requests() -> Strategy[pb.SparseEmbedRequest]:
    """SparseEmbedRequests with every field in range and beyond it."""
    return st.builds(
        message(pb.SparseEmbedRequest),
        model=models(DEFAULT_SPARSE_MODEL),
        inputs=input_lists(),
        truncate=maybe(st.booleans()),
        top_k=mostly(st.none() | st.integers(1, 300), int32s()),
        min_weight=mostly(st.none() | st.floats(0, 3, width=32), FLOAT32S),
        return_tokens=st.booleans(),
        priority=enum_numbers(pb.Priority.values()),
    )


def rerank_requests() -> Strategy[pb.RerankRequest]:
    """RerankRequests with every field in range and beyond it."""
    return st.builds(
        message(pb.RerankRequest),
        model=models(DEFAULT_DENSE_MODEL),
        query=texts(),
        documents=input_lists(),
        top_n=mostly(st.none() | st.integers(1, 10), int32s()),
        return_documents=st.booleans(),
        raw_scores=st.booleans(),
        truncate=maybe(st.booleans()),
        priority=enum_numbers(pb.Priority.values()),
    )


def stream_requests() -> Strategy[list[pb.EmbedStreamRequest]]:
    """The requests of one EmbedStream, ids "0", "1", ... (some without a request at all), with
    few inputs each: a stream of requests with many costs seconds."""
    request = mostly(embed_requests(many=False), st.none())
    return st.lists(request, min_size=1, max_size=5).map(
        lambda requests: [message(pb.EmbedStreamRequest)(id=str(i), request=r) for i, r in enumerate(requests)]
    )


REQUESTS: dict[str, Callable[[], Strategy[Any]]] = {
    "Embed": embed_requests,
    "SparseEmbed": sparse_requests,
    "Rerank": rerank_requests,
    "ListModels": lambda: st.just(pb.ListModelsRequest()),
}


# --- call metadata -------------------------------------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
METADATA_VALUES = {
    "x-embedserve-priority": ("interactive", "bulk", " BULK ", "Interactive", "urgent", "", "interactive,bulk"),
    "idempotency-key": ("k1", "k2", '"k1"', '"quoted \\" key"', '"unterminated', '""', "", " ", "k" * 256),
    "authorization": ("Bearer rest-key-1", "bearer rest-key-2", "Bearer ", "Basic abc", "rest-key-1", ""),
    "x-request-id": ("1",),
}


def metadata() -> Strategy[tuple[tuple[str, str], ...]]:
    """Up to three entries of the metadata the server reads (priority, idempotency key, API
    key; repeated keys included) and one it does not, with meaningful or random ASCII values
    (gRPC carries nothing else in a text entry)."""
    entry = st.sampled_from(sorted(METADATA_VALUES)).flatmap(
        lambda key: st.tuples(
            st.just(key), st.sampled_from(METADATA_VALUES[key]) | st.text(PRINTABLE, max_size=300).map(str.strip)
        )
    )
    return mostly(st.just(()), st.lists(entry, min_size=1, max_size=3).map(tuple))


# --- raw bytes ------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def _wire_field(draw: st.DrawFn) -> bytes:
    """One protobuf field with a random number and wire type, and a payload that may lie about
    its length or hold bytes that are not UTF-8 in a string field."""
    number = draw(st.integers(0, 20) | st.integers(0, 2**29))
    wire = draw(st.integers(0, 7))
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(draw(st.integers(0, 2**70)))
    if wire in (1, 5):
        return tag + draw(st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1 else 4))
    if wire == 2:
        payload = draw(st.binary(max_size=40) | st.text(CHARS, max_size=20).map(str.encode))
        length = draw(st.just(len(payload)) | st.integers(0, 2**35))
        return tag + _varint(length) + payload
    return tag  # groups (3, 4) and the invalid 6, 7: nothing follows


def protobuf_shaped() -> Strategy[bytes]:
    """A few random fields: bytes that look like protobuf to a parser."""
    return st.lists(_wire_field(), min_size=1, max_size=6).map(b"".join)


@st.composite
def mutated(draw: st.DrawFn, base: Strategy[bytes]) -> bytes:
    """`base` bytes with a few bytes flipped, inserted, deleted, or the tail cut off."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(("flip", "insert", "delete", "cut")))
        if kind == "insert" or not data:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "flip":
            data[min(position, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 4))]
        else:
            del data[position:]
    return bytes(data)


def raw_requests(messages: Strategy[Message]) -> Strategy[bytes]:
    """Bytes for a method whose valid requests are `messages`: random, protobuf-shaped, a valid
    request as it is, or mutated."""
    valid = messages.map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(max_size=300), protobuf_shaped(), valid, mutated(valid), mutated(valid))


# --- REST -----------------------------------------------------------------------------------

# Every route of openai_service.proto's google.api.http rules.
EMBEDDINGS = ("/v1/embeddings", "/embeddings")
SPARSE = ("/v1/embed_sparse",)
RERANK = ("/v1/rerank", "/rerank")
MODEL_LIST = ("/v1/models", "/models")
POST_ROUTES = (*EMBEDDINGS, *SPARSE, *RERANK)

JSON_SCALARS: Strategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from((10**400, -(10**400), 2**31, 2**32, 2**53 + 1, 2**64)),
    st.floats(),  # NaN and infinities too, which json.dumps writes as invalid JSON
    st.text(CHARS, max_size=20),
)
JSON_VALUES: Strategy[Any] = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(CHARS, max_size=8), children, max_size=4),
    max_leaves=12,
)


def nested(depth: Strategy[int]) -> Strategy[Any]:
    """A text inside `depth` arrays or objects, past protobuf's nesting limit (100) too."""

    def wrap(levels: int, as_object: bool) -> Any:
        value: Any = "x"
        for _ in range(levels):
            value = {"a": value} if as_object else [value]
        return value

    return st.builds(wrap, depth, st.booleans())


NOTHING: Strategy[Any] = st.nothing()


def _field(right: Strategy[Any], wrong: Strategy[Any] = NOTHING) -> Strategy[Any]:
    """A field's value: nine times in ten `right`, else `wrong` ones of its type or any JSON
    (wrong types, nesting past the limits, huge numbers)."""
    return mostly(right, st.one_of(wrong, JSON_VALUES, nested(st.integers(1, 130))), tenths=9)


# Numbers for int32 fields that protobuf's JSON parser must refuse, or reads differently.
_NOT_INT32 = st.sampled_from((2**31, 10**12, -(2**40), 1.5, "3", "x", 1e400))
_BOOLS = _field(st.booleans(), st.sampled_from(("true", 1, 0)))
ROUTE_FIELDS: dict[str, dict[str, Strategy[Any]]] = {
    "embeddings": {
        "model": _field(models(DEFAULT_DENSE_MODEL)),
        "input": _field(texts() | input_lists()),
        "encoding_format": _field(
            st.sampled_from(("float", "base64")), st.sampled_from(("", "FLOAT", "binary")) | texts()
        ),
        "dimensions": _field(st.integers(1, 384), int32s(385) | _NOT_INT32),
        "user": _field(texts()),
        "normalize": _BOOLS,
        "truncate": _BOOLS,
        "prompt_name": _field(PROMPT_NAMES),
        "prompt": _field(texts()),
    },
    "embed_sparse": {
        "model": _field(models(DEFAULT_SPARSE_MODEL)),
        "input": _field(texts() | input_lists()),
        "truncate": _BOOLS,
        "top_k": _field(st.integers(1, 300), int32s() | _NOT_INT32),
        "min_weight": _field(st.floats(0, 3), st.floats(allow_nan=False, allow_infinity=False) | st.just("NaN")),
        "return_tokens": _BOOLS,
    },
    "rerank": {
        "model": _field(models(DEFAULT_DENSE_MODEL)),
        "query": _field(texts()),
        "documents": _field(input_lists()),
        "top_n": _field(st.integers(1, 10), int32s() | _NOT_INT32),
        "return_documents": _BOOLS,
        "raw_scores": _BOOLS,
        "truncate": _BOOLS,
    },
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# Every JSON name of the routes' fields, as proto names and as the lowerCamelCase ones the
# transcoder also accepts, lowercased: unknown fields are drawn from outside it, so that the
# body's known fields are the ones the test expects the server to read.
LOWER_NAMES = frozenset(
    name.lower() for fields in ROUTE_FIELDS.values() for field in fields for name in (field, _camel(field))
)


def route_name(path: str) -> str:
    """The ROUTE_FIELDS entry of a POST route."""
    return path.rsplit("/", 1)[-1]


# The fields a route needs (its texts): present nine times in ten, the others half the time.
REQUIRED = {"embeddings": ("input",), "embed_sparse": ("input",), "rerank": ("query", "documents")}


def bodies(route: str) -> Strategy[Any]:
    """A JSON body for `route`: its fields, each present or not, of its type or not, sometimes
    with unknown fields beside them; sometimes not an object at all."""
    fields = ROUTE_FIELDS[route]
    needed = {name: fields[name] for name in REQUIRED[route]}
    known = mostly(
        st.fixed_dictionaries(needed, optional={k: v for k, v in fields.items() if k not in needed}),
        st.fixed_dictionaries({}, optional=fields),
        tenths=9,
    )
    unknown = st.dictionaries(st.text(CHARS, max_size=10).filter(lambda k: k.lower() not in LOWER_NAMES), JSON_VALUES)
    shaped = st.builds(lambda known, extra: {**extra, **known}, known, mostly(st.just({}), unknown))
    return mostly(shaped, JSON_VALUES, tenths=9)


def encoded(body: Any) -> bytes:
    """A body as a client's JSON encoder writes it (NaN and infinities as JSON does not allow)."""
    return json.dumps(body, ensure_ascii=False).encode()


def raw_bodies(route: str) -> Strategy[bytes]:
    """Body bytes that are not a JSON encoder's: random, valid JSON with bytes flipped (often not
    UTF-8 then), cut short, or with bytes that are not UTF-8 inside a string."""
    valid = bodies(route).map(encoded)
    # A stray continuation byte, an overlong "/", a lone surrogate, a cut sequence, a byte UTF-8 never has.
    invalid = st.sampled_from((b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xff"))
    not_utf8 = st.builds(
        lambda text, before, junk, after: encoded({"input": text}).replace(
            b'"input": "', b'"input": "' + before + junk + after, 1
        ),
        texts(),
        st.binary(max_size=3),
        invalid,
        st.binary(max_size=3),
    )
    return st.one_of(st.binary(max_size=200), mutated(valid), mutated(valid), not_utf8)


CONTENT_TYPES = st.one_of(
    st.just("application/json"),
    st.sampled_from(
        (
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "APPLICATION/JSON",
            "text/plain",
            "text/html",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/octet-stream",
            "application/grpc",
            "application/grpc+json",
            "application/grpc-web",
            "application/grpc-web-text",
            "application/x-protobuf",
            "*/*",
            "",
        )
    ),
    st.text(PRINTABLE, max_size=40).map(str.strip),
)

METHODS = st.sampled_from(("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"))
# What a request target may hold without the client library refusing to send it.
_PATH_CHARS = st.sampled_from(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%?")
PATHS = st.one_of(
    st.sampled_from((*POST_ROUTES, *MODEL_LIST, "/health")),
    st.builds(
        operator.add,
        st.sampled_from((*POST_ROUTES, *MODEL_LIST, "/v1", "/", "//v1/embeddings", "/v1/embeddings/")),
        st.sampled_from(("", "/", "/x", "?", "?model=x", "?input=a&input=b", "%00", "%2F..%2F", "/../models")),
    ),
    st.sampled_from(
        (
            "/v1/chat/completions",
            "/embedserve.v1.OpenAIService/CreateEmbeddings",
            "/embedserve.v1.EmbeddingService/Embed",
            "/grpc.health.v1.Health/Check",
            "/v2/embeddings",
            "/%ff%fe",
        )
    ),
    st.text(_PATH_CHARS, max_size=40).map(lambda tail: "/" + tail),
)

# Header values as bytes: any octet a client may put in a field value (RFC 9110: visible ASCII,
# spaces inside, and obs-text 0x80-0xff that is not UTF-8 as often as it is); a client library
# refuses white space around a value.
_HEADER_OCTETS = st.lists(st.integers(0x21, 0x7E) | st.integers(0x80, 0xFF) | st.just(0x20), max_size=80).map(bytes)
HEADERS = mostly(
    st.just({}),
    st.dictionaries(
        st.sampled_from((b"x-embedserve-priority", b"idempotency-key", b"authorization", b"x-anything")),
        (
            st.sampled_from(METADATA_VALUES["x-embedserve-priority"] + METADATA_VALUES["idempotency-key"]).map(
                str.encode
            )
            | _HEADER_OCTETS
        ).map(bytes.strip),
        min_size=1,
        max_size=3,
    ),
)

# envoy/openai_errors.lua's native_grpc: one of gRPC's content types (not gRPC-Web's) to a
# method path, /<package>.<Service>/<Method>. Envoy passes such a call through as gRPC.
_GRPC_CONTENT_TYPE = re.compile(r"application/grpc([+;].*)?", re.ASCII | re.DOTALL)
_GRPC_METHOD_PATH = re.compile(r"/[A-Za-z_]\w*\.[\w.]*/[A-Za-z_]\w*", re.ASCII)


def native_grpc(content_type: str, path: str) -> bool:
    """Whether Envoy takes a request for a native gRPC call rather than REST."""
    return bool(_GRPC_CONTENT_TYPE.fullmatch(content_type.lower()) and _GRPC_METHOD_PATH.fullmatch(path))
