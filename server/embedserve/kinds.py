"""What a model computes: the one name for it that every layer shares."""

from __future__ import annotations

from enum import StrEnum


class ModelKind(StrEnum):
    """A model's kind; its value is the name used in settings, logs and REST."""

    DENSE = "dense"
    SPARSE = "sparse"
    RERANK = "rerank"


class Capability(StrEnum):
    """What a served model can be asked to do, in the engine's own words (the services name
    the RPCs and routes that use each)."""

    EMBED = "embed"
    SPARSE_EMBED = "sparse_embed"
    RERANK = "rerank"
