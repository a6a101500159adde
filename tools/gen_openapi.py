"""Generates the OpenAPI 3.1 document of the REST API from the descriptor set that Envoy's
gRPC-JSON transcoder loads, so that the document and the routes can never disagree.

No kept generator installs from the registries these machines reach (grpc-gateway's
protoc-gen-openapiv2 and gnostic's protoc-gen-openapi are Go binaries; the PyPI packages named
after them carry only the Python bindings of their option protos), so this reads the
FileDescriptorSet itself: every RPC with a google.api.http rule (additional bindings included)
becomes an operation, with its path parameters, query parameters and body as the HTTP rule binds
them; request and response schemas follow proto3's JSON mapping as the transcoder prints it
(envoy/envoy.yaml: proto field names, 64-bit integers as strings, enums as names, bytes as
base64), a request's fields null too, which the transcoder reads as unset; descriptions are the
proto comments (SourceCodeInfo). Errors are the OpenAI-shaped body that envoy/openai_errors.lua
writes.

Usage:
  python tools/gen_openapi.py DESCRIPTOR_SET OUT.json
      DESCRIPTOR_SET as `python tools/gen_proto.py --descriptor FILE` builds it (`make openapi`
      does both; envoy/gateway.py does both at each start and serves the document).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2

Json = dict[str, Any]
FieldProto = descriptor_pb2.FieldDescriptorProto
Comments = dict[tuple[int, ...], str]  # a file's comments by SourceCodeInfo path

OPENAPI_VERSION = "3.1.0"
ERROR_SCHEMA = "ErrorResponse"
JSON_MEDIA = "application/json"
# A message whose HTTP body is its `data`, sent as its `content_type` says: no JSON to describe.
HTTP_BODY = ".google.api.HttpBody"
RAW_CONTENT: Json = {"*/*": {"schema": {}}}
# HttpRule's pattern fields, and the `custom` kinds that OpenAPI has an operation for.
HTTP_METHODS = ("get", "put", "post", "delete", "patch")
CUSTOM_METHODS = ("head", "options", "trace")
# The statuses every REST route can answer, the description of each, and what the error body's
# `code` then says (envoy/openai_errors.lua writes the body).
ERROR_STATUSES = {
    "400": "The request is malformed or out of range: bad JSON, an unknown enum name, an empty or missing "
    "input, a value outside its limits, a model of the wrong kind (`invalid_argument`, "
    "`failed_precondition`). The message says what to change.",
    "401": "The server has API keys and the request sent none or a wrong one (`unauthenticated`): send "
    "`Authorization: Bearer <key>`.",
    "404": "Unknown model (the message lists the served ones) or path (`not_found`).",
    "409": "A request with the same `Idempotency-Key` is still running (`aborted`): retry later.",
    "413": "The body is larger than the server's MAX_MESSAGE_BYTES (`request_too_large`): send fewer or "
    "shorter inputs per request.",
    "415": "A gRPC content type on a REST path (`unsupported_media_type`): send `application/json`.",
    "422": "The `Idempotency-Key` was used before for another request (`failed_precondition`): use a new key "
    "for a new request.",
    "429": "The model's queue is full (`resource_exhausted`): retry after the `Retry-After` header's seconds.",
    "503": "The server is starting, draining or cannot be reached (`unavailable`): retry.",
}
# proto3 JSON of the scalar types, as the transcoder prints them.
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_INT32 = {"type": "integer", "format": "int32"}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_T = FieldProto
SCALARS: dict[int, Json] = {
    _T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _T.TYPE_FLOAT: {"type": "number", "format": "float"},
    _T.TYPE_INT32: _INT32,
    _T.TYPE_SINT32: _INT32,
    _T.TYPE_SFIXED32: _INT32,
    _T.TYPE_UINT32: _UINT32,
    _T.TYPE_FIXED32: _UINT32,
    _T.TYPE_INT64: _INT64,
    _T.TYPE_SINT64: _INT64,
    _T.TYPE_SFIXED64: _INT64,
    _T.TYPE_UINT64: _UINT64,
    _T.TYPE_FIXED64: _UINT64,
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
_WRAPPERS = {
    "DoubleValue": _T.TYPE_DOUBLE,
    "FloatValue": _T.TYPE_FLOAT,
    "Int64Value": _T.TYPE_INT64,
    "UInt64Value": _T.TYPE_UINT64,
    "Int32Value": _T.TYPE_INT32,
    "UInt32Value": _T.TYPE_UINT32,
    "BoolValue": _T.TYPE_BOOL,
    "StringValue": _T.TYPE_STRING,
    "BytesValue": _T.TYPE_BYTES,
}
# The well-known types, which proto3's JSON mapping prints in their own form.
WELL_KNOWN: dict[str, Json] = {
    ".google.protobuf.Value": {},  # any JSON value
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.NullValue": {"type": "null"},
    ".google.protobuf.Empty": {"type": "object"},
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"},
    ".google.protobuf.FieldMask": {"type": "string"},
    ".google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    **{f".google.protobuf.{name}": SCALARS[kind] for name, kind in _WRAPPERS.items()},
}
# Field numbers in descriptor.proto, as SourceCodeInfo paths use them.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2
# The JSON types a query parameter can carry (enums are strings).
QUERY_TYPES = ("string", "number", "integer", "boolean")
# A variable of a path template, {field.path} or {field.path=segments}.
_VARIABLE = re.compile(r"\{([A-Za-z_][\w.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class _Declared:
    """A message or enum of the descriptor set, with its comment."""

    proto: descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto
    comment: str
    field_comments: dict[str, str]  # message fields, or enum values, by name


@dataclass(frozen=True)
class Route:
    """One HTTP binding of an RPC: what `paths` gets an operation for."""

    service: str  # full name, embedserve.v1.OpenAIService
    method: descriptor_pb2.MethodDescriptorProto
    comment: str
    http_method: str  # lower case, as OpenAPI's path item keys
    template: str  # the rule's path template, /v1/models/{id=**}
    body: str  # "", "*" or a request field name
    response_body: str
    binding: int  # 0 for the rule itself, 1.. for its additional_bindings


def _comment(location: descriptor_pb2.SourceCodeInfo.Location) -> str:
    """A proto comment as a description: the leading comment (else the trailing one), each
    line without the space after `//`."""
    text = location.leading_comments or location.trailing_comments
    lines = [line[1:] if line.startswith(" ") else line for line in text.strip("\n").split("\n")]
    return "\n".join(lines).strip()


def _comments(file: descriptor_pb2.FileDescriptorProto) -> Comments:
    return {tuple(loc.path): _comment(loc) for loc in file.source_code_info.location if _comment(loc)}


def _summary(comment: str) -> str:
    """The first sentence of a comment, on one line."""
    first = " ".join(comment.split("\n\n", 1)[0].split())
    match = re.match(r"(.+?\.)(\s|$)", first)
    return match.group(1) if match else first


def _bindings(rule: http_pb2.HttpRule) -> Iterator[tuple[str, str, str, str]]:
    """(method, template, body, response_body) of a rule and of each of its additional bindings."""
    for current in (rule, *rule.additional_bindings):
        kind = current.WhichOneof("pattern")
        if kind in HTTP_METHODS:
            method, template = kind, getattr(current, kind)
        elif kind == "custom" and current.custom.kind.lower() in CUSTOM_METHODS:
            method, template = current.custom.kind.lower(), current.custom.path
        else:
            raise ValueError(f"HTTP rule {current} has no method OpenAPI can describe")
        yield method, template, current.body, current.response_body


@dataclass
class Descriptors:
    """What the generator reads from a FileDescriptorSet: its messages and enums by full name
    (".pkg.Name"), with their comments, and its routes."""

    types: dict[str, _Declared] = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)
    services: dict[str, str] = field(default_factory=dict)  # full name -> comment, those with routes

    @classmethod
    def read(cls, descriptor_set: descriptor_pb2.FileDescriptorSet) -> Descriptors:
        """Indexes every file of the set (imports included: they declare the well-known types)."""
        found = cls()
        for file in descriptor_set.file:
            comments = _comments(file)
            scope = f".{file.package}" if file.package else ""
            for i, message in enumerate(file.message_type):
                found._message(message, scope, (_FILE_MESSAGE, i), comments)
            for i, enum in enumerate(file.enum_type):
                found._enum(enum, scope, (_FILE_ENUM, i), comments)
            for i, service in enumerate(file.service):
                found._service(service, scope, (_FILE_SERVICE, i), comments)
        return found

    def _message(
        self,
        message: descriptor_pb2.DescriptorProto,
        scope: str,
        path: tuple[int, ...],
        comments: Comments,
    ) -> None:
        name = f"{scope}.{message.name}"
        fields = {f.name: comments.get((*path, _MESSAGE_FIELD, i), "") for i, f in enumerate(message.field)}
        self.types[name] = _Declared(message, comments.get(path, ""), fields)
        for i, nested in enumerate(message.nested_type):
            self._message(nested, name, (*path, _MESSAGE_NESTED, i), comments)
        for i, enum in enumerate(message.enum_type):
            self._enum(enum, name, (*path, _MESSAGE_ENUM, i), comments)

    def _enum(
        self,
        enum: descriptor_pb2.EnumDescriptorProto,
        scope: str,
        path: tuple[int, ...],
        comments: Comments,
    ) -> None:
        values = {v.name: comments.get((*path, _ENUM_VALUE, i), "") for i, v in enumerate(enum.value)}
        self.types[f"{scope}.{enum.name}"] = _Declared(enum, comments.get(path, ""), values)

    def _service(
        self,
        service: descriptor_pb2.ServiceDescriptorProto,
        scope: str,
        path: tuple[int, ...],
        comments: Comments,
    ) -> None:
        name = f"{scope}.{service.name}".lstrip(".")
        for i, method in enumerate(service.method):
            if not method.options.HasExtension(annotations_pb2.http):
                continue
            self.services[name] = comments.get(path, "")
            comment = comments.get((*path, _SERVICE_METHOD, i), "")
            for binding, (verb, template, body, response_body) in enumerate(
                _bindings(method.options.Extensions[annotations_pb2.http])
            ):
                self.routes.append(Route(name, method, comment, verb, template, body, response_body, binding))

    def message(self, type_name: str) -> descriptor_pb2.DescriptorProto:
        """The message of a field's or a method's `type_name` (".pkg.Name")."""
        declared = self.types[type_name].proto
        assert isinstance(declared, descriptor_pb2.DescriptorProto), type_name
        return declared


def schema_name(type_name: str) -> str:
    """The components/schemas key of a message or enum: its full proto name."""
    return type_name.lstrip(".")


def _described(schema: Json, description: str) -> Json:
    return {**schema, "description": description} if description else dict(schema)


def or_null(schema: Json) -> Json:
    """A field's schema that also takes JSON null, which proto3's JSON parser (the transcoder's)
    reads as the field's default, for every type; an item of a list stays what it was."""
    kind = schema.get("type")
    if "$ref" in schema:
        rest = {key: value for key, value in schema.items() if key != "$ref"}
        return {"anyOf": [{"$ref": schema["$ref"]}, {"type": "null"}], **rest}
    if isinstance(kind, str) and kind != "null":
        return {**schema, "type": [kind, "null"]}
    return dict(schema)  # any JSON value (google.protobuf.Value) or null already


def reachable(descriptors: Descriptors, roots: Iterator[str]) -> set[str]:
    """The messages of `roots` and every message their fields hold, at any depth."""
    found: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        declared = descriptors.types.get(name)
        if name in found or name in WELL_KNOWN or declared is None:
            continue
        if isinstance(declared.proto, descriptor_pb2.DescriptorProto):
            found.add(name)
            pending += [f.type_name for f in declared.proto.field if f.type == FieldProto.TYPE_MESSAGE]
    return found


def request_only(descriptors: Descriptors) -> frozenset[str]:
    """The messages that requests hold and answers never do: their fields may be null in a
    request, which the transcoder never prints in an answer."""
    requests = reachable(descriptors, (route.method.input_type for route in descriptors.routes))
    answers = reachable(descriptors, (route.method.output_type for route in descriptors.routes))
    return frozenset(requests - answers)


class Schemas:
    """The components/schemas that operations refer to, each built once when first referred to;
    `finish` builds what is still pending and returns them all. The fields of the messages in
    `nullable` may also be JSON null (see `or_null`)."""

    def __init__(self, descriptors: Descriptors, nullable: frozenset[str] = frozenset()) -> None:
        self._descriptors = descriptors
        self._nullable = nullable
        self._built: dict[str, Json] = {}
        self._pending: list[str] = []

    def ref(self, type_name: str) -> Json:
        """A reference to the schema of a message or enum, queued to be built."""
        if schema_name(type_name) not in self._built and type_name not in self._pending:
            self._pending.append(type_name)
        return {"$ref": f"#/components/schemas/{schema_name(type_name)}"}

    def finish(self) -> dict[str, Json]:
        """Every schema referred to so far, and those they refer to."""
        while self._pending:
            type_name = self._pending.pop(0)
            declared = self._descriptors.types[type_name]
            if isinstance(declared.proto, descriptor_pb2.EnumDescriptorProto):
                self._built[schema_name(type_name)] = self._enum(declared)
            else:
                self._built[schema_name(type_name)] = self.message(type_name)
        return dict(sorted(self._built.items()))

    def message(self, type_name: str, exclude: frozenset[str] = frozenset()) -> Json:
        """The JSON object of a message, less the fields named in `exclude` (those a path binds)."""
        declared = self._descriptors.types[type_name]
        message = self._descriptors.message(type_name)
        properties = {f.name: self.field(type_name, f) for f in message.field if f.name not in exclude}
        if type_name in self._nullable:
            properties = {name: or_null(schema) for name, schema in properties.items()}
        notes = [declared.comment] if declared.comment else []
        for index, oneof in enumerate(message.oneof_decl):
            members = [f for f in message.field if f.HasField("oneof_index") and f.oneof_index == index]
            if not any(f.proto3_optional for f in members):  # not the oneof of a proto3 `optional`
                names = ", ".join(f"`{f.name}`" for f in members)
                notes.append(f"At most one of {names} is set (oneof `{oneof.name}`).")
        return _described({"type": "object", "properties": properties}, "\n\n".join(notes))

    def field(self, message_name: str, field_proto: FieldProto) -> Json:
        """The JSON value of a field of message `message_name`, with the field's comment."""
        schema = self._value(field_proto)
        repeated = field_proto.label == FieldProto.LABEL_REPEATED
        if repeated and not self.map_entry(field_proto):
            schema = {"type": "array", "items": schema}
        return _described(schema, self._descriptors.types[message_name].field_comments.get(field_proto.name, ""))

    def _value(self, field_proto: FieldProto) -> Json:
        """One value of a field (an item of a repeated one), as proto3's JSON mapping prints it."""
        if field_proto.type in SCALARS:
            return dict(SCALARS[field_proto.type])
        if field_proto.type_name in WELL_KNOWN:
            return dict(WELL_KNOWN[field_proto.type_name])
        entry = self.map_entry(field_proto)
        if entry is not None:  # map<K, V>: an object whose keys are K printed as strings
            value = next(f for f in entry.field if f.name == "value")
            return {"type": "object", "additionalProperties": self._value(value)}
        return self.ref(field_proto.type_name)

    def map_entry(self, field_proto: FieldProto) -> descriptor_pb2.DescriptorProto | None:
        """The entry message of a map field (a repeated entry on the wire, an object in JSON)."""
        if field_proto.type != FieldProto.TYPE_MESSAGE or field_proto.type_name in WELL_KNOWN:
            return None
        message = self._descriptors.message(field_proto.type_name)
        return message if message.options.map_entry else None

    def _enum(self, declared: _Declared) -> Json:
        """An enum as proto3's JSON prints it: its value's name."""
        names = list(declared.field_comments)
        values = [f"- `{name}`: {' '.join(text.split())}" for name, text in declared.field_comments.items() if text]
        description = "\n\n".join(part for part in (declared.comment, "\n".join(values)) if part)
        return _described({"type": "string", "enum": names}, description)


def _template(template: str) -> tuple[str, list[tuple[str, str]]]:
    """An HTTP rule's path template as an OpenAPI path, and its variables: (field path,
    segments), the segments "*" for a plain {field}."""
    variables = [(m.group(1), m.group(2) or "*") for m in _VARIABLE.finditer(template)]
    path = _VARIABLE.sub(lambda m: "{" + m.group(1) + "}", template)
    if "*" in path:
        raise ValueError(f"path template {template!r} has a wildcard outside a variable: OpenAPI cannot say it")
    return path, variables


@dataclass
class _OperationBuilder:
    """Builds the OpenAPI operation of one route."""

    descriptors: Descriptors
    schemas: Schemas
    route: Route

    def build(self) -> tuple[str, Json]:
        """The route's OpenAPI path and operation."""
        route, method = self.route, self.route.method
        path, variables = _template(route.template)
        operation: Json = {"tags": [route.service.rsplit(".", 1)[-1]], "operationId": self._operation_id()}
        if route.comment:
            operation.update(summary=_summary(route.comment), description=route.comment)
        parameters, body = self._request(variables)
        if not (method.client_streaming or method.server_streaming):
            parameters.append({"$ref": "#/components/parameters/IdempotencyKey"})
        operation["parameters"] = parameters
        if body is not None:
            operation["requestBody"] = {"required": True, "content": body}
        operation["responses"] = {
            "200": self._answer(),
            **{s: {"$ref": f"#/components/responses/Error{s}"} for s in ERROR_STATUSES},
        }
        return path, operation

    def _request(self, variables: list[tuple[str, str]]) -> tuple[list[Json], Json | None]:
        """Where the rule puts the request's fields: the path's variables, the body's content
        (None: no body) and the query string (every field that neither the path nor the body
        takes)."""
        request = self.route.method.input_type
        bound = {field_path for field_path, _ in variables}
        parameters = [self._path_parameter(field_path, segments) for field_path, segments in variables]
        if self.route.body == "*":
            if request == HTTP_BODY:
                return parameters, RAW_CONTENT
            if not bound:
                return parameters, self._json(self.schemas.ref(request))
            return parameters, self._json(self.schemas.message(request, frozenset(b.split(".", 1)[0] for b in bound)))
        query = self._query_parameters(request, bound | {self.route.body}, "", frozenset({request}))
        if not self.route.body:
            return parameters + query, None
        if self._field(request, self.route.body)[1].type_name == HTTP_BODY:
            return parameters + query, RAW_CONTENT
        return parameters + query, self._json(self._field_schema(request, self.route.body))

    def _json(self, schema: Json) -> Json:
        """A request body's content: JSON, and for a client stream a JSON array of messages,
        which is how the transcoder reads one."""
        return {
            JSON_MEDIA: {"schema": {"type": "array", "items": schema} if self.route.method.client_streaming else schema}
        }

    def _operation_id(self) -> str:
        service = self.route.service.rsplit(".", 1)[-1]
        suffix = f"_{self.route.binding + 1}" if self.route.binding else ""
        return f"{service}_{self.route.method.name}{suffix}"

    def _answer(self) -> Json:
        """The 200: the response message (or its `response_body` field) as JSON, or the bytes of
        an HttpBody, whose content type the server picks."""
        method, field_path = self.route.method, self.route.response_body
        message, field_proto = self._field(method.output_type, field_path) if field_path else (method.output_type, None)
        if (field_proto.type_name if field_proto else message) == HTTP_BODY:
            comment = self.descriptors.types[message].field_comments.get(field_proto.name, "") if field_proto else ""
            answer: Json = {"description": comment or "OK", "content": RAW_CONTENT}
        else:
            schema = self.schemas.field(message, field_proto) if field_proto else self.schemas.ref(message)
            if method.server_streaming:  # the transcoder prints a server stream as a JSON array
                schema = {"type": "array", "items": schema}
            answer = {"description": "OK", "content": {JSON_MEDIA: {"schema": schema}}}
        if not (method.client_streaming or method.server_streaming):
            answer["headers"] = {"Idempotent-Replayed": {"$ref": "#/components/headers/IdempotentReplayed"}}
        return answer

    def _field(self, message_name: str, field_path: str) -> tuple[str, FieldProto]:
        """The message that declares the last field of a dotted path, and that field."""
        *parents, last = field_path.split(".")
        for name in parents:
            message_name = self._find(message_name, name).type_name
        return message_name, self._find(message_name, last)

    def _find(self, message_name: str, name: str) -> FieldProto:
        for field_proto in self.descriptors.message(message_name).field:
            if field_proto.name == name:
                return field_proto
        raise ValueError(f"HTTP rule of {self.route.method.name} names {name!r}, which {message_name} does not have")

    def _field_schema(self, message_name: str, field_path: str) -> Json:
        return self.schemas.field(*self._field(message_name, field_path))

    def _path_parameter(self, field_path: str, segments: str) -> Json:
        schema = self._field_schema(self.route.method.input_type, field_path)
        notes = [schema.pop("description", "")]
        if segments != "*":
            notes.append(f"Matches `{segments}`" + (": it may contain `/`." if "**" in segments else "."))
        parameter = {"name": field_path, "in": "path", "required": True, "schema": schema}
        return _described(parameter, "\n\n".join(n for n in notes if n))

    def _query_parameters(self, message_name: str, exclude: set[str], prefix: str, seen: frozenset[str]) -> list[Json]:
        """Every field the path and the body leave to the query string (nested messages as
        dotted names), as the transcoder reads them."""
        parameters = []
        for field_proto in self.descriptors.message(message_name).field:
            name = prefix + field_proto.name
            if name in exclude or self.schemas.map_entry(field_proto) is not None:
                continue
            if field_proto.type == FieldProto.TYPE_MESSAGE and field_proto.type_name not in WELL_KNOWN:
                if field_proto.label != FieldProto.LABEL_REPEATED and field_proto.type_name not in seen:
                    nested = seen | {field_proto.type_name}
                    parameters += self._query_parameters(field_proto.type_name, exclude, f"{name}.", nested)
                continue
            if WELL_KNOWN.get(field_proto.type_name, {"type": "string"}).get("type") not in QUERY_TYPES:
                continue  # an object, a list or any JSON value: not for a query string
            schema = self.schemas.field(message_name, field_proto)
            description = schema.pop("description", "")
            parameters.append(_described({"name": name, "in": "query", "schema": schema}, description))
        return parameters


ERROR_BODY: Json = {
    "type": "object",
    "description": "OpenAI's error body, which every REST error has (envoy/openai_errors.lua writes it), so "
    "OpenAI-compatible clients raise their own error types with the server's message.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string", "description": "What went wrong and what to change."},
                "type": {
                    "type": "string",
                    "description": "OpenAI's error type: `invalid_request_error`, `authentication_error`, "
                    "`not_found_error`, `rate_limit_error`, `conflict_error`, `server_error`, ...",
                },
                "code": {
                    "type": "string",
                    "description": "The gRPC status in snake case (`invalid_argument`, `not_found`, "
                    "`resource_exhausted`, ...), or Envoy's own reason (`request_too_large`, "
                    "`unsupported_media_type`).",
                },
            },
        }
    },
}


def _components(schemas: Schemas) -> Json:
    """The schemas the operations refer to, and what every operation shares: the error
    responses, the idempotency key and the API key."""
    error = {JSON_MEDIA: {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}}
    responses: Json = {f"Error{s}": {"description": text, "content": error} for s, text in ERROR_STATUSES.items()}
    responses["Error429"]["headers"] = {
        "Retry-After": {
            "description": "Whole seconds to wait before retrying (the server's `retry-after`), which the "
            "OpenAI SDK waits for.",
            "schema": {"type": "integer", "minimum": 0},
        }
    }
    return {
        "schemas": {**schemas.finish(), ERROR_SCHEMA: ERROR_BODY},
        "responses": responses,
        "parameters": {
            "IdempotencyKey": {
                "name": "Idempotency-Key",
                "in": "header",
                "description": "Runs the request once: a retry with the same key and body gets the stored "
                "answer (IETF httpapi draft; 1 to 255 printable ASCII characters).",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        },
        "headers": {
            "IdempotentReplayed": {
                "description": "`true` on an answer replayed for a retry with the same Idempotency-Key.",
                "schema": {"type": "string", "enum": ["true"]},
            }
        },
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the server's API_KEYS; needed only when the server has some.",
            }
        },
    }


def document(descriptor_set: descriptor_pb2.FileDescriptorSet) -> Json:
    """The OpenAPI document of every RPC in `descriptor_set` that has a google.api.http rule."""
    descriptors = Descriptors.read(descriptor_set)
    if not descriptors.routes:
        raise ValueError("no RPC of the descriptor set has a google.api.http rule")
    schemas = Schemas(descriptors, request_only(descriptors))
    paths: dict[str, Json] = {}
    for route in descriptors.routes:
        path, operation = _OperationBuilder(descriptors, schemas, route).build()
        if route.http_method in paths.setdefault(path, {}):
            raise ValueError(f"two HTTP rules bind {route.http_method.upper()} {path}")
        paths[path][route.http_method] = operation
    packages = sorted({name.rsplit(".", 1)[0] for name in descriptors.services})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "embedserve REST API",
            # The proto package's version (embedserve.v1): the contract's, which paths carry.
            "version": ", ".join(p.rsplit(".", 1)[-1] for p in packages),
            "description": "OpenAI-shaped REST/JSON, which Envoy's gRPC-JSON transcoder maps onto the gRPC "
            f"services of {', '.join(packages)}. Generated from proto/ by tools/gen_openapi.py.",
        },
        "tags": [
            _described({"name": name.rsplit(".", 1)[-1]}, comment) for name, comment in descriptors.services.items()
        ],
        # An API key is needed only when the server has API_KEYS: either requirement is met.
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": _components(schemas),
    }


def load(descriptor_file: Path) -> descriptor_pb2.FileDescriptorSet:
    """The descriptor set in `descriptor_file`, as tools/gen_proto.py writes it."""
    return descriptor_pb2.FileDescriptorSet.FromString(descriptor_file.read_bytes())


def write(descriptor_file: Path, out_file: Path) -> Path:
    """Writes the OpenAPI document (JSON) of the descriptor set in `descriptor_file`."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(document(load(descriptor_file)), indent=2) + "\n")
    return out_file


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    write(Path(sys.argv[1]), Path(sys.argv[2]))
