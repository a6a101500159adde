"""Inference backends (ONNX Runtime first, torch as fallback) behind one interface."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from embedserve.backends.base import Backend, BackendInfo, GraphSpec
from embedserve.backends.config import ModelConfig
from embedserve.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Backend", "BackendInfo", "GraphSpec", "expects_cuda", "load_backend"]


def expects_cuda(backend: str) -> bool:
    """Whether the backend will run on a CUDA device (it may still fall back to CPU when the
    device's libraries do not load; its `BackendInfo.on_cuda` says what it got)."""
    if backend == "onnx" and importlib.util.find_spec("onnxruntime") is not None:
        from embedserve.backends.onnx import cuda_available

        return cuda_available()
    import torch  # the torch backend, or the fallback when onnxruntime is missing

    return bool(torch.cuda.is_available())


def load_backend(
    config: ModelConfig, graph: GraphSpec, backend: str, dtype: str, cache_dir: Path, intra_op_threads: int
) -> Backend:
    """Loads the requested backend; falls back to torch, with a warning naming the reason,
    when ONNX Runtime is missing or the export fails."""
    if backend == "onnx":
        try:
            from embedserve.backends.onnx import OnnxBackend

            return OnnxBackend(config, graph, dtype, cache_dir, intra_op_threads)
        except ConfigError:
            raise
        except Exception as exc:
            log.warning(
                "ONNX Runtime backend unavailable for %s (%s: %s); falling back to torch",
                config.path,
                type(exc).__name__,
                exc,
            )
    from embedserve.backends.torch import TorchBackend

    return TorchBackend(config, graph, dtype, intra_op_threads)
