"""torch backend: the fallback when ONNX Runtime is missing or the export fails."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from embedserve.backends import splade
from embedserve.backends.base import Backend, BackendInfo, FloatArray, GraphSpec, IntArray
from embedserve.backends.config import ModelConfig
from embedserve.errors import ConfigError

log = logging.getLogger(__name__)


class TorchBackend(Backend):
    """Runs the Hugging Face model in torch, on CUDA when available (fp16 there), else CPU."""

    def __init__(self, config: ModelConfig, graph: GraphSpec, dtype: str, intra_op_threads: int = 0) -> None:
        import torch
        import transformers

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "fp16" if device == "cuda" else "fp32"
        if dtype.startswith("int8"):
            raise ConfigError(f"dtype {dtype} is an ONNX Runtime (CPU) option; use BACKEND=onnx or DTYPES=fp32")
        if dtype == "fp16" and device == "cpu":
            raise ConfigError("dtype fp16 needs a CUDA device for the torch backend; use fp32 on CPU")
        if device == "cpu":
            torch.set_num_threads(intra_op_threads or (os.cpu_count() or 1))
        loader = getattr(transformers, graph.auto_class)
        torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
        model = loader.from_pretrained(str(config.path), dtype=torch_dtype)
        self._model = model.to(device).eval()
        # SPLADE: the model ends at its vocabulary projection's input; the projection and the
        # pooling run on chunks of tokens (splade.py), so a batch's logits never exist at once.
        self._projection = _cut_projection(self._model) if graph.splade else None
        self._chunk_tokens = splade.CHUNK_TOKENS_CUDA if device == "cuda" else splade.CHUNK_TOKENS_CPU
        self._device = torch.device(device)
        self._torch = torch
        self._graph = graph
        overhead = 512 if device == "cuda" else 32
        self.info = BackendInfo(name="torch", provider=device, dtype=dtype, batch_overhead_tokens=overhead)

    def forward(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray) -> FloatArray:
        torch = self._torch
        with torch.inference_mode():
            mask = torch.from_numpy(attention_mask).to(self._device)
            out = self._model(
                input_ids=torch.from_numpy(input_ids).to(self._device),
                attention_mask=mask,
                token_type_ids=torch.from_numpy(token_type_ids).to(self._device),
            )
            tensor = getattr(out, self._graph.torch_output)
            if self._projection is not None:
                tensor = self._splade(tensor, mask, attention_mask)
            return np.asarray(tensor.float().cpu().numpy(), dtype=np.float32)

    def _splade(self, hidden: Any, mask: Any, attention_mask: IntArray) -> Any:
        """SPLADE weights from the projection's input, projected and pooled a chunk at a time."""
        torch = self._torch
        projection = self._projection
        assert projection is not None
        weights = torch.zeros((hidden.shape[0], projection.out_features), dtype=hidden.dtype, device=hidden.device)
        for rows, tokens in splade.chunks(attention_mask, self._chunk_tokens):
            logits = projection(hidden[rows, tokens])
            torch.maximum(weights[rows], splade.pool_torch(logits, mask[rows, tokens]), out=weights[rows])
        return weights


def _cut_projection(model: Any) -> Any:
    """Replaces a masked-LM's vocabulary projection (its output embeddings, the last step of its
    head) with a pass-through, so the model's `logits` are the projection's input; returns the
    projection (its weights stay tied to the input embeddings)."""
    import torch

    projection = model.get_output_embeddings()
    if not isinstance(projection, torch.nn.Linear):
        raise ConfigError(f"a SPLADE model needs a linear vocabulary projection, found {type(projection).__name__}")
    for name, module in model.named_modules():
        for attribute, child in module.named_children():
            if child is projection:
                setattr(module, attribute, torch.nn.Identity())
                log.debug("SPLADE: %s.%s runs in chunks", name, attribute)
                return projection
    raise ConfigError("the SPLADE model's vocabulary projection is not one of its modules")
