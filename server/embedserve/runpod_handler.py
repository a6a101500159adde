"""RunPod serverless worker: the engine in-process, answering the job shapes of RunPod's
worker-infinity-embedding, so that endpoints and callers built for that worker move over unchanged.

A job's `input` is one of:

- `{"model", "input"}`: embeddings, read as the body of POST /v1/embeddings (its other fields too)
  and answered as that route answers;
- `{"openai_route": "/v1/models"}`: the model list, as GET /v1/models answers it;
- `{"openai_route": "/v1/embeddings", "openai_input": {...}}`: embeddings, answered in a list of
  one, as the worker answers this route;
- `{"model", "query", "docs", "return_docs"}`: rerank, answered as POST /v1/rerank answers (results
  highest score first, as the worker's `results`), plus the worker's documented `scores` (in `docs`
  order) or, with `return_docs`, `docs` (ranked).

A job that cannot be answered gets RunPod's error shape, `{"error": message}`, with the message the
gRPC and REST services give for the same mistake. Configuration is the server's (settings.py), from
the environment, with the worker's names for two of its settings (`worker_environ`).

Run it with `python -m embedserve.runpod_handler` (the `runpod` extra); the SDK's
`--test_input '{"input": ...}'` answers one job and exits.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from embedserve import convert
from embedserve.cli import configure_logging
from embedserve.engine.engine import Engine
from embedserve.errors import ConfigError, InvalidInputError, quoted
from embedserve.services.rpc import status
from embedserve.settings import load_settings, positive_int
from embedserve.v1 import openai_service_pb2 as rest

log = logging.getLogger(__name__)

Answer = dict[str, Any] | list[dict[str, Any]]

# -- configuration ------------------------------------------------------------------------

# The worker's names for two of our settings, and the worker's default where it is not ours.
ALIASES = (("INFINITY_QUEUE_SIZE", "QUEUE_SIZE", ""), ("RUNPOD_MAX_CONCURRENCY", "MAX_CONCURRENCY", "300"))
# Infinity's engine and dtype names as ours (optimum is Infinity's ONNX Runtime engine); any other
# is refused, since it would run differently from what was asked.
BACKENDS = {"torch": "torch", "optimum": "onnx", "onnx": "onnx"}
DTYPES = {
    "auto": "auto",
    "float32": "fp32",
    "fp32": "fp32",
    "float16": "fp16",
    "fp16": "fp16",
    "int8": "int8",
    "int8-fast": "int8-fast",
}


def worker_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment as `load_settings` reads it: worker-infinity-embedding's names and values
    turned into ours; raises ConfigError for a value that cannot be honoured."""
    translated = dict(environ)
    for env, names in (("BACKEND", BACKENDS), ("DTYPES", DTYPES)):
        parts = [part for part in environ.get(env, "").split(";") if part.strip()]
        if parts:
            translated[env] = ";".join(_translated(env, part, names) for part in parts)
    for theirs, ours, default in ALIASES:
        value = _alias(environ, theirs, ours) or default
        if value:
            translated[ours] = value
    return translated


def _translated(env: str, value: str, names: Mapping[str, str]) -> str:
    name = value.strip().lower()
    if name not in names:
        raise ConfigError(
            f"{env} has {quoted(value.strip())}, which embedserve cannot run: use one of {', '.join(names)} "
            f"(';'-separated per model in MODEL_NAMES order, or one for all)"
        )
    return names[name]


def _alias(environ: Mapping[str, str], theirs: str, ours: str) -> str:
    """Our setting's value: the worker's name for it, or ours ("" when neither is set); both, and
    different, is an error."""
    value = environ.get(theirs, "").strip()
    if not value:
        return environ.get(ours, "").strip()
    wanted = positive_int(value, theirs)
    if environ.get(ours, "").strip() and positive_int(environ[ours], ours) != wanted:
        raise ConfigError(f"{theirs} ({wanted}) and {ours} ({environ[ours].strip()}) disagree: set one of them")
    return str(wanted)


# -- jobs ---------------------------------------------------------------------------------

_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


def _kind(value: object) -> str:
    """A JSON value's kind, as error messages name it."""
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


def _as_json(message: Message) -> dict[str, Any]:
    """A response as the REST routes print it (Envoy's print options: zero values present, proto
    field names)."""
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


def _embeddings_request(body: dict[str, Any]) -> rest.CreateEmbeddingsRequest:
    """The REST request of an embeddings job; unknown fields are ignored, as over REST."""
    try:
        return json_format.ParseDict(body, rest.CreateEmbeddingsRequest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise InvalidInputError(f"malformed embeddings request: {exc}") from None


def _field(job: Mapping[str, Any], key: str, kind: type, default: Any, hint: str) -> Any:
    """A job field of the given JSON type (absent or null: `default`)."""
    value = job.get(key)
    if value is None:
        return default
    if type(value) is not kind:
        raise InvalidInputError(f"{key} must be {_KINDS[kind]} ({hint}), got {_kind(value)}")
    return value


def _documents(docs: object) -> list[str]:
    """The rerank job's `docs`: an array of strings."""
    if docs is None:
        raise InvalidInputError("docs is required: an array of strings, the documents to rank")
    if not isinstance(docs, list):
        raise InvalidInputError(f"docs must be an array of strings, the documents to rank, got {_kind(docs)}")
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise InvalidInputError(f"docs[{i}] is {_kind(doc)}: docs must be an array of strings")
    return docs


class RunPodHandler:
    """Answers RunPod jobs from one Engine, started in the SDK's event loop by the first job."""

    # Errors name capabilities as the REST routes that openai_route names do.
    words = staticmethod(convert.route_words)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._started = False
        self._failed = False

    def concurrency(self, current: int) -> int:
        """Jobs RunPod hands this worker at once: RUNPOD_MAX_CONCURRENCY (MAX_CONCURRENCY)."""
        return self._engine.settings.max_concurrency

    async def handle(self, job: Mapping[str, Any]) -> Answer:
        """The answer to one job, or `{"error": message}`; after a model worker crashed, the error
        asks RunPod to replace this worker (`refresh_worker`)."""
        if not self._started:
            self._engine.set_failure_callback(self._on_failure)
            self._engine.start()
            self._started = True
        try:
            return await self._answer(job.get("input"))
        except Exception as exc:
            _, message = status(exc, "runpod job", self.words, str(job.get("id", "")))
            error: dict[str, Any] = {"error": message}
            if self._failed:
                error["refresh_worker"] = True
            return error

    def _on_failure(self, error: BaseException) -> None:
        log.critical("a model worker crashed (%r): the job that fails with it asks RunPod for a new worker", error)
        self._failed = True

    async def _answer(self, job: object) -> Answer:
        if not isinstance(job, dict):
            raise InvalidInputError(f"input must be a JSON object, got {_kind(job)}")
        if "openai_route" in job:
            return await self._openai(job["openai_route"], job.get("openai_input"))
        if "query" in job:
            return await self._rerank(job)
        if "input" in job:
            return await self._embeddings(job)
        raise InvalidInputError(
            "input needs `input` (the texts to embed, with `model`), `query` and `docs` (to rerank), or "
            f"`openai_route` ('/v1/models' or '/v1/embeddings'); got {', '.join(map(repr, job)) or 'no keys'}"
        )

    async def _openai(self, route: object, body: object) -> Answer:
        if route == "/v1/models":
            models = [convert.model_object(m) for m in self._engine.describe()]
            return _as_json(rest.ListModelObjectsResponse(object="list", data=models))
        if route == "/v1/embeddings":
            if not isinstance(body, dict):
                raise InvalidInputError(
                    f"openai_input must be the body of POST /v1/embeddings, a JSON object, got {_kind(body)}"
                )
            return [await self._embeddings(body)]
        shown = quoted(route) if isinstance(route, str) else _kind(route)
        raise InvalidInputError(f"openai_route must be '/v1/models' or '/v1/embeddings', got {shown}")

    async def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        request = _embeddings_request(body)
        encoding = convert.encoding_format(request)
        result = await self._engine.embed(convert.embed_params(request))
        return _as_json(convert.rest_embeddings_response(result, encoding))

    async def _rerank(self, job: dict[str, Any]) -> dict[str, Any]:
        return_docs = _field(job, "return_docs", bool, False, "true answers the documents, ranked")
        request = rest.CreateRerankRequest(
            model=_field(job, "model", str, "", "one of MODEL_NAMES"),
            query=_field(job, "query", str, "", "the text to rank the documents for"),
            documents=_documents(job.get("docs")),
            return_documents=return_docs,
        )
        result = await self._engine.rerank(convert.rerank_params(request))
        answer = _as_json(convert.rest_rerank_response(result, return_docs))
        ranked = answer["results"]
        if return_docs:
            answer["docs"] = [r["document"] for r in ranked]
        else:
            scores = [0.0] * len(ranked)
            for r in ranked:
                scores[r["index"]] = r["relevance_score"]
            answer["scores"] = scores
        return answer


# -- entry point --------------------------------------------------------------------------


def main() -> int:
    """Loads the models and hands the handler to the RunPod SDK; returns the exit code when the
    configuration cannot work (the SDK exits by itself otherwise)."""
    try:
        import runpod  # type: ignore[import-untyped]
    except ImportError:
        print("embedserve-runpod: the RunPod SDK is missing: pip install 'embedserve[runpod]'", file=sys.stderr)
        return 2
    try:
        # No flags: RunPod configures workers through the environment, and the SDK owns the argv.
        settings = load_settings([], worker_environ(os.environ))
    except ConfigError as exc:
        print(f"embedserve-runpod: configuration error: {exc}", file=sys.stderr)
        return 2
    # force: importing the SDK configured the root logger already (runpod.serverless.utils.rp_upload).
    configure_logging(settings.log_level, force=True)
    try:
        engine = Engine.load(settings)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    handler = RunPodHandler(engine)
    runpod.serverless.start({"handler": handler.handle, "concurrency_modifier": handler.concurrency})
    return 0


if __name__ == "__main__":
    sys.exit(main())
