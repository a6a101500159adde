"""Inference backends (ONNX Runtime first, torch as fallback) behind one interface."""

from __future__ import annotations

import logging
from pathlib import Path

from embedserve.backends.base import Backend, BackendInfo, GraphSpec
from embedserve.backends.config import ModelConfig
from embedserve.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Backend", "BackendInfo", "GraphSpec", "load_backend"]


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
