"""Turns a transformer's token outputs into one vector per input, as sentence-transformers does."""

from __future__ import annotations

import numpy as np

from embedserve.backends.base import FloatArray, IntArray
from embedserve.backends.config import Pooling


def pool(hidden: FloatArray, attention_mask: IntArray, mode: Pooling) -> FloatArray:
    """Pools (batch, tokens, hidden) to (batch, hidden) over the unmasked tokens."""
    rows: FloatArray
    if mode == "cls":
        rows = hidden[:, 0, :]
        return np.ascontiguousarray(rows, dtype=np.float32)
    if mode == "lasttoken":
        # Index of the last real token of each row (works for right padding).
        last = attention_mask.shape[1] - 1 - np.argmax(attention_mask[:, ::-1], axis=1)
        rows = hidden[np.arange(hidden.shape[0]), last, :]
        return np.ascontiguousarray(rows, dtype=np.float32)
    weights = attention_mask.astype(np.float32)
    if mode == "max":
        masked = np.where(weights[:, :, None] > 0, hidden, np.float32(-1e9))
        rows = masked.max(axis=1)
        return rows.astype(np.float32, copy=False)
    summed: FloatArray = np.einsum("bth,bt->bh", hidden, weights)
    counts = np.clip(weights.sum(axis=1, keepdims=True), 1e-9, None)
    rows = summed / counts
    return rows.astype(np.float32, copy=False)


def normalize(vectors: FloatArray) -> FloatArray:
    """Scales each row to unit L2 norm (rows of zeros stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    rows: FloatArray = vectors / np.clip(norms, 1e-12, None)
    return rows.astype(np.float32, copy=False)
