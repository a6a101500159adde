"""The CUDA provider is used only where a CUDA device exists."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from embedserve.backends import onnx


def test_a_listed_cuda_provider_without_a_device_is_not_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists CUDAExecutionProvider on machines without a GPU (the GPU image on a
    CPU host); choosing it would pick fp16 and fail over to CPU per model."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnx, "cuda_device_count", lambda: 0)
    assert not onnx.cuda_available()
    monkeypatch.setattr(onnx, "cuda_device_count", lambda: 1)
    assert onnx.cuda_available()


def test_no_driver_means_no_cuda_devices() -> None:
    assert onnx.cuda_device_count() == 0  # these machines have no libcuda
