"""torch backend: the fallback when ONNX Runtime is missing or the export fails."""

from __future__ import annotations

import os

import numpy as np

from embedserve.backends import splade
from embedserve.backends.base import Backend, BackendInfo, FloatArray, GraphSpec, IntArray
from embedserve.backends.config import ModelConfig
from embedserve.errors import ConfigError


class TorchBackend(Backend):
    """Runs the Hugging Face model in torch, on CUDA when available (fp16 there), else CPU."""

    def __init__(self, config: ModelConfig, graph: GraphSpec, dtype: str, intra_op_threads: int = 0) -> None:
        import torch
        import transformers

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "fp16" if device == "cuda" else "fp32"
        if dtype == "int8":
            raise ConfigError("dtype int8 is an ONNX Runtime (CPU) option; use BACKEND=onnx or DTYPES=fp32")
        if dtype == "fp16" and device == "cpu":
            raise ConfigError("dtype fp16 needs a CUDA device for the torch backend; use fp32 on CPU")
        if device == "cpu":
            torch.set_num_threads(intra_op_threads or (os.cpu_count() or 1))
        loader = getattr(transformers, graph.auto_class)
        torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
        model = loader.from_pretrained(str(config.path), dtype=torch_dtype)
        self._model = model.to(device).eval()
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
            if self._graph.splade:
                tensor = splade.pool_torch(tensor, mask)
            return np.asarray(tensor.float().cpu().numpy(), dtype=np.float32)
