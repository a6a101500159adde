"""Checks of a request against the limits and the model, before any work is done."""

from __future__ import annotations

from collections.abc import Sequence

from embedserve.backends.config import ModelConfig
from embedserve.engine.types import EmbedParams, RerankParams, SparseParams
from embedserve.errors import InvalidInputError, quoted


def check_inputs(inputs: Sequence[str], limit: int, what: str = "inputs") -> None:
    """At least one text, at most `limit`, none empty."""
    if not inputs:
        raise InvalidInputError(f"{what} is empty: send at least one text")
    if len(inputs) > limit:
        raise InvalidInputError(f"{what} has {len(inputs)} texts but the limit is {limit}: split the request")
    for i, text in enumerate(inputs):
        if not text:
            raise InvalidInputError(f"{what}[{i}] is an empty string: every input needs text")


def check_dimensions(params: EmbedParams, model_id: str, dimension: int) -> None:
    """A Matryoshka cut keeps between 1 and all of the model's dimensions."""
    if params.dimensions is not None and not 1 <= params.dimensions <= dimension:
        raise InvalidInputError(
            f"dimensions must be between 1 and {dimension} for model {model_id}, got {params.dimensions}"
        )


def check_sparse(params: SparseParams) -> None:
    """top_k and min_weight, when set, are in range."""
    if params.top_k is not None and params.top_k < 1:
        raise InvalidInputError(f"top_k must be at least 1, got {params.top_k}")
    if params.min_weight is not None and params.min_weight < 0:
        raise InvalidInputError(f"min_weight must be 0 or more, got {params.min_weight}")


def check_rerank(params: RerankParams, limit: int) -> None:
    """A query, documents within the limit, and top_n in range."""
    if not params.query:
        raise InvalidInputError("query is empty: send the text to rank documents against")
    check_inputs(params.documents, limit, "documents")
    if params.top_n is not None and params.top_n < 1:
        raise InvalidInputError(f"top_n must be at least 1, got {params.top_n}")


def prompt_prefix(params: EmbedParams, model_id: str, config: ModelConfig) -> str:
    """The text put before every input: a literal prompt, a named one, or the model's default."""
    prompts = config.prompts
    if params.prompt is not None and params.prompt_name:
        raise InvalidInputError("set either prompt_name or prompt, not both")
    if params.prompt is not None:
        return params.prompt
    name = params.prompt_name or config.default_prompt_name or ""
    if not name:
        return ""
    if name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise InvalidInputError(f"model {model_id} has no prompt named {quoted(name)}; its prompts: {known}")
    return prompts[name]


def document_prompts(config: ModelConfig) -> tuple[str, str]:
    """The model's (query, document) prompts, as sentence-transformers' encode_query and
    encode_document apply them (E5: "query: ", "passage: ")."""
    prompts = config.prompts
    document = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), "")
    return prompts.get("query", ""), document
