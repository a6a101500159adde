"""One object per model kind: what it answers, how a backend runs it, what a batch becomes.

Every kind-dependent fact lives here, so the rest of the engine and the backends hold no switch
on the kind: the registry picks the object by `ModelKind`, the backends read its `GraphSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from embedserve.backends.base import Backend, FloatArray, GraphSpec, IntArray
from embedserve.backends.config import ModelConfig
from embedserve.engine.pooling import pool
from embedserve.engine.tokenizer import TextTokenizer, Tokens
from embedserve.engine.types import SparseVector
from embedserve.kinds import Capability, ModelKind

R = TypeVar("R")


@dataclass(frozen=True)
class KindSpec(Generic[R]):
    """A model kind whose forward passes give one `R` per input."""

    kind: ModelKind
    # What the kind answers, what it does best first: a request that names no model gets the
    # first served model of the kind that lists the capability earliest.
    capabilities: tuple[Capability, ...]
    graph: GraphSpec
    # The backend's output for a batch and its attention mask -> one result per input.
    outputs: Callable[[FloatArray, IntArray, ModelConfig], list[R]]
    # What the startup log says of the model's output shape.
    summary: Callable[[ModelConfig], str]

    def runner(
        self, tokenizer: TextTokenizer, backend: Backend, config: ModelConfig
    ) -> Callable[[list[Tokens]], list[R]]:
        """The work of one batch, run in the scheduler's worker thread: pad, forward, results."""

        def run(inputs: list[Tokens]) -> list[R]:
            ids, mask, types = tokenizer.collate(inputs)
            return self.outputs(backend.forward(ids, mask, types), mask, config)

        return run


def _pooled(hidden: FloatArray, mask: IntArray, config: ModelConfig) -> list[FloatArray]:
    return list(pool(hidden, mask, config.pooling))


def _sparse(weights: FloatArray, mask: IntArray, config: ModelConfig) -> list[SparseVector]:
    rows = []
    for row in weights:
        indices = np.flatnonzero(row > 0).astype(np.int32)
        rows.append(SparseVector(indices=indices, values=row[indices].astype(np.float32)))
    return rows


def _scores(logits: FloatArray, mask: IntArray, config: ModelConfig) -> list[float]:
    return [float(row[0]) for row in logits]


DENSE: KindSpec[FloatArray] = KindSpec(
    kind=ModelKind.DENSE,
    # Dense models rerank too, by cosine similarity between the query's and each document's vector.
    capabilities=(Capability.EMBED, Capability.RERANK),
    graph=GraphSpec("feature-extraction", None, "AutoModel", "last_hidden_state"),
    outputs=_pooled,
    summary=lambda c: f"{c.hidden_size}-d, pooling {c.pooling}{', normalized' if c.normalize else ''}",
)
SPARSE: KindSpec[SparseVector] = KindSpec(
    kind=ModelKind.SPARSE,
    capabilities=(Capability.SPARSE_EMBED,),
    # SPLADE pooling in the backend: the full masked-LM logits never leave it.
    graph=GraphSpec("fill-mask", None, "AutoModelForMaskedLM", "logits", splade=True),
    outputs=_sparse,
    summary=lambda c: f"vocabulary {c.vocab_size}, SPLADE max pooling",
)
RERANK: KindSpec[float] = KindSpec(
    kind=ModelKind.RERANK,
    capabilities=(Capability.RERANK,),
    graph=GraphSpec("text-classification", "logits", "AutoModelForSequenceClassification", "logits"),
    outputs=_scores,
    summary=lambda c: f"{c.num_labels} label(s)",
)

KINDS: dict[ModelKind, KindSpec[Any]] = {spec.kind: spec for spec in (DENSE, SPARSE, RERANK)}


def serving(capability: Capability) -> list[KindSpec[Any]]:
    """The kinds that answer a capability, the one it suits best first."""
    able = [spec for spec in KINDS.values() if capability in spec.capabilities]
    return sorted(able, key=lambda spec: spec.capabilities.index(capability))
