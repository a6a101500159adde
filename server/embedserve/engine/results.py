"""What a request's per-input results become (vectors cut and normalized, terms selected,
documents ranked), and what it cost."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedserve.backends.base import FloatArray
from embedserve.engine.pooling import normalize
from embedserve.engine.scheduler import Job
from embedserve.engine.tokenizer import TextTokenizer, Tokenized, Tokens
from embedserve.engine.types import EmbedParams, Ranked, RerankParams, SparseParams, SparseVector, Timing, Usage


def vectors(rows: Sequence[FloatArray], params: EmbedParams, model_normalizes: bool) -> FloatArray:
    """Stacks pooled rows, keeps the first `dimensions` and normalizes as asked (else as the
    model does)."""
    stacked = np.stack(rows)
    if params.dimensions is not None:
        stacked = stacked[:, : params.dimensions]
    if model_normalizes if params.normalize is None else params.normalize:
        stacked = normalize(stacked)
    return np.ascontiguousarray(stacked, dtype=np.float32)


def select_terms(vector: SparseVector, params: SparseParams, tokenizer: TextTokenizer) -> SparseVector:
    """Applies a request's min_weight and top_k; indices stay ascending."""
    keep = np.ones(len(vector.indices), dtype=bool)
    if params.min_weight is not None:
        keep &= vector.values > params.min_weight
    indices, values = vector.indices[keep], vector.values[keep]
    if params.top_k is not None and len(indices) > params.top_k:
        heaviest = np.sort(np.argsort(-values, kind="stable")[: params.top_k])
        indices, values = indices[heaviest], values[heaviest]
    tokens = [tokenizer.token(int(i)) for i in indices] if params.return_tokens else []
    return SparseVector(indices=indices, values=values, tokens=tokens)


def cross_encoder_scores(logits: Sequence[float], raw: bool) -> np.ndarray:
    """Relevance logits, mapped to 0..1 by a sigmoid unless raw scores are asked for."""
    scores = np.asarray(logits, dtype=np.float64)
    return scores if raw else 1.0 / (1.0 + np.exp(-scores))


def cosine_scores(rows: Sequence[FloatArray]) -> np.ndarray:
    """Cosine similarity of each document's vector (rows 1..) to the query's (row 0)."""
    unit = normalize(np.stack(rows))
    scores: np.ndarray = unit[1:] @ unit[0]
    return scores


def ranking(scores: np.ndarray, params: RerankParams) -> list[Ranked]:
    """Documents by score, highest first, cut to top_n."""
    order = sorted(range(len(params.documents)), key=lambda i: -scores[i])[: params.top_n]
    return [Ranked(i, float(scores[i]), params.documents[i] if params.return_documents else "") for i in order]


def usage(tokenized: Tokenized) -> Usage:
    """Real token counts, after prompts and truncation."""
    return Usage(prompt_tokens=tokenized.tokens, truncated_inputs=len(tokenized.truncated))


def timing(arrived: float, tokenize_s: float, job: Job[Tokens, Any] | None, cached_inputs: int = 0) -> Timing:
    """Where the request's time went, from its arrival until now; job None: it ran no forward
    pass (the vector cache answered every input)."""
    return Timing(
        queue_ms=0.0 if job is None else (job.last_batch_started_at - job.admitted_at) * 1e3,
        tokenize_ms=tokenize_s * 1e3,
        inference_ms=0.0 if job is None else job.inference_s * 1e3,
        total_ms=(time.monotonic() - arrived) * 1e3,
        cached_inputs=cached_inputs,
    )
