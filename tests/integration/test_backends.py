"""Backend choice, int8 quantization, the torch fallback and startup failures, on the real model."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.harness import make_corpus
from bench.int8 import hard_cases
from bench.tiny import build_tiny_cross_encoder
from embedserve.backends import load_backend
from embedserve.backends.config import load_model_config
from embedserve.backends.onnx import OnnxBackend, export_model
from embedserve.backends.torch import TorchBackend
from embedserve.engine.kinds import DENSE, KINDS
from embedserve.engine.pooling import normalize, pool
from embedserve.engine.tokenizer import TextTokenizer
from embedserve.models import resolve_model_path
from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import CACHE_DIR

TEXTS = ["int8 keeps the meaning", "quantized weights, float activations", "日本語も大丈夫", "a " * 300]


def embed_with(backend: OnnxBackend | TorchBackend, tokenizer: TextTokenizer, texts: list[str] = TEXTS) -> np.ndarray:
    """Vectors the way the engine computes them, for a backend under test, 32 texts a batch."""
    vectors = []
    for start in range(0, len(texts), 32):
        ids, mask, types = tokenizer.collate(tokenizer.encode(texts[start : start + 32]).encoded)
        vectors.append(normalize(pool(backend.forward(ids, mask, types), mask, "mean")))
    return np.concatenate(vectors)


@pytest.fixture(scope="module")
def model() -> tuple[Path, TextTokenizer]:
    path = resolve_model_path(DEFAULT_DENSE_MODEL)
    return path, TextTokenizer(path, 256)


# A generated corpus and the bench's hard cases (Chinese, Arabic, Hindi, Russian, emoji, 1-3 words,
# 300-400 words cut at max tokens), none from the calibration sentences.
HELD_OUT = make_corpus(64, 1012) + [text for kind in hard_cases(8, 13).values() for text in kind]


def test_int8_keeps_every_vector_within_cosine_0_99_of_fp32(model: tuple[Path, TextTokenizer]) -> None:
    """DTYPES=int8's accuracy bound (issue 12): every vector within cosine 0.99 of fp32's, mean
    >= 0.995. int8-fast is a different graph, lossier, and still close."""
    path, tokenizer = model
    config = load_model_config(path)
    fp32 = embed_with(OnnxBackend(config, DENSE.graph, "fp32", CACHE_DIR), tokenizer, HELD_OUT)
    int8 = OnnxBackend(config, DENSE.graph, "int8", CACHE_DIR)
    fast = OnnxBackend(config, DENSE.graph, "int8-fast", CACHE_DIR)
    assert (int8.info.dtype, fast.info.dtype) == ("int8", "int8-fast")
    files = {export_model(config, DENSE.graph, d, CACHE_DIR) for d in ("fp32", "int8", "int8-fast")}
    assert len(files) == 3
    cosines = (fp32 * embed_with(int8, tokenizer, HELD_OUT)).sum(axis=1)
    worst = HELD_OUT[int(cosines.argmin())]
    assert cosines.min() >= 0.99, f"min {cosines.min():.4f} on {worst[:60]!r}"
    assert cosines.mean() >= 0.995
    assert cosines.max() < 0.99999  # really quantized, not the fp32 graph again
    fast_cosines = (fp32 * embed_with(fast, tokenizer, HELD_OUT)).sum(axis=1)
    assert fast_cosines.min() > 0.94 and fast_cosines.mean() < cosines.mean()


def test_int8_serves_a_cross_encoder_whose_scores_follow_fp32(tmp_path: Path) -> None:
    """Rerank models quantize too: the encoder's MatMuls go int8 (the pooler and classifier are
    Gemm in the export and stay fp32), and the scores keep fp32's order."""
    path = build_tiny_cross_encoder(tmp_path / "cross-encoder")
    config = load_model_config(path)
    tokenizer = TextTokenizer(path, config.max_input_tokens)
    ids, mask, types = tokenizer.collate(tokenizer.encode_pairs("where do rivers go", make_corpus(24, 5)).encoded)
    scores = {
        dtype: OnnxBackend(config, KINDS[config.kind].graph, dtype, tmp_path / "cache").forward(ids, mask, types)
        for dtype in ("fp32", "int8")
    }
    assert scores["int8"].shape == scores["fp32"].shape == (24, 1)
    assert np.corrcoef(scores["fp32"].ravel(), scores["int8"].ravel())[0, 1] > 0.99
    assert not np.array_equal(scores["fp32"], scores["int8"])


def test_export_is_cached_by_content_and_reused(model: tuple[Path, TextTokenizer], tmp_path: Path) -> None:
    path, _ = model
    config = load_model_config(path)
    first = export_model(config, DENSE.graph, "fp32", CACHE_DIR)
    assert export_model(config, DENSE.graph, "fp32", CACHE_DIR) == first
    assert first.stat().st_size > 10_000_000
    # A copy of the model with one changed file is a different model: a different key.
    copy = tmp_path / "model"
    copy.mkdir()
    for file in path.iterdir():
        if file.is_file():
            (copy / file.name).symlink_to(file)
    (copy / "config.json").unlink()
    (copy / "config.json").write_text((path / "config.json").read_text().replace("}", ', "note": "changed"}', 1))
    from embedserve.backends.onnx import export_key

    assert export_key(load_model_config(copy), DENSE.graph, "fp32") != export_key(config, DENSE.graph, "fp32")


def test_failed_onnx_export_falls_back_to_torch_with_a_warning(
    model: tuple[Path, TextTokenizer], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, tokenizer = model
    config = load_model_config(path)
    reference = embed_with(OnnxBackend(config, DENSE.graph, "fp32", CACHE_DIR), tokenizer)

    def broken_export(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr("embedserve.backends.onnx.export_model", broken_export)
    with caplog.at_level(logging.WARNING):
        backend = load_backend(config, DENSE.graph, "onnx", "auto", CACHE_DIR, 0)
    assert backend.info.name == "torch"
    assert "exporter exploded" in caplog.text and "falling back to torch" in caplog.text
    assert (embed_with(backend, tokenizer) * reference).sum(axis=1).min() >= 0.9999  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model-names", "/no/such/model"], "model '/no/such/model' not found"),
        (["--batch-sizes", "8;8;8"], "BATCH_SIZES has 3 values but 2 models"),
        (["--dtypes", "fp16"], "fp16 needs the CUDA execution provider"),
        (["--max-batch-tokens", "100"], "raise --max-batch-tokens to at least 256"),
    ],
    ids=["missing-model", "per-model-mismatch", "fp16-on-cpu", "token-budget"],
)
def test_startup_errors_exit_2_and_say_what_to_change(args: list[str], needle: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "embedserve", "--port", "0", "--cache-dir", str(CACHE_DIR), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
