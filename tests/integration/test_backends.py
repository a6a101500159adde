"""Backend choice, int8 quantization, the torch fallback and startup failures, on the real model."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedserve.backends import load_backend
from embedserve.backends.config import load_model_config
from embedserve.backends.onnx import OnnxBackend, export_model
from embedserve.backends.torch import TorchBackend
from embedserve.engine.kinds import DENSE
from embedserve.engine.pooling import normalize, pool
from embedserve.engine.tokenizer import TextTokenizer
from embedserve.models import resolve_model_path
from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import CACHE_DIR

TEXTS = ["int8 keeps the meaning", "quantized weights, float activations", "日本語も大丈夫", "a " * 300]


def embed_with(backend: OnnxBackend | TorchBackend, tokenizer: TextTokenizer) -> np.ndarray:
    """Vectors the way the engine computes them, for a backend under test."""
    ids, mask, types = tokenizer.collate(tokenizer.encode(TEXTS).encoded)
    return normalize(pool(backend.forward(ids, mask, types), mask, "mean"))


@pytest.fixture(scope="module")
def model() -> tuple[Path, TextTokenizer]:
    path = resolve_model_path(DEFAULT_DENSE_MODEL)
    return path, TextTokenizer(path, 256)


def test_int8_quantized_onnx_stays_close_to_fp32(model: tuple[Path, TextTokenizer]) -> None:
    path, tokenizer = model
    config = load_model_config(path)
    fp32 = OnnxBackend(config, DENSE.graph, "fp32", CACHE_DIR)
    int8 = OnnxBackend(config, DENSE.graph, "int8", CACHE_DIR)
    assert int8.info.dtype == "int8"
    assert export_model(config, DENSE.graph, "int8", CACHE_DIR) != export_model(config, DENSE.graph, "fp32", CACHE_DIR)
    cosines = (embed_with(fp32, tokenizer) * embed_with(int8, tokenizer)).sum(axis=1)
    assert cosines.min() > 0.98
    assert cosines.max() < 0.99999  # really quantized, not the fp32 graph again


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
