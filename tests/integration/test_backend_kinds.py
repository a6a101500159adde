"""Sparse (SPLADE) and rerank (cross-encoder) backends: ONNX Runtime and torch keep one contract."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from transformers import AutoTokenizer

from embedserve.backends import splade
from embedserve.backends.base import Backend, FloatArray, IntArray
from embedserve.backends.config import ModelConfig, load_model_config
from embedserve.backends.onnx import OnnxBackend, export_model
from embedserve.backends.torch import TorchBackend
from embedserve.engine.kinds import KINDS, SPARSE
from embedserve.engine.tokenizer import TextTokenizer
from tests.conftest import CACHE_DIR
from tests.tiny_models import build_tiny_cross_encoder, build_tiny_masked_lm

Inputs = tuple[IntArray, IntArray, IntArray]

MAX_TOKENS = 128
TEXTS = ["What is the capital of France?", "sparse", "日本語も大丈夫", "a long text that gets cut " * 30]
QUERIES = ["what is the capital of france", "what is the capital of france", "do cats bark", "sparse"]
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are yellow.",
    "Dogs bark; cats meow and purr. " * 40,
    "x",
]
TOLERANCE = 1e-4  # ONNX Runtime vs torch
PADDING_TOLERANCE = 1e-5  # one backend, a row alone vs in a padded batch


@dataclass(frozen=True)
class Loaded:
    """One model on both backends."""

    config: ModelConfig
    onnx: OnnxBackend
    torch: TorchBackend

    def backend(self, name: str) -> Backend:
        return self.onnx if name == "onnx" else self.torch


def load(path: Path, kind: str) -> Loaded:
    config = load_model_config(path)
    assert config.kind == kind
    graph = KINDS[config.kind].graph
    return Loaded(config, OnnxBackend(config, graph, "fp32", CACHE_DIR), TorchBackend(config, graph, "fp32"))


def text_inputs(path: Path, texts: list[str]) -> Inputs:
    """Inputs built the way the server builds them."""
    tokenizer = TextTokenizer(path, MAX_TOKENS)
    return tokenizer.collate(tokenizer.encode(texts).encoded)


def pair_inputs(path: Path, queries: list[str], docs: list[str]) -> Inputs:
    encoded = AutoTokenizer.from_pretrained(str(path))(  # type: ignore[no-untyped-call]
        queries, docs, padding=True, truncation="only_second", max_length=MAX_TOKENS, return_tensors="np"
    )
    ids, mask, types = (
        np.asarray(encoded[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    return ids, mask, types


def rows_alone(backend: Backend, inputs: Inputs) -> FloatArray:
    """Runs each row on its own, cut to its real length: what it gives without any padding."""
    ids, mask, types = inputs
    rows = []
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        rows.append(backend.forward(ids[row : row + 1, :n], mask[row : row + 1, :n], types[row : row + 1, :n])[0])
    return np.stack(rows)


@pytest.fixture(scope="module")
def tiny_sparse(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return load(build_tiny_masked_lm(tmp_path_factory.mktemp("tiny") / "masked-lm"), "sparse")


@pytest.fixture(scope="module")
def tiny_rerank(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return load(build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny") / "cross-encoder"), "rerank")


@pytest.fixture(scope="module")
def real_splade() -> Loaded:
    return load(Path(str(importlib.resources.files("cognition") / "model")), "sparse")


def test_sparse_weights_agree_between_onnx_and_torch(tiny_sparse: Loaded) -> None:
    inputs = text_inputs(tiny_sparse.config.path, TEXTS)
    onnx_weights = tiny_sparse.onnx.forward(*inputs)
    torch_weights = tiny_sparse.torch.forward(*inputs)
    assert onnx_weights.shape == torch_weights.shape == (len(TEXTS), 30522)
    assert onnx_weights.dtype == torch_weights.dtype == np.float32
    assert onnx_weights.min() >= 0.0
    assert np.abs(onnx_weights - torch_weights).max() < TOLERANCE
    np.testing.assert_array_equal(onnx_weights > TOLERANCE, torch_weights > TOLERANCE)


def test_sparse_weights_are_the_max_of_log1p_relu_logits_over_real_tokens(tiny_sparse: Loaded) -> None:
    import torch
    from transformers import AutoModelForMaskedLM

    ids, mask, types = inputs = text_inputs(tiny_sparse.config.path, TEXTS)
    model = AutoModelForMaskedLM.from_pretrained(str(tiny_sparse.config.path)).eval()
    expected = np.zeros((ids.shape[0], tiny_sparse.config.vocab_size), dtype=np.float32)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())  # the row's real tokens only: no padding to mask out
        with torch.inference_mode():
            logits = model(
                input_ids=torch.from_numpy(ids[row : row + 1, :n]),
                token_type_ids=torch.from_numpy(types[row : row + 1, :n]),
            ).logits.numpy()[0]
        expected[row] = np.log1p(np.maximum(logits, 0.0)).max(axis=0)
    for name in ("onnx", "torch"):
        assert np.abs(tiny_sparse.backend(name).forward(*inputs) - expected).max() < TOLERANCE, name


@pytest.mark.parametrize("name", ["onnx", "torch"])
def test_padding_does_not_change_a_sparse_row(tiny_sparse: Loaded, name: str) -> None:
    backend = tiny_sparse.backend(name)
    inputs = text_inputs(tiny_sparse.config.path, TEXTS)
    assert inputs[1].sum(axis=1).min() < inputs[1].shape[1]  # some rows really are padded
    assert np.abs(backend.forward(*inputs) - rows_alone(backend, inputs)).max() < PADDING_TOLERANCE


def test_sparse_export_never_outputs_logits_per_token(tiny_sparse: Loaded) -> None:
    encoder_file = export_model(tiny_sparse.config, SPARSE.graph, "fp32", CACHE_DIR)
    encoder = onnx.load(str(encoder_file), load_external_data=False).graph
    assert [o.name for o in encoder.output] == [splade.HIDDEN]  # (batch, tokens, hidden)
    assert encoder.output[0].type.tensor_type.shape.dim[2].dim_value == tiny_sparse.config.hidden_size
    head = onnx.load(str(encoder_file.parent / splade.HEAD_FILE)).graph
    assert [o.name for o in head.output] == [splade.OUTPUT]  # (rows, vocab)
    dims = head.output[0].type.tensor_type.shape.dim
    assert len(dims) == 2
    assert dims[1].dim_value == 30522


@pytest.mark.parametrize("name", ["onnx", "torch"])
def test_sparse_weights_do_not_depend_on_how_the_batch_is_chunked(tiny_sparse: Loaded, name: str) -> None:
    backend = tiny_sparse.backend(name)
    inputs = text_inputs(tiny_sparse.config.path, TEXTS)
    whole = backend.forward(*inputs)
    chunk_tokens = backend._chunk_tokens  # type: ignore[attr-defined]
    try:
        backend._chunk_tokens = 7  # type: ignore[attr-defined]  # rows in pieces, pieces of rows
        pieces = backend.forward(*inputs)
    finally:
        backend._chunk_tokens = chunk_tokens  # type: ignore[attr-defined]
    assert np.abs(whole - pieces).max() < PADDING_TOLERANCE


def test_chunks_cover_every_real_token_once_within_the_budget() -> None:
    mask = np.zeros((5, 12), dtype=np.int64)
    for row, length in enumerate([2, 3, 3, 9, 12]):
        mask[row, :length] = 1
    seen = np.zeros_like(mask)
    for rows, tokens in splade.chunks(mask, 6):
        height = len(range(*rows.indices(5)))
        assert height * (tokens.stop - tokens.start) <= 6 or height == 1
        assert tokens.stop - tokens.start <= 6
        seen[rows, tokens] += mask[rows, tokens]
    np.testing.assert_array_equal(seen, mask)


def test_rerank_logits_agree_between_onnx_and_torch(tiny_rerank: Loaded) -> None:
    inputs = pair_inputs(tiny_rerank.config.path, QUERIES, DOCS)
    onnx_logits = tiny_rerank.onnx.forward(*inputs)
    torch_logits = tiny_rerank.torch.forward(*inputs)
    assert onnx_logits.shape == torch_logits.shape == (len(QUERIES), 1)
    assert onnx_logits.dtype == torch_logits.dtype == np.float32
    assert np.ptp(torch_logits) > 0.05  # pairs really score differently
    assert np.abs(onnx_logits - torch_logits).max() < TOLERANCE


@pytest.mark.parametrize("name", ["onnx", "torch"])
def test_padding_does_not_change_a_rerank_score(tiny_rerank: Loaded, name: str) -> None:
    backend = tiny_rerank.backend(name)
    inputs = pair_inputs(tiny_rerank.config.path, QUERIES, DOCS)
    assert inputs[1].sum(axis=1).min() < inputs[1].shape[1]
    assert np.abs(backend.forward(*inputs) - rows_alone(backend, inputs)).max() < PADDING_TOLERANCE


def test_real_splade_weights_the_query_terms_highest_on_both_backends(real_splade: Loaded) -> None:
    path = real_splade.config.path
    tokenizer = AutoTokenizer.from_pretrained(str(path))  # type: ignore[no-untyped-call]
    inputs = text_inputs(path, ["What is the capital of France?", "Bananas are yellow and rich in potassium."])
    onnx_weights = real_splade.onnx.forward(*inputs)
    torch_weights = real_splade.torch.forward(*inputs)
    assert onnx_weights.shape == (2, real_splade.config.vocab_size)
    assert np.abs(onnx_weights - torch_weights).max() < TOLERANCE
    np.testing.assert_array_equal(onnx_weights > TOLERANCE, torch_weights > TOLERANCE)
    for weights in (onnx_weights, torch_weights):
        top10 = set(tokenizer.convert_ids_to_tokens(np.argsort(-weights[0])[:10].tolist()))
        assert {"capital", "france"} <= top10
        # A trained SPLADE is sparse: a few dozen terms, not the vocabulary.
        assert 0 < int((weights > 0).sum(axis=1).max()) < 1000
