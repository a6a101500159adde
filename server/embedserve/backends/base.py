"""The interface every inference backend implements, and what it reports upward."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BackendInfo:
    """What a backend tells the layers above it: identity for logs and ListModels, and
    what batching costs it, so the scheduler need not guess."""

    name: str  # "onnx" | "torch"
    provider: str  # e.g. "CPUExecutionProvider", "CUDAExecutionProvider", "cpu", "cuda"
    dtype: str  # "fp32" | "fp16" | "int8" | "int8-fast"
    # Every backend pads each input of a batch to the longest one, so a batch costs
    # (longest input x batch size) tokens, and sorting by length pays.
    # Fixed cost of one more forward pass (launch, session overhead) in token-equivalents;
    # the scheduler trades it against padding when it cuts batches.
    batch_overhead_tokens: int = 32
    # What the backend runs, for what is kept keyed on it: the ONNX export's folder (named by the
    # hash of the model and the export's format); "" where the model's own files are run.
    artifact: str = ""

    @property
    def on_cuda(self) -> bool:
        """True when the forward pass runs on a CUDA device."""
        return self.provider in ("CUDAExecutionProvider", "cuda")


@dataclass(frozen=True)
class GraphSpec:
    """What a backend must know of a model's kind to load and run it (the engine's kind
    objects hold one each)."""

    onnx_task: str  # optimum's export task
    onnx_output: str | None  # the graph output to fetch; None: its first
    auto_class: str  # the transformers Auto class the torch backend loads
    torch_output: str  # the attribute of the transformers output to return
    # SPLADE max pooling inside the backend (in the graph, or on torch's logits), so the full
    # masked-LM logits never leave it.
    splade: bool = False


class Backend(ABC):
    """Runs a transformer's forward pass on padded token batches. Knows nothing of requests."""

    info: BackendInfo

    @abstractmethod
    def forward(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray) -> FloatArray:
        """Returns the model's output as float32, by kind: dense, the last hidden state (batch,
        tokens, hidden), pooled by the caller; sparse, SPLADE term weights (batch, vocab), each
        the max over the input's real tokens of log(1 + relu(logit)), padding excluded; rerank,
        the classifier logits (batch, num_labels)."""
