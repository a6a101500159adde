"""tools/gen_openapi.py on a proto written for it: every HTTP rule form (path variables, `**`,
a body field, query parameters, additional bindings, a stream) and proto3's JSON mapping of
every kind of field, as Envoy's transcoder prints it (proto field names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from openapi_spec_validator import validate

from tools import gen_openapi, gen_proto

Json = dict[str, Any]

DEMO_PROTO = """
syntax = "proto3";

package demo.v1;

import "google/api/annotations.proto";
import "google/api/httpbody.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// DemoService exists for the generator's tests.
service DemoService {
  // GetThing returns one thing. Names hold slashes.
  rpc GetThing(GetThingRequest) returns (Thing) {
    option (google.api.http) = {get: "/v1/things/{name=**}"};
  }
  // UpdateThing replaces a thing's fields.
  rpc UpdateThing(UpdateThingRequest) returns (Thing) {
    option (google.api.http) = {
      patch: "/v1/{thing.name=shelves/*}"
      body: "thing"
    };
  }
  // CreateThing stores a thing.
  rpc CreateThing(Thing) returns (Thing) {
    option (google.api.http) = {
      post: "/v1/things"
      body: "*"
      additional_bindings: {put: "/v1/things/{name}" body: "*"}
    };
  }
  // WatchThings streams things as they change.
  rpc WatchThings(GetThingRequest) returns (stream Thing) {
    option (google.api.http) = {get: "/v1/things:watch"};
  }
  // Download returns a thing's bytes.
  rpc Download(GetThingRequest) returns (DownloadResponse) {
    option (google.api.http) = {
      get: "/v1/things/{name=**}:download"
      response_body: "body"
    };
  }
  // Upload stores bytes as they come.
  rpc Upload(google.api.HttpBody) returns (Thing) {
    option (google.api.http) = {
      post: "/v1/uploads"
      body: "*"
    };
  }
  // Internal has no HTTP rule, so no route.
  rpc Internal(Thing) returns (Thing);
}

// Color is a thing's color.
enum Color {
  // Unset.
  COLOR_UNSPECIFIED = 0;
  // Red, as in apples.
  COLOR_RED = 1;
}

// Thing is what the service keeps.
message Thing {
  // Inner is a nested message.
  message Inner {
    // Its label.
    string label = 1;
  }
  // The thing's name.
  string name = 1;
  int64 big = 2;
  uint64 unsigned_big = 3;
  uint32 small = 4;
  sint32 signed_small = 5;
  double real = 6;
  float single = 7;
  bool flag = 8;
  bytes blob = 9;
  Color color = 10;
  repeated string tags = 11;
  map<string, int64> counts = 12;
  oneof choice {
    string text = 13;
    int32 number = 14;
  }
  optional int32 maybe = 15;
  google.protobuf.Timestamp when = 16;
  google.protobuf.Int64Value wrapped = 17;
  google.protobuf.Struct meta = 18;
  Inner inner = 19;
  repeated Inner inners = 20;
  google.protobuf.Value anything = 21;
}

// GetThingRequest names a thing.
message GetThingRequest {
  // The name of the thing.
  string name = 1;
  // Only things of this color.
  Color color = 2;
  repeated int32 ids = 3;
  Thing.Inner filter = 4;
  google.protobuf.Struct not_in_query = 5;
}

// DownloadResponse is a thing's bytes.
message DownloadResponse {
  // The bytes, in the thing's own format.
  google.api.HttpBody body = 1;
}

// UpdateThingRequest carries the new thing.
message UpdateThingRequest {
  Thing thing = 1;
  string reason = 2;
}
"""


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> Json:
    root = tmp_path_factory.mktemp("protos")
    (root / "demo" / "v1").mkdir(parents=True)
    (root / "demo" / "v1" / "demo.proto").write_text(DEMO_PROTO)
    out = root / "demo.pb"
    # As gen_proto.descriptor_set builds Envoy's: imports and comments included.
    args = ["--include_imports", "--include_source_info", f"--descriptor_set_out={out}", "demo/v1/demo.proto"]
    assert protoc.main(["protoc", f"-I{root}", *gen_proto.include_dirs(), *args]) == 0
    parsed: Json = gen_openapi.document(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()))
    return parsed


def _schema(document: Json, name: str) -> Json:
    schema: Json = document["components"]["schemas"][f"demo.v1.{name}"]
    return schema


def _parameters(operation: Json) -> dict[str, Json]:
    return {p["name"]: p for p in operation["parameters"] if "name" in p}


def test_document_is_valid_openapi(document: Json) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["version"] == "v1"


def test_every_binding_is_an_operation_and_an_rpc_without_a_rule_is_not(document: Json) -> None:
    routes = {(m, p) for p, item in document["paths"].items() for m in item}
    assert routes == {
        ("get", "/v1/things/{name}"),
        ("patch", "/v1/{thing.name}"),
        ("post", "/v1/things"),
        ("put", "/v1/things/{name}"),
        ("get", "/v1/things:watch"),
        ("get", "/v1/things/{name}:download"),
        ("post", "/v1/uploads"),
    }
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert "DemoService_CreateThing_2" in ids


def test_path_variables_are_required_parameters_that_say_what_they_match(document: Json) -> None:
    get = document["paths"]["/v1/things/{name}"]["get"]
    name = _parameters(get)["name"]
    assert name["in"] == "path" and name["required"] is True
    assert name["schema"] == {"type": "string"}
    assert name["description"].startswith("The name of the thing.")
    assert "may contain `/`" in name["description"]
    nested = _parameters(document["paths"]["/v1/{thing.name}"]["patch"])["thing.name"]
    assert "Matches `shelves/*`." in nested["description"]


def test_fields_neither_path_nor_body_take_are_query_parameters(document: Json) -> None:
    query = {n: p for n, p in _parameters(document["paths"]["/v1/things/{name}"]["get"]).items() if p["in"] == "query"}
    # a nested message's fields are dotted names; a Struct has no query form
    assert set(query) == {"color", "ids", "filter.label"}
    assert query["color"]["schema"] == {"$ref": "#/components/schemas/demo.v1.Color"}
    assert query["ids"]["schema"] == {"type": "array", "items": {"type": "integer", "format": "int32"}}
    patch = document["paths"]["/v1/{thing.name}"]["patch"]
    assert {n for n, p in _parameters(patch).items() if p["in"] == "query"} == {"reason"}


def test_bodies_follow_the_rule(document: Json) -> None:
    def body(path: str, method: str) -> Json:
        schema: Json = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        return schema

    assert body("/v1/things", "post") == {"$ref": "#/components/schemas/demo.v1.Thing"}
    # body "*" with a path variable: the message less the field the path carries
    put = body("/v1/things/{name}", "put")
    assert "name" not in put["properties"] and "big" in put["properties"]
    assert body("/v1/{thing.name}", "patch")["$ref"] == "#/components/schemas/demo.v1.Thing"
    assert "requestBody" not in document["paths"]["/v1/things/{name}"]["get"]


def test_a_server_stream_is_a_json_array_and_takes_no_idempotency_key(document: Json) -> None:
    watch = document["paths"]["/v1/things:watch"]["get"]
    schema = watch["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"type": "array", "items": {"$ref": "#/components/schemas/demo.v1.Thing"}}
    assert {"$ref": "#/components/parameters/IdempotencyKey"} not in watch["parameters"]


def test_fields_have_proto3_json_types_under_their_proto_names(document: Json) -> None:
    properties = _schema(document, "Thing")["properties"]
    int64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
    assert properties["big"] == int64
    assert properties["unsigned_big"]["type"] == "string"
    assert properties["small"] == {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
    assert properties["signed_small"] == {"type": "integer", "format": "int32"}
    assert properties["real"] == {"type": "number", "format": "double"}
    assert properties["single"] == {"type": "number", "format": "float"}
    assert properties["flag"] == {"type": "boolean"}
    assert properties["blob"]["format"] == "byte" and properties["blob"]["type"] == "string"
    assert properties["color"] == {"$ref": "#/components/schemas/demo.v1.Color"}
    assert properties["tags"] == {"type": "array", "items": {"type": "string"}}
    assert properties["counts"] == {"type": "object", "additionalProperties": int64}
    assert properties["maybe"] == {"type": "integer", "format": "int32"}
    assert properties["when"] == {"type": "string", "format": "date-time"}
    assert properties["wrapped"]["type"] == "string"  # an Int64Value prints as its int64
    assert properties["meta"] == {"type": "object", "additionalProperties": True}
    assert properties["inner"] == {"$ref": "#/components/schemas/demo.v1.Thing.Inner"}
    assert properties["inners"]["items"] == {"$ref": "#/components/schemas/demo.v1.Thing.Inner"}
    assert properties["anything"] == {}  # google.protobuf.Value: any JSON value
    assert "unsignedBig" not in properties  # proto names, as preserve_proto_field_names prints


def test_enums_print_as_their_value_names(document: Json) -> None:
    color = _schema(document, "Color")
    assert color["type"] == "string"
    assert color["enum"] == ["COLOR_UNSPECIFIED", "COLOR_RED"]
    assert "- `COLOR_RED`: Red, as in apples." in color["description"]


def test_proto_comments_are_the_descriptions(document: Json) -> None:
    thing = _schema(document, "Thing")
    assert thing["description"].startswith("Thing is what the service keeps.")
    assert "At most one of `text`, `number` is set (oneof `choice`)." in thing["description"]
    assert "maybe" not in thing["description"]  # a proto3 optional is no oneof to JSON
    assert thing["properties"]["name"]["description"] == "The thing's name."
    assert _schema(document, "Thing.Inner")["properties"]["label"]["description"] == "Its label."
    get = document["paths"]["/v1/things/{name}"]["get"]
    assert get["summary"] == "GetThing returns one thing."
    assert get["description"] == "GetThing returns one thing. Names hold slashes."
    assert document["tags"] == [{"name": "DemoService", "description": "DemoService exists for the generator's tests."}]


def test_errors_have_the_openai_body_and_a_429_says_when_to_retry(document: Json) -> None:
    responses = document["paths"]["/v1/things"]["post"]["responses"]
    for status in ("400", "401", "404", "413", "415", "429", "503"):
        assert responses[status] == {"$ref": f"#/components/responses/Error{status}"}
    error = document["components"]["responses"]["Error429"]
    assert error["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert error["headers"]["Retry-After"]["schema"]["type"] == "integer"
    body = document["components"]["schemas"]["ErrorResponse"]
    assert set(body["properties"]["error"]["required"]) == {"message", "type", "code"}


def test_an_http_body_is_bytes_of_any_content_type_not_json(document: Json) -> None:
    download = document["paths"]["/v1/things/{name}:download"]["get"]["responses"]["200"]
    assert download["content"] == {"*/*": {"schema": {}}}
    assert download["description"] == "The bytes, in the thing's own format."
    upload = document["paths"]["/v1/uploads"]["post"]["requestBody"]
    assert upload["content"] == {"*/*": {"schema": {}}}
    assert "google.api.HttpBody" not in document["components"]["schemas"]


def test_a_wildcard_outside_a_variable_is_refused() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        gen_openapi._template("/v1/*/things")


def test_the_real_protos_give_a_valid_document(tmp_path: Path) -> None:
    path = gen_openapi.write(gen_proto.descriptor_set(tmp_path / "embedserve.pb"), tmp_path / "openapi.json")
    document = json.loads(path.read_text())
    validate(document)
    assert "/v1/embeddings" in document["paths"]
