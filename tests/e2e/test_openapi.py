"""GET /openapi.json through the real Envoy: a valid OpenAPI document (openapi-spec-validator)
that lists every REST route the protos declare, and whose schemas are what the transcoder
really prints."""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from google.api import annotations_pb2  # type: ignore[import-untyped]
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

import embedserve.v1
from tests.e2e.conftest import Gateway

Json = dict[str, Any]
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def _get(gateway: Gateway, path: str) -> tuple[int, dict[str, str], bytes]:
    return _call(gateway, "GET", path, None)


def _call(gateway: Gateway, method: str, path: str, body: object | None) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"content-type": "application/json"}
    request = urllib.request.Request(gateway.base_url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def document(gateway: Gateway) -> Json:
    status, _, body = _get(gateway, "/openapi.json")
    assert status == 200
    parsed: Json = json.loads(body)
    return parsed


def _declared_routes() -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every google.api.http binding of every service in the
    generated proto modules (all of proto/), read with protobuf's own descriptors rather than
    the generator's reading of the descriptor set."""
    routes = set()
    for module_info in pkgutil.iter_modules(embedserve.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"embedserve.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.GetOptions().HasExtension(annotations_pb2.http):
                    routes |= _bindings(method.GetOptions().Extensions[annotations_pb2.http])
    return routes


def _bindings(rule: Any) -> set[tuple[str, str]]:
    found = set()
    for binding in (rule, *rule.additional_bindings):
        kind = binding.WhichOneof("pattern")
        verb, template = (
            (binding.custom.kind, binding.custom.path) if kind == "custom" else (kind, getattr(binding, kind))
        )
        # {id=**} is the path parameter {id} in OpenAPI.
        found.add((verb.lower(), re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", template)))
    return found


def _operations(document: Json) -> Iterator[tuple[str, str, Json]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def test_openapi_json_is_a_valid_openapi_document_served_as_json(gateway: Gateway) -> None:
    status, headers, body = _get(gateway, "/openapi.json")
    assert status == 200
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    validate(document)  # raises on an invalid document
    assert document["openapi"].startswith("3.")


def test_openapi_lists_every_rest_route_the_protos_declare_and_no_other(document: Json) -> None:
    declared = _declared_routes()
    assert ("post", "/v1/embeddings") in declared  # the oracle reads the protos at all
    assert {(method, path) for method, path, _ in _operations(document)} == declared


def test_every_documented_operation_is_served_and_its_errors_have_the_documented_body(
    gateway: Gateway, document: Json
) -> None:
    model = json.loads(_get(gateway, "/v1/models")[2])["data"][0]["id"]
    validator = _validator(document, {"$ref": "#/components/schemas/ErrorResponse"})
    for method, path, operation in _operations(document):
        concrete = re.sub(r"\{[^}]+\}", model, path)
        status, _, body = _call(gateway, method.upper(), concrete, {} if "requestBody" in operation else None)
        # An empty body is a 400 (no input) or a 200; never the 404/405 of a route Envoy lacks.
        assert status in (200, 400), (method, concrete, status, body)
        assert str(status) in operation["responses"], (method, path, status)
        if status == 400:
            validator.validate(json.loads(body))


def _strict(schema: Json) -> Json:
    """`schema` with every object closed to properties it does not list, so that a field the
    transcoder prints but the document lacks fails validation."""
    closed = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(closed)
    return closed


def _validator(document: Json, schema: Json) -> OAS31Validator:
    root = {**schema, "components": _strict(document["components"])}
    return OAS31Validator(root)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": ["hello", "world"]}),
        ("/v1/embeddings", {"input": "hello", "encoding_format": "base64", "dimensions": 8}),
        ("/v1/embed_sparse", {"input": ["hello world"], "return_tokens": True}),
        ("/v1/rerank", {"query": "capital of France?", "documents": ["Paris.", "Bananas."], "return_documents": True}),
    ],
)
def test_answers_are_what_the_documented_response_schema_says(
    gateway: Gateway, document: Json, path: str, body: Json
) -> None:
    status, _, answer = _call(gateway, "POST", path, body)
    assert status == 200, answer
    schema = document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    validator = _validator(document, schema)
    validator.validate(json.loads(answer))
    # and the validator does check: a renamed field (camelCase, as default proto JSON prints) fails
    renamed = json.loads(answer)
    renamed["data" if "data" in renamed else "results"][0]["camelCase"] = 1
    assert not validator.is_valid(renamed)


def test_models_answer_is_what_the_documented_schema_says(gateway: Gateway, document: Json) -> None:
    status, _, answer = _get(gateway, "/v1/models")
    assert status == 200
    schema = document["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    _validator(document, schema).validate(json.loads(answer))


def test_docs_page_and_swagger_ui_files_are_served_with_their_content_types(gateway: Gateway) -> None:
    expected = {
        "/docs": "text/html",
        "/docs/swagger-ui.css": "text/css",
        "/docs/swagger-ui-bundle.js": "text/javascript",
    }
    for path, content_type in expected.items():
        status, headers, body = _get(gateway, path)
        assert status == 200, path
        assert headers["content-type"].startswith(content_type), path
        assert body, path
    # the page points Swagger UI at this Envoy's document, not at a CDN
    page = _get(gateway, "/docs")[2].decode()
    assert 'url: "/openapi.json"' in page
    assert "http://" not in page and "https://" not in page


def test_a_method_other_than_get_on_the_docs_routes_is_not_answered_with_the_file(gateway: Gateway) -> None:
    status, headers, body = _call(gateway, "POST", "/openapi.json", {})
    assert status >= 400
    assert headers["content-type"] == "application/json"
    assert "error" in json.loads(body)
