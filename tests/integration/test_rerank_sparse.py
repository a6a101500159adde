"""Rerank and SparseEmbed on one server: tiny cross-encoder and masked-LM, the real SPLADE, the
dense model as a bi-encoder reranker, errors, and mixed concurrent load."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from embedserve.settings import DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer, make_settings
from tests.integration.test_errors import error_of
from tests.tiny_models import build_tiny_cross_encoder, build_tiny_masked_lm

T = TypeVar("T")

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital of France.",
    "Berlin is in Germany.",
    "The capital of Spain is Madrid.",
    "Bananas are rich in potassium and grow in bunches.",
    "France borders Spain, Belgium and Germany.",
]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_cross_encoder(root / "cross-encoder"), build_tiny_masked_lm(root / "masked-lm")


@pytest.fixture(scope="module")
def mixed(tiny_models: tuple[Path, Path]) -> Iterator[RunningServer]:
    """One server with all three kinds: dense, sparse (tiny and real SPLADE), rerank."""
    cross_encoder, masked_lm = tiny_models
    models = (
        ModelSettings(DEFAULT_DENSE_MODEL),
        ModelSettings(str(cross_encoder)),
        ModelSettings(str(masked_lm)),
        ModelSettings(DEFAULT_SPARSE_MODEL),
    )
    running = RunningServer(make_settings(models=models))
    yield running
    running.stop()


def reference_logits(path: Path, query: str, documents: list[str], max_length: int = 512) -> np.ndarray:
    """The cross-encoder's logits computed by transformers directly."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))  # type: ignore[no-untyped-call]
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    batch = tokenizer(
        [query] * len(documents),
        documents,
        padding=True,
        truncation="only_second",
        max_length=max_length,
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits: np.ndarray = model(**batch).logits[:, 0].numpy()
    return logits


def reference_splade(path: Path, text: str) -> np.ndarray:
    """SPLADE weights computed by transformers directly: max over tokens of log(1 + relu(logit))."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))  # type: ignore[no-untyped-call]
    model = AutoModelForMaskedLM.from_pretrained(str(path)).eval()
    batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=512)
    with torch.inference_mode():
        logits = model(**batch).logits
    return torch.log1p(torch.relu(logits)).amax(dim=1)[0].numpy()


def test_cross_encoder_scores_are_sigmoid_of_the_model_logits_sorted_highest_first(
    mixed: RunningServer, tiny_models: tuple[Path, Path]
) -> None:
    cross_encoder = str(tiny_models[0])
    response = mixed.stub().Rerank(pb.RerankRequest(model=cross_encoder, query=QUERY, documents=DOCUMENTS))
    logits = reference_logits(tiny_models[0], QUERY, DOCUMENTS)
    expected = 1 / (1 + np.exp(-logits))
    assert sorted(r.index for r in response.results) == list(range(len(DOCUMENTS)))
    scores = [r.relevance_score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    for result in response.results:
        assert result.relevance_score == pytest.approx(expected[result.index], abs=1e-4)
        assert 0 < result.relevance_score < 1
        assert result.document == ""
    assert len(set(np.round(expected, 4))) > 1, "tiny model scores every pair alike: the test shows nothing"
    assert response.model == cross_encoder
    assert response.usage.prompt_tokens > len(DOCUMENTS) * 10


def test_top_n_raw_scores_and_return_documents(mixed: RunningServer, tiny_models: tuple[Path, Path]) -> None:
    cross_encoder = str(tiny_models[0])
    stub = mixed.stub()
    full = stub.Rerank(pb.RerankRequest(model=cross_encoder, query=QUERY, documents=DOCUMENTS, raw_scores=True))
    top = stub.Rerank(
        pb.RerankRequest(model=cross_encoder, query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)
    )
    logits = reference_logits(tiny_models[0], QUERY, DOCUMENTS)
    for result in full.results:
        assert result.relevance_score == pytest.approx(logits[result.index], abs=1e-4)
    assert [r.index for r in top.results] == [r.index for r in full.results][:2]
    for result in top.results:
        assert result.document == DOCUMENTS[result.index]
        assert result.relevance_score == pytest.approx(1 / (1 + math.exp(-logits[result.index])), abs=1e-4)


def test_long_document_is_truncated_on_the_document_side_keeping_the_query(
    mixed: RunningServer, tiny_models: tuple[Path, Path]
) -> None:
    cross_encoder = str(tiny_models[0])
    long_document = " ".join(["paris"] * 50 + ["filler words here"] * 300)
    response = mixed.stub().Rerank(
        pb.RerankRequest(model=cross_encoder, query=QUERY, documents=[long_document, "short"], raw_scores=True)
    )
    logits = reference_logits(tiny_models[0], QUERY, [long_document, "short"])
    by_index = {r.index: r.relevance_score for r in response.results}
    assert by_index[0] == pytest.approx(logits[0], abs=1e-4)
    assert response.usage.truncated_inputs == 1
    error = error_of(
        mixed.stub().Rerank,
        pb.RerankRequest(model=cross_encoder, query=QUERY, documents=[long_document], truncate=False),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[0] has" in str(error.details()) and "at most 512" in str(error.details())
    too_long_query = " ".join(["query"] * 600)
    error = error_of(mixed.stub().Rerank, pb.RerankRequest(model=cross_encoder, query=too_long_query, documents=["d"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shorten the query" in str(error.details())


def test_dense_model_reranks_by_cosine_similarity(mixed: RunningServer) -> None:
    stub = mixed.stub()
    response = stub.Rerank(pb.RerankRequest(model=DEFAULT_DENSE_MODEL, query=QUERY, documents=DOCUMENTS))
    vectors = [
        np.frombuffer(e.float32_le, "<f4") for e in stub.Embed(pb.EmbedRequest(inputs=[QUERY, *DOCUMENTS])).embeddings
    ]
    for result in response.results:
        assert result.relevance_score == pytest.approx(float(vectors[0] @ vectors[result.index + 1]), abs=1e-5)
    assert response.results[0].index == 0


def test_sparse_vectors_match_splade_computed_by_transformers(
    mixed: RunningServer, tiny_models: tuple[Path, Path]
) -> None:
    masked_lm = str(tiny_models[1])
    texts = ["sparse vectors for search engines", "a second, different text"]
    response = mixed.stub().SparseEmbed(pb.SparseEmbedRequest(model=masked_lm, inputs=texts, return_tokens=True))
    assert [e.index for e in response.embeddings] == [0, 1]
    tokenizer = AutoTokenizer.from_pretrained(masked_lm)  # type: ignore[no-untyped-call]
    for text, embedding in zip(texts, response.embeddings, strict=True):
        expected = reference_splade(tiny_models[1], text)
        indices = list(embedding.indices)
        assert indices == sorted(indices) and len(set(indices)) == len(indices)
        assert all(v > 0 for v in embedding.values)
        dense = np.zeros(tokenizer.vocab_size, dtype=np.float32)
        dense[indices] = embedding.values
        np.testing.assert_allclose(dense, expected, atol=1e-4)
        assert list(embedding.tokens) == tokenizer.convert_ids_to_tokens(indices)
    assert response.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)


def test_sparse_top_k_and_min_weight_keep_the_heaviest_terms(
    mixed: RunningServer, tiny_models: tuple[Path, Path]
) -> None:
    masked_lm = str(tiny_models[1])
    stub = mixed.stub()
    text = ["keep only the heaviest terms of this text"]
    full = stub.SparseEmbed(pb.SparseEmbedRequest(model=masked_lm, inputs=text)).embeddings[0]
    top = stub.SparseEmbed(pb.SparseEmbedRequest(model=masked_lm, inputs=text, top_k=5)).embeddings[0]
    weights = dict(zip(full.indices, full.values, strict=True))
    heaviest = sorted(weights, key=lambda i: -weights[i])[:5]
    assert list(top.indices) == sorted(heaviest)
    threshold = float(np.median(full.values))
    heavy = stub.SparseEmbed(pb.SparseEmbedRequest(model=masked_lm, inputs=text, min_weight=threshold)).embeddings[0]
    assert list(heavy.indices) == [i for i in full.indices if weights[i] > threshold]
    assert 0 < len(heavy.indices) < len(full.indices)


def test_real_splade_puts_capital_and_france_among_the_top_terms(mixed: RunningServer) -> None:
    response = mixed.stub().SparseEmbed(
        pb.SparseEmbedRequest(model=DEFAULT_SPARSE_MODEL, inputs=[QUERY], top_k=10, return_tokens=True)
    )
    tokens = set(response.embeddings[0].tokens)
    assert {"capital", "france"} <= tokens, tokens


def test_list_models_reports_kinds_capabilities_and_shapes(
    mixed: RunningServer, tiny_models: tuple[Path, Path]
) -> None:
    models = {m.id: m for m in mixed.stub().ListModels(pb.ListModelsRequest()).models}
    dense, rerank, sparse = models[DEFAULT_DENSE_MODEL], models[str(tiny_models[0])], models[DEFAULT_SPARSE_MODEL]
    assert (dense.kind, list(dense.capabilities), dense.dimension) == (
        pb.MODEL_KIND_DENSE,
        ["Embed", "EmbedStream", "Rerank"],
        384,
    )
    assert (rerank.kind, list(rerank.capabilities), rerank.dimension) == (pb.MODEL_KIND_RERANK, ["Rerank"], 0)
    assert (sparse.kind, list(sparse.capabilities), sparse.vocab_size) == (pb.MODEL_KIND_SPARSE, ["SparseEmbed"], 30522)
    assert all(m.backend == "onnx" and m.dtype == "fp32" for m in models.values())


def test_wrong_kind_is_failed_precondition_naming_kind_and_rpcs(
    mixed: RunningServer, tiny_models: tuple[Path, Path]
) -> None:
    stub = mixed.stub()
    error = error_of(stub.Rerank, pb.RerankRequest(model=DEFAULT_SPARSE_MODEL, query="q", documents=["d"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is a sparse model and answers SparseEmbed, not Rerank" in str(error.details())
    error = error_of(stub.Embed, pb.EmbedRequest(model=str(tiny_models[0]), inputs=["x"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is a rerank model and answers Rerank, not Embed" in str(error.details())
    error = error_of(stub.SparseEmbed, pb.SparseEmbedRequest(model=DEFAULT_DENSE_MODEL, inputs=["x"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.RerankRequest(query="", documents=["d"]), "query is empty"),
        (pb.RerankRequest(query="q", documents=[]), "documents is empty"),
        (pb.RerankRequest(query="q", documents=["d", ""]), "documents[1] is an empty string"),
        (pb.RerankRequest(query="q", documents=["d"] * 2049), "2049 texts but the limit is 2048"),
        (pb.RerankRequest(query="q", documents=["d"], top_n=0), "top_n must be at least 1"),
    ],
    ids=["empty-query", "no-documents", "empty-document", "too-many-documents", "top-n-0"],
)
def test_bad_rerank_requests_are_invalid_argument(
    mixed: RunningServer, request_: pb.RerankRequest, needle: str
) -> None:
    error = error_of(mixed.stub().Rerank, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in str(error.details())


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.SparseEmbedRequest(inputs=[]), "inputs is empty"),
        (pb.SparseEmbedRequest(inputs=["x"], top_k=0), "top_k must be at least 1"),
        (pb.SparseEmbedRequest(inputs=["x"], min_weight=-1), "min_weight must be 0 or more"),
        (pb.SparseEmbedRequest(inputs=["x"] * 2049), "limit is 2048"),
    ],
    ids=["empty", "top-k-0", "negative-min-weight", "too-many"],
)
def test_bad_sparse_requests_are_invalid_argument(
    mixed: RunningServer, request_: pb.SparseEmbedRequest, needle: str
) -> None:
    error = error_of(mixed.stub().SparseEmbed, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in str(error.details())


def rotated(i: int, items: list[T]) -> list[T]:
    """The items starting at position i: call i of the mixed load sends its texts in this order."""
    return items[i:] + items[:i]


def test_mixed_concurrent_load_of_the_three_rpcs_returns_correct_results(
    mixed: RunningServer, tiny_models: tuple[Path, Path]
) -> None:
    stub = mixed.stub()
    cross_encoder = str(tiny_models[0])
    texts = [f"{doc} ({i})" for i, doc in enumerate(DOCUMENTS * 4)]

    def embed(i: int) -> object:
        return stub.Embed(pb.EmbedRequest(inputs=rotated(i, texts)))

    def sparse(i: int) -> object:
        return stub.SparseEmbed(pb.SparseEmbedRequest(inputs=rotated(i, texts)))

    def rerank(i: int) -> object:
        return stub.Rerank(pb.RerankRequest(model=cross_encoder, query=QUERY, documents=rotated(i, texts)))

    calls = [(f, i) for i in range(8) for f in (embed, sparse, rerank)]
    expected = {(f.__name__, i): f(i) for f, i in calls[:3]}  # i = 0, sequential
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda call: call[0](call[1]), calls))
    for (f, i), result in zip(calls, results, strict=True):
        base = expected[(f.__name__, 0)]
        if f is embed:
            got = np.stack([np.frombuffer(e.float32_le, "<f4") for e in result.embeddings])
            want = np.stack(rotated(i, [np.frombuffer(e.float32_le, "<f4") for e in base.embeddings]))  # type: ignore[attr-defined]
            np.testing.assert_allclose(got, want, atol=1e-5)
        elif f is sparse:
            got_s = [(list(e.indices), list(e.values)) for e in result.embeddings]
            want_s = rotated(i, [(list(e.indices), list(e.values)) for e in base.embeddings])  # type: ignore[attr-defined]
            for (gi, gv), (wi, wv) in zip(got_s, want_s, strict=True):
                assert gi == wi
                np.testing.assert_allclose(gv, wv, atol=1e-5)
        else:
            by_text = {texts[r.index]: r.relevance_score for r in base.results}  # type: ignore[attr-defined]
            shifted = rotated(i, texts)
            for r in result.results:
                assert r.relevance_score == pytest.approx(by_text[shifted[r.index]], abs=1e-5)


def test_default_server_reranks_and_sparse_embeds_out_of_the_box(server: RunningServer) -> None:
    stub = server.stub()
    documents = ["Paris is the capital of France.", "Berlin is in Germany.", "The capital of Spain is Madrid."]
    response = stub.Rerank(pb.RerankRequest(query=QUERY, documents=documents))
    assert response.model == DEFAULT_DENSE_MODEL
    assert response.results[0].index == 0
    sparse = stub.SparseEmbed(pb.SparseEmbedRequest(inputs=[QUERY]))
    assert sparse.model == DEFAULT_SPARSE_MODEL
    assert len(sparse.embeddings[0].indices) > 0


def test_dense_rerank_without_truncation_names_the_document_that_is_too_long(mixed: RunningServer) -> None:
    long_document = " ".join(["word"] * 400)
    request = pb.RerankRequest(
        model=DEFAULT_DENSE_MODEL, query=QUERY, documents=["short", long_document], truncate=False
    )
    error = error_of(mixed.stub().Rerank, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[1] has 402 tokens" in str(error.details()) and "at most 256" in str(error.details())
