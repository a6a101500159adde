"""Every operation of the REST API's OpenAPI document fuzzed by schemathesis through real Envoy:
requests of the documented shape and of every other (its examples, coverage and fuzzing phases,
positive and negative, and methods that no path declares), each answered without a 5xx or a gRPC
INTERNAL/UNKNOWN, every error OpenAI's JSON body, and every answer with a status, content type,
headers and body that the document declares.

The document is the one Envoy serves at GET /openapi.json (the `served` fixture checks that),
built at collection from proto/ as envoy/gateway.py builds it: schemathesis' loader from a
fixture (schemathesis.pytest.from_fixture) fails under pytest 9.2, which no longer has the
Node._nodeid it sets, so the schema cannot come from the gateway fixture itself.
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis import Case, CheckContext, CheckFunction, Response
from schemathesis.generation.meta import CoveragePhaseData

from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.e2e.conftest import Gateway
from tests.fuzz.conftest import MAX_MESSAGE_CHARS, TIMEOUT_S, fuzz
from tools import gen_openapi, gen_proto

Json = dict[str, Any]

# One request per message that the default server answers 200, and the default model for the
# parameters that name one, which schemathesis sends first (its examples phase) and varies in its
# coverage phase: fuzzed requests seldom get past the server's checks (a random model is not
# served, random inputs are empty or not text), and successful answers are the ones the document
# describes in most detail. Not in the served document: they name the default server's models.
BODY_EXAMPLES: dict[str, Json] = {
    "CreateEmbeddingsRequest": {"input": ["hello", "world"], "encoding_format": "base64", "dimensions": 8},
    "CreateSparseEmbeddingsRequest": {"input": ["hello world"], "top_k": 4, "return_tokens": True},
    "CreateRerankRequest": {
        "query": "capital of France?",
        "documents": ["Paris.", "Bananas."],
        "return_documents": True,
    },
    "CohereEmbedRequest": {
        "texts": ["hello", "world"],
        "input_type": "search_query",
        "embedding_types": ["float", "base64"],
        "output_dimension": 8,
    },
    "CohereEmbedV1Request": {"texts": ["hello"], "input_type": "search_document"},
    "CohereRerankRequest": {"query": "capital of France?", "documents": ["Paris.", "Bananas."], "top_n": 1},
    "TeiEmbedRequest": {"inputs": ["hello", "world"], "normalize": True, "dimensions": 8},
    "TeiEmbedSparseRequest": {"inputs": "hello world"},
}
PARAMETER_EXAMPLES = {"id": DEFAULT_DENSE_MODEL, "model": DEFAULT_DENSE_MODEL}
IDEMPOTENCY_KEY = "Idempotency-Key"
# Codes of the error body that only a bug earns (see ALLOWED_CODES in tests/fuzz/conftest.py).
BUG_CODES = frozenset({"internal", "unknown"})


def build_document() -> Json:
    """The OpenAPI document of proto/, as envoy/gateway.py writes the one Envoy serves."""
    with tempfile.TemporaryDirectory(prefix="embedserve-openapi-") as workdir:
        return gen_openapi.document(gen_openapi.load(gen_proto.descriptor_set(Path(workdir) / "descriptor.pb")))


def with_examples(document: Json) -> Json:
    """A copy of `document` whose request bodies and model parameters have the examples above."""
    copied = copy.deepcopy(document)
    for operations in copied["paths"].values():
        for operation in operations.values():
            for parameter in operation["parameters"]:
                if parameter.get("name") in PARAMETER_EXAMPLES:
                    parameter["example"] = PARAMETER_EXAMPLES[parameter["name"]]
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if media is not None:
                media["example"] = BODY_EXAMPLES[media["schema"]["$ref"].rsplit(".", 1)[-1]]
    return copied


DOCUMENT = build_document()
schema = schemathesis.openapi.from_dict(with_examples(DOCUMENT))


def openai_errors(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """No gRPC header in a REST answer; an error is OpenAI's body in valid UTF-8 JSON, with a
    short message that says something, and never a gRPC INTERNAL or UNKNOWN."""
    leaked = sorted(name for name in response.headers if name.startswith("grpc-"))
    assert not leaked, f"gRPC headers in a REST answer: {leaked}"
    if response.status_code < 400 or response.request.method == "HEAD":
        return None
    error = json.loads(response.content.decode("utf-8"))["error"]  # strict: raises on bytes that are not UTF-8
    assert set(error) == {"message", "type", "code"}, error
    assert all(isinstance(error[key], str) and error[key].strip() for key in error), error
    assert error["code"] not in BUG_CODES, error
    assert len(error["message"]) <= MAX_MESSAGE_CHARS, error["message"][:300]
    return True


def unsupported_method(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """schemathesis' own check (a method that no path declares gets 405 and Allow), but for a
    QUERY without a content-type (schemathesis sends its undeclared methods without a body),
    which Envoy refuses 400 before routing, as RFC 10008 has it do; openai_errors checks its body."""
    request = response.request
    if request.method == "QUERY" and "content-type" not in request.headers and response.status_code == 400:
        return None
    result: bool | None = schemathesis.checks.unsupported_method(ctx, response, case)
    return result


def _list_fields(case: Case[Any]) -> set[str]:
    """The fields of the case's JSON body that the document says are lists."""
    operation = DOCUMENT["paths"][case.operation.path][case.operation.method.lower()]
    media = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if media is None:
        return set()
    properties = DOCUMENT["components"]["schemas"][media["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]
    return {name for name, field in properties.items() if "array" in field.get("type", ())}


def one_value_for_a_list(case: Case[Any]) -> bool:
    """Whether the case's body gives a list field one value instead of a list, which the
    transcoder reads as a list of it, as OpenAI-compatible APIs read a string for a list of
    strings. A null item or a list item of such a list is refused (envoy/openai_errors.lua)."""
    if not isinstance(case.body, dict):
        return False
    values = (case.body.get(name) for name in _list_fields(case))
    return any(value is not None and not isinstance(value, list) for value in values)


def negative_data_rejection(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """schemathesis' own check (a request that the document rules out gets a 4xx), but for one
    value given for a list field (one_value_for_a_list), which is accepted on purpose. Every other
    request that the document rules out must be refused, a list with a null item or a list item
    among them: the transcoder would drop the null or flatten the list (`"documents": [null,
    "Bananas.", "Paris."]` ranked as ["Bananas.", "Paris."], result index 1 meaning Paris to the
    server and Bananas to the client), so the Lua filter refuses such a body first."""
    if one_value_for_a_list(case):
        return None
    result: bool | None = schemathesis.checks.negative_data_rejection(ctx, response, case)
    return result


# Chosen, not schemathesis' defaults. Left out: positive_data_acceptance (a request of the
# documented shape gets a 2xx), as the document is proto3's JSON mapping, in which any field may be
# missing or empty, while the server refuses what the descriptions rule out: no inputs, a model it
# does not serve, more dimensions than the model has, a prompt the model lacks; that depends on the
# served models, not on the proto, and each such refusal is still checked (a declared 4xx, OpenAI's
# body). missing_required_header: the document has no required header. ignored_auth and the
# stateful checks (use_after_free, ensure_resource_availability, object_level_authorization): the
# `gateway` server has no API keys, and the API creates no resources.
CHECKS: list[CheckFunction] = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    negative_data_rejection,
    schemathesis.checks.allow_header_conformance,
    unsupported_method,
    openai_errors,
]

_keys = itertools.count()


def own_idempotency_key(case: Case[Any]) -> None:
    """Gives a case of the coverage phase an Idempotency-Key of its own, unless the key is what the
    case varies: that phase sends all its cases with the same one ("0"), so all but the first of
    each route would be answered 422 (a key used for another request, as documented) without the
    server ever reading what the case is about."""
    data = case.meta.phase.data if case.meta is not None else None
    if isinstance(data, CoveragePhaseData) and data.parameter != IDEMPOTENCY_KEY and case.headers:
        if IDEMPOTENCY_KEY in case.headers:
            case.headers[IDEMPOTENCY_KEY] = f"coverage-{next(_keys)}"


def served_document(gateway: Gateway) -> Any:
    with urllib.request.urlopen(f"{gateway.base_url}/openapi.json", timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(gateway: Gateway) -> str:
    """The gateway's base URL, once it is known to serve the document fuzzed here."""
    assert served_document(gateway) == DOCUMENT, "GET /openapi.json is not the document built from proto/"
    return gateway.base_url


@schema.parametrize()
@fuzz(12)
def test_every_operation_answers_as_the_served_document_says(case: Case[Any], served: str) -> None:
    own_idempotency_key(case)
    case.call_and_validate(base_url=served, timeout=TIMEOUT_S, checks=CHECKS)
