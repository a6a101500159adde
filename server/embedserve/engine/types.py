"""Domain types the engine takes and returns; no protobuf here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt


class Kind(StrEnum):
    """What a model computes."""

    DENSE = "dense"
    SPARSE = "sparse"
    RERANK = "rerank"


# RPCs each kind answers (ListModels capabilities; FAILED_PRECONDITION messages).
CAPABILITIES: dict[Kind, tuple[str, ...]] = {
    Kind.DENSE: ("Embed", "EmbedStream"),
    Kind.SPARSE: ("SparseEmbed",),
    Kind.RERANK: ("Rerank",),
}


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


@dataclass(frozen=True)
class EmbedResult:
    """Vectors, one row per input, in input order."""

    vectors: npt.NDArray[np.float32]
    model: str
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class ModelDescription:
    """What ListModels says about a served model."""

    id: str
    kind: Kind
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

    @property
    def capabilities(self) -> tuple[str, ...]:
        """RPCs this model answers."""
        return CAPABILITIES[self.kind]
