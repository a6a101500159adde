"""Domain types the engine takes and returns; no protobuf here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from embedserve.kinds import Capability, ModelKind


class Priority(StrEnum):
    """Which lane a request's work takes on the model."""

    INTERACTIVE = "interactive"  # a caller waits on a few inputs: first, in short batches
    BULK = "bulk"  # streams and large requests: the rest of the model's time, in fair shares


@dataclass(frozen=True, eq=False)
class Call:
    """What the transport knows of a request beyond its message. One per RPC: the requests of
    one stream share it, and the scheduler shares the model fairly between calls (identity)."""

    deadline: float | None = None  # time.monotonic() value; None: the caller set none
    tenant: str = ""  # who sent it (an API key's fingerprint): tenants get equal shares of bulk
    priority: Priority | None = None  # the lane its metadata asks for; one in the message wins


@dataclass(frozen=True)
class EmbedParams:
    """A dense embedding request, validated against the model by the engine."""

    inputs: list[str]
    model: str = ""
    dimensions: int | None = None
    normalize: bool | None = None
    truncate: bool = True
    prompt_name: str = ""
    prompt: str | None = None
    priority: Priority | None = None  # None: the server decides (Engine.lane)


@dataclass(frozen=True)
class SparseParams:
    """A sparse (SPLADE) embedding request."""

    inputs: list[str]
    model: str = ""
    truncate: bool = True
    top_k: int | None = None
    min_weight: float | None = None
    return_tokens: bool = False
    priority: Priority | None = None


@dataclass(frozen=True)
class RerankParams:
    """A rerank request: documents scored against one query."""

    query: str
    documents: list[str]
    model: str = ""
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    truncate: bool = True
    priority: Priority | None = None


@dataclass(frozen=True)
class Usage:
    """Real token counts, after prompts and truncation."""

    prompt_tokens: int
    truncated_inputs: int

    @property
    def total_tokens(self) -> int:
        """Total tokens processed; the same as prompt tokens for encoders."""
        return self.prompt_tokens


@dataclass(frozen=True)
class Timing:
    """Where a request's time went, in milliseconds."""

    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    total_ms: float
    # Inputs answered without a forward pass of their own: their vector was in the vector cache,
    # or they repeat an earlier input of the request. 0 for the kinds the cache does not serve.
    cached_inputs: int = 0


@dataclass(frozen=True)
class SparseVector:
    """One sparse vector: vocabulary ids (ascending) and their weights (> 0)."""

    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float32]
    tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ranked:
    """One document's place in a ranking."""

    index: int
    score: float
    document: str = ""


@dataclass(frozen=True)
class Result:
    """What every answer carries besides its payload: the model that computed it and the cost."""

    model: str
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class EmbedResult(Result):
    """Vectors, one row per input, in input order."""

    vectors: npt.NDArray[np.float32]


@dataclass(frozen=True)
class SparseResult(Result):
    """Sparse vectors, one per input, in input order."""

    vectors: list[SparseVector]


@dataclass(frozen=True)
class RerankResult(Result):
    """Documents sorted by score, highest first."""

    results: list[Ranked]


@dataclass(frozen=True)
class ModelDescription:
    """What ListModels says about a served model."""

    id: str
    kind: ModelKind
    capabilities: tuple[Capability, ...]
    dimension: int
    vocab_size: int
    max_input_tokens: int
    backend: str
    provider: str
    dtype: str
    normalize: bool
    max_batch_size: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str = ""
    loaded_at: int = 0  # Unix time, seconds
    pooling: str = ""  # dense models: "mean", "cls", "lasttoken" or "max"
    max_batch_tokens: int = 0  # padded tokens in one forward pass
    queued: int = 0  # inputs (or pairs) waiting now, both lanes
