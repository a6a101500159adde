"""The RunPod serverless handler as RunPod's SDK runs it locally: `python -m embedserve.runpod_handler
--test_input JOB` answers one job, logs the result and exits. Its answers are checked against the
gRPC server's on the same models: the bundled MiniLM, a tiny dense model and a tiny cross-encoder."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bench.tiny import build_tiny_dense
from embedserve.runpod_handler import worker_environ
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import CACHE_DIR, RunningServer, make_settings
from tests.integration.test_embed import decode
from tests.tiny_models import build_tiny_cross_encoder

QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital of France.",
    "Berlin is in Germany.",
    "The capital of Spain is Madrid.",
    "Bananas are rich in potassium and grow in bunches.",
]
# The SDK logs a job's result cut to 4,096 characters: 384 floats as JSON numbers are longer,
# so float vectors come from a 32-d model and MiniLM's (384-d) as base64.
TINY_DIMENSION = 32
RESULT = "INFO   | Job result: "
FAILED = "ERROR  | Job local_test failed with error: "
CROSS_ENCODER = "<the tiny cross-encoder>"  # in a parametrized job: replaced by its path


@pytest.fixture(scope="module")
def model_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("runpod")
    dense = build_tiny_dense(root / "dense", TINY_DIMENSION)
    return [DEFAULT_DENSE_MODEL, str(dense), str(build_tiny_cross_encoder(root / "cross-encoder"))]


@pytest.fixture(scope="module")
def grpc_server(model_names: list[str]) -> Iterator[RunningServer]:
    """The gRPC server on the handler's models: what the handler's answers must equal."""
    running = RunningServer(make_settings(models=tuple(ModelSettings(name) for name in model_names)))
    yield running
    running.stop()


def run_job(job: dict[str, Any], model_names: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the handler on one job in the SDK's local test mode."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}  # RunPod's own: a real worker
    environ.update(MODEL_NAMES=";".join(model_names), EMBEDSERVE_CACHE_DIR=str(CACHE_DIR), **env)
    return subprocess.run(
        [sys.executable, "-m", "embedserve.runpod_handler", "--test_input", json.dumps(job)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def output_of(done: subprocess.CompletedProcess[str]) -> Any:
    """The job's output, from the SDK's log of its result (a Python repr of {"output": ...})."""
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    assert len(lines) == 1, done.stdout
    assert "TRUNCATED" not in lines[0]
    result = ast.literal_eval(lines[0].removeprefix(RESULT))
    assert set(result) == {"output"}, result
    return result["output"]


def grpc_vectors(server: RunningServer, model: str, texts: list[str]) -> np.ndarray:
    return decode(server.stub().Embed(pb.EmbedRequest(inputs=texts, model=model)))


def test_embeddings_job_answers_the_grpc_vectors_as_openai_shaped_floats(
    model_names: list[str], grpc_server: RunningServer
) -> None:
    texts = ["hello world", "RunPod workers embed text"]
    output = output_of(run_job({"input": {"model": model_names[1], "input": texts}}, model_names))
    assert output["object"] == "list"
    assert output["model"] == model_names[1]
    assert [item["index"] for item in output["data"]] == [0, 1]
    assert {item["object"] for item in output["data"]} == {"embedding"}
    vectors = np.array([item["embedding"] for item in output["data"]], dtype=np.float32)
    assert vectors.shape == (2, TINY_DIMENSION)
    np.testing.assert_allclose(vectors, grpc_vectors(grpc_server, model_names[1], texts), atol=1e-5)
    assert output["usage"]["prompt_tokens"] == output["usage"]["total_tokens"] > len(texts)


def test_openai_route_embeddings_answers_a_list_of_one_openai_response(
    model_names: list[str], grpc_server: RunningServer
) -> None:
    # What RunPod's OpenAI-compatible URL hands the worker for the OpenAI SDK, which asks for base64.
    body = {"model": DEFAULT_DENSE_MODEL, "input": "hello world", "encoding_format": "base64"}
    output = output_of(run_job({"input": {"openai_route": "/v1/embeddings", "openai_input": body}}, model_names))
    assert isinstance(output, list) and len(output) == 1
    (response,) = output
    assert response["model"] == DEFAULT_DENSE_MODEL
    (item,) = response["data"]
    vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    assert vector.shape == (384,)
    np.testing.assert_allclose(vector, grpc_vectors(grpc_server, DEFAULT_DENSE_MODEL, ["hello world"])[0], atol=1e-5)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5


def test_openai_route_models_lists_the_models_as_the_worker_settings_configure_them(model_names: list[str]) -> None:
    # The worker's names and values: optimum is ONNX Runtime, float32 our fp32.
    env = {"BACKEND": "optimum", "DTYPES": "float32", "BATCH_SIZES": "8;16;4"}
    output = output_of(run_job({"input": {"openai_route": "/v1/models"}}, model_names, **env))
    assert output["object"] == "list"
    models = output["data"]
    assert [m["id"] for m in models] == model_names
    assert [m["kind"] for m in models] == ["dense", "dense", "rerank"]
    assert [m["dimension"] for m in models[:2]] == [384, TINY_DIMENSION]
    assert [m["stats"]["batch_size"] for m in models] == [8, 16, 4]
    assert {(m["object"], m["owned_by"], m["backend"], m["dtype"]) for m in models} == {
        ("model", "infinity", "onnx", "fp32")
    }


def grpc_scores(server: RunningServer, model: str) -> list[float]:
    """The cross-encoder's scores from gRPC Rerank, in DOCS order."""
    response = server.stub().Rerank(pb.RerankRequest(query=QUERY, documents=DOCS, model=model))
    scores = [0.0] * len(DOCS)
    for result in response.results:
        scores[result.index] = result.relevance_score
    return scores


def test_rerank_job_answers_scores_in_docs_order_and_results_ranked(
    model_names: list[str], grpc_server: RunningServer
) -> None:
    output = output_of(run_job({"input": {"model": model_names[2], "query": QUERY, "docs": DOCS}}, model_names))
    scores = output["scores"]
    np.testing.assert_allclose(scores, grpc_scores(grpc_server, model_names[2]), atol=1e-5)
    assert len(set(scores)) == len(DOCS)  # the tiny cross-encoder tells the documents apart
    ranked = output["results"]
    assert [r["index"] for r in ranked] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert [r["relevance_score"] for r in ranked] == sorted(scores, reverse=True)
    assert "docs" not in output and not any("document" in r for r in ranked)
    assert output["model"] == model_names[2]


def test_rerank_job_with_return_docs_answers_the_docs_ranked(
    model_names: list[str], grpc_server: RunningServer
) -> None:
    job = {"model": model_names[2], "query": QUERY, "docs": DOCS, "return_docs": True}
    output = output_of(run_job({"input": job}, model_names))
    expected = grpc_scores(grpc_server, model_names[2])
    ranking = sorted(range(len(DOCS)), key=lambda i: -expected[i])
    assert output["docs"] == [DOCS[i] for i in ranking]
    assert [(r["index"], r["document"]) for r in output["results"]] == [(i, DOCS[i]) for i in ranking]
    np.testing.assert_allclose(
        [r["relevance_score"] for r in output["results"]], [expected[i] for i in ranking], atol=1e-5
    )
    assert "scores" not in output


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"query": QUERY, "docs": ["Paris", 3]}, "docs[1] is a number: docs must be an array of strings"),
        ({"openai_route": "/v1/chat/completions"}, "openai_route must be '/v1/models' or '/v1/embeddings'"),
        ({"model": CROSS_ENCODER, "input": "hello"}, "is a rerank model and answers rerank, not embeddings"),
    ],
    ids=["docs-not-strings", "unknown-route", "embeddings-on-a-reranker"],
)
def test_bad_input_fails_the_job_with_a_message_that_says_what_to_change(
    model_names: list[str], job: dict[str, Any], message: str
) -> None:
    job = {key: model_names[2] if value == CROSS_ENCODER else value for key, value in job.items()}
    done = run_job({"input": job}, model_names)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(FAILED)]
    assert message in line
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"BACKEND": "ctranslate2"},
            "BACKEND has 'ctranslate2', which embedserve cannot run: use one of torch",
        ),
        ({"DTYPES": "auto;fp8;auto"}, "DTYPES has 'fp8', which embedserve cannot run"),
        ({"INFINITY_QUEUE_SIZE": "48000", "QUEUE_SIZE": "16384"}, "INFINITY_QUEUE_SIZE (48000) and QUEUE_SIZE"),
        ({"RUNPOD_MAX_CONCURRENCY": "0"}, "RUNPOD_MAX_CONCURRENCY must be at least 1, got 0"),
    ],
    ids=["backend", "dtype", "queue-size-twice", "concurrency"],
)
def test_worker_settings_that_cannot_be_honoured_stop_startup(env: dict[str, str], message: str) -> None:
    done = run_job({"input": {"input": "hello"}}, [DEFAULT_DENSE_MODEL], **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"embedserve-runpod: configuration error: {message}" in done.stderr
    assert "Traceback" not in done.stderr


def test_worker_names_map_onto_the_server_settings() -> None:
    assert worker_environ({}) == {"MAX_CONCURRENCY": "300"}  # the worker's default, jobs at once
    mapped = worker_environ({"INFINITY_QUEUE_SIZE": "48000", "RUNPOD_MAX_CONCURRENCY": "12", "BACKEND": "Torch"})
    assert (mapped["QUEUE_SIZE"], mapped["MAX_CONCURRENCY"], mapped["BACKEND"]) == ("48000", "12", "torch")
    assert worker_environ({"MAX_CONCURRENCY": "5", "DTYPES": "float16;auto"}) == {
        "MAX_CONCURRENCY": "5",
        "DTYPES": "fp16;auto",
    }
