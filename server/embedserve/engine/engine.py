"""The model registry and the request path: validate, tokenize, schedule, post-process."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

from embedserve.backends import Backend, load_backend
from embedserve.backends.config import ModelConfig, load_model_config
from embedserve.backends.pooling import normalize, pool
from embedserve.engine.scheduler import BatchLimits, Job, Scheduler
from embedserve.engine.tokenizer import TextTokenizer, Tokenized
from embedserve.engine.types import (
    CAPABILITIES,
    SERVED_BY,
    EmbedParams,
    EmbedResult,
    Kind,
    ModelDescription,
    Ranked,
    RerankParams,
    RerankResult,
    SparseParams,
    SparseResult,
    SparseVector,
    Timing,
    Usage,
)
from embedserve.errors import ConfigError, InvalidInputError, ModelNotFoundError, WrongModelKindError
from embedserve.models import resolve_model_path
from embedserve.settings import ModelSettings, Settings

log = logging.getLogger(__name__)

Vector = np.ndarray
# What one input becomes: a pooled vector, a sparse vector or a relevance logit.
Output = Vector | SparseVector | float


@dataclass
class ServedModel:
    """One loaded model with its tokenizer, backend and scheduler."""

    id: str
    config: ModelConfig
    tokenizer: TextTokenizer
    backend: Backend
    scheduler: Scheduler[Encoding, Output]
    batch_size: int
    loaded_at: float  # Unix time the model finished loading

    @property
    def kind(self) -> Kind:
        """What the model computes."""
        return Kind(self.config.kind)

    def describe(self) -> ModelDescription:
        """What ListModels reports."""
        info = self.backend.info
        return ModelDescription(
            id=self.id,
            kind=self.kind,
            dimension=self.config.hidden_size if self.kind is Kind.DENSE else 0,
            vocab_size=self.config.vocab_size if self.kind is Kind.SPARSE else 0,
            max_input_tokens=self.config.max_input_tokens,
            backend=info.name,
            provider=info.provider,
            dtype=info.dtype,
            normalize=self.config.normalize,
            max_batch_size=self.batch_size,
            prompts=dict(self.config.prompts),
            default_prompt_name=self.config.default_prompt_name or "",
            loaded_at=int(self.loaded_at),
        )


def _runner(
    tokenizer: TextTokenizer, backend: Backend, config: ModelConfig
) -> Callable[[list[Encoding]], Sequence[Output]]:
    """The work of one batch, run in the scheduler's worker thread: pad, forward, and turn the
    backend's output into one result per input (a vector, a sparse vector or a score)."""

    def dense(encodings: list[Encoding]) -> Sequence[Output]:
        ids, mask, types = tokenizer.collate(encodings)
        return list(pool(backend.forward(ids, mask, types), mask, config.pooling))

    def sparse(encodings: list[Encoding]) -> Sequence[Output]:
        weights = backend.forward(*tokenizer.collate(encodings))
        rows = []
        for row in weights:
            indices = np.flatnonzero(row > 0).astype(np.int32)
            rows.append(SparseVector(indices=indices, values=row[indices].astype(np.float32)))
        return rows

    def rerank(encodings: list[Encoding]) -> Sequence[Output]:
        return [float(logits[0]) for logits in backend.forward(*tokenizer.collate(encodings))]

    return {"dense": dense, "sparse": sparse, "rerank": rerank}[config.kind]


class Engine:
    """Owns every served model; the only thing services talk to."""

    def __init__(self, settings: Settings, models: list[ServedModel], tokenize_pool: ThreadPoolExecutor) -> None:
        self.settings = settings
        self._models = {m.id: m for m in models}
        self._order = [m.id for m in models]
        self._tokenize_pool = tokenize_pool

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Loads every configured model; raises ConfigError saying what to change."""
        models = [load_served_model(spec, settings) for spec in settings.models]
        return cls(settings, models, ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize"))

    def set_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Calls `callback` when any model's worker crashes (to flip health)."""
        for model in self._models.values():
            model.scheduler.on_failure = callback

    def start(self) -> None:
        """Starts every model's batching loop (call inside the running event loop)."""
        for model in self._models.values():
            model.scheduler.start()

    async def close(self) -> None:
        """Stops the schedulers and worker threads."""
        for model in self._models.values():
            await model.scheduler.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # -- lookups -----------------------------------------------------------------------

    def describe(self) -> list[ModelDescription]:
        """Every served model, in configuration order."""
        return [self._models[i].describe() for i in self._order]

    def model(self, name: str, rpc: str) -> ServedModel:
        """Finds the model a request names; empty picks the first served model of a kind that
        answers the RPC (for Rerank: a cross-encoder, else a dense model)."""
        kinds = SERVED_BY[rpc]
        if not name:
            for kind in kinds:
                for model_id in self._order:
                    if self._models[model_id].kind is kind:
                        return self._models[model_id]
            wanted = " or ".join(k.value for k in kinds)
            raise ModelNotFoundError(
                f"no {wanted} model is served, so {rpc} needs one in MODEL_NAMES; served: {self._served()}"
            )
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model {name!r} is not served; served models: {self._served()}")
        if model.kind not in kinds:
            raise WrongModelKindError(
                f"model {name!r} is a {model.kind.value} model and answers "
                f"{', '.join(CAPABILITIES[model.kind])}, not {rpc}"
            )
        return model

    def _served(self) -> str:
        return ", ".join(f"{i} ({self._models[i].kind.value})" for i in self._order)

    # -- requests ----------------------------------------------------------------------

    def _check_inputs(self, inputs: Sequence[str], what: str = "inputs") -> None:
        limit = self.settings.max_inputs_per_request
        if not inputs:
            raise InvalidInputError(f"{what} is empty: send at least one text")
        if len(inputs) > limit:
            raise InvalidInputError(f"{what} has {len(inputs)} texts but the limit is {limit}: split the request")
        for i, text in enumerate(inputs):
            if not text:
                raise InvalidInputError(f"{what}[{i}] is an empty string: every input needs text")

    async def _tokenize(
        self,
        model: ServedModel,
        texts: list[str],
        truncate: bool,
        query: str | None = None,
        name: Callable[[int], str] = "inputs[{}]".format,
    ) -> tuple[Tokenized, float]:
        """Tokenizes texts (or query/text pairs) off the event loop; with truncate=False an
        input over the model's max tokens fails the request, naming it (`name(position)`) and
        both lengths."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        if query is None:
            tokenized = await loop.run_in_executor(self._tokenize_pool, model.tokenizer.encode, texts)
        else:
            tokenized = await loop.run_in_executor(self._tokenize_pool, model.tokenizer.encode_pairs, query, texts)
        if tokenized.truncated and not truncate:
            first = tokenized.truncated[0]
            full = texts[first] if query is None else f"{query} {texts[first]}"
            length = await loop.run_in_executor(self._tokenize_pool, model.tokenizer.full_length, full)
            pair = "" if query is None else " together with the query"
            raise InvalidInputError(
                f"{name(first)} has {length} tokens{pair} but model {model.id} accepts at most "
                f"{model.tokenizer.max_tokens}: shorten it or set truncate=true "
                f"({len(tokenized.truncated)} input(s) too long)"
            )
        return tokenized, time.monotonic() - started

    async def _run(
        self, model: ServedModel, tokenized: Tokenized, deadline: float | None, wait: bool
    ) -> tuple[list[Output], Job[Encoding, Output]]:
        job: Job[Encoding, Output] = Job(tokenized.encodings, tokenized.lengths, deadline)
        if wait:
            await model.scheduler.submit(job)
        else:
            model.scheduler.submit_nowait(job)
        try:
            results = await asyncio.shield(job.future)
        except asyncio.CancelledError:
            model.scheduler.cancel(job)
            raise
        return results, job

    async def embed(self, params: EmbedParams, deadline: float | None = None, wait: bool = False) -> EmbedResult:
        """Returns one vector per input. With wait=True a full queue delays admission
        (streams); otherwise it fails fast with OverloadedError (unary)."""
        arrived = time.monotonic()
        model = self.model(params.model, "Embed")
        self._check_inputs(params.inputs)
        dimension = model.config.hidden_size
        if params.dimensions is not None and not 1 <= params.dimensions <= dimension:
            raise InvalidInputError(
                f"dimensions must be between 1 and {dimension} for model {model.id}, got {params.dimensions}"
            )
        prefix = self._prompt(model, params)
        texts = [prefix + t for t in params.inputs] if prefix else list(params.inputs)
        tokenized, tokenize_s = await self._tokenize(model, texts, params.truncate)
        rows, job = await self._run(model, tokenized, deadline, wait)
        vectors = np.stack(rows)  # type: ignore[arg-type]  # dense models return vectors
        if params.dimensions is not None:
            vectors = vectors[:, : params.dimensions]
        if model.config.normalize if params.normalize is None else params.normalize:
            vectors = normalize(vectors)
        return EmbedResult(
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            model=model.id,
            usage=_usage(tokenized),
            timing=_timing(arrived, tokenize_s, job),
        )

    async def sparse_embed(self, params: SparseParams, deadline: float | None = None) -> SparseResult:
        """Returns one SPLADE vector per input, optionally cut to its top_k or heaviest terms."""
        arrived = time.monotonic()
        model = self.model(params.model, "SparseEmbed")
        self._check_inputs(params.inputs)
        if params.top_k is not None and params.top_k < 1:
            raise InvalidInputError(f"top_k must be at least 1, got {params.top_k}")
        if params.min_weight is not None and params.min_weight < 0:
            raise InvalidInputError(f"min_weight must be 0 or more, got {params.min_weight}")
        tokenized, tokenize_s = await self._tokenize(model, list(params.inputs), params.truncate)
        rows, job = await self._run(model, tokenized, deadline, wait=False)
        vectors = [_select_terms(row, params, model.tokenizer) for row in rows]  # type: ignore[arg-type]
        return SparseResult(vectors, model.id, _usage(tokenized), _timing(arrived, tokenize_s, job))

    async def rerank(self, params: RerankParams, deadline: float | None = None) -> RerankResult:
        """Scores documents against the query with a cross-encoder, or by cosine similarity
        with a dense model; returns them highest first."""
        arrived = time.monotonic()
        model = self.model(params.model, "Rerank")
        if not params.query:
            raise InvalidInputError("query is empty: send the text to rank documents against")
        self._check_inputs(params.documents, "documents")
        if params.top_n is not None and params.top_n < 1:
            raise InvalidInputError(f"top_n must be at least 1, got {params.top_n}")
        if model.kind is Kind.RERANK:
            tokenized, tokenize_s = await self._tokenize(
                model, params.documents, params.truncate, params.query, "documents[{}]".format
            )
            logits, job = await self._run(model, tokenized, deadline, wait=False)
            scores = np.asarray(logits, dtype=np.float64)
            if not params.raw_scores:
                scores = 1.0 / (1.0 + np.exp(-scores))
        else:  # bi-encoder: cosine between the query's vector and each document's
            # With the model's own query/document prompts, as sentence-transformers' encode_query
            # and encode_document apply them (E5: "query: ", "passage: ").
            prompts = model.config.prompts
            query_prompt = prompts.get("query", "")
            document_prompt = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), "")
            texts = [query_prompt + params.query, *(document_prompt + d for d in params.documents)]
            tokenized, tokenize_s = await self._tokenize(
                model, texts, params.truncate, name=lambda i: "the query" if i == 0 else f"documents[{i - 1}]"
            )
            rows, job = await self._run(model, tokenized, deadline, wait=False)
            vectors = normalize(np.stack(rows))  # type: ignore[arg-type]
            scores = vectors[1:] @ vectors[0]
        order = sorted(range(len(params.documents)), key=lambda i: -scores[i])[: params.top_n]
        results = [Ranked(i, float(scores[i]), params.documents[i] if params.return_documents else "") for i in order]
        return RerankResult(results, model.id, _usage(tokenized), _timing(arrived, tokenize_s, job))

    @staticmethod
    def _prompt(model: ServedModel, params: EmbedParams) -> str:
        prompts = model.config.prompts
        if params.prompt is not None and params.prompt_name:
            raise InvalidInputError("set either prompt_name or prompt, not both")
        if params.prompt is not None:
            return params.prompt
        name = params.prompt_name or model.config.default_prompt_name or ""
        if not name:
            return ""
        if name not in prompts:
            known = ", ".join(sorted(prompts)) or "none"
            raise InvalidInputError(f"model {model.id} has no prompt named {name!r}; its prompts: {known}")
        return prompts[name]


def _usage(tokenized: Tokenized) -> Usage:
    return Usage(prompt_tokens=tokenized.tokens, truncated_inputs=len(tokenized.truncated))


def _timing(arrived: float, tokenize_s: float, job: Job[Encoding, Output]) -> Timing:
    return Timing(
        queue_ms=(job.last_batch_started_at - job.admitted_at) * 1e3,
        tokenize_ms=tokenize_s * 1e3,
        inference_ms=job.inference_s * 1e3,
        total_ms=(time.monotonic() - arrived) * 1e3,
    )


def _select_terms(vector: SparseVector, params: SparseParams, tokenizer: TextTokenizer) -> SparseVector:
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


def load_served_model(spec: ModelSettings, settings: Settings) -> ServedModel:
    """Loads one model's config, tokenizer and backend, logging what was loaded and how long it took."""
    started = time.monotonic()
    path = resolve_model_path(spec.name)
    config = load_model_config(path, spec.kind)
    if config.max_input_tokens > settings.max_batch_tokens:
        raise ConfigError(
            f"model {spec.name} takes inputs of up to {config.max_input_tokens} tokens but MAX_BATCH_TOKENS is "
            f"{settings.max_batch_tokens}: raise --max-batch-tokens to at least {config.max_input_tokens}"
        )
    if config.kind == "rerank" and config.num_labels != 1:
        raise ConfigError(
            f"model {spec.name} is a sequence classifier with {config.num_labels} labels; rerank needs a "
            f"cross-encoder with one relevance label (num_labels=1)"
        )
    tokenizer = TextTokenizer(path, config.max_input_tokens)
    backend = load_backend(config, spec.backend, spec.dtype, settings.cache_dir, settings.intra_op_threads)
    limits = BatchLimits(
        max_batch_size=spec.batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        padded=backend.info.padded,
        batch_overhead_tokens=backend.info.batch_overhead_tokens,
    )
    scheduler: Scheduler[Encoding, Output] = Scheduler(
        spec.name, _runner(tokenizer, backend, config), limits, settings.queue_size
    )
    info = backend.info
    if config.kind == "dense":
        shape = f"{config.hidden_size}-d, pooling {config.pooling}{', normalized' if config.normalize else ''}"
    elif config.kind == "sparse":
        shape = f"vocabulary {config.vocab_size}, SPLADE max pooling"
    else:
        shape = f"{config.num_labels} label(s)"
    log.info(
        "loaded model %s (%s, %s, max %d tokens) from %s: backend %s, provider %s, dtype %s, batch %d, in %.1f s",
        spec.name,
        config.kind,
        shape,
        config.max_input_tokens,
        path,
        info.name,
        info.provider,
        info.dtype,
        spec.batch_size,
        time.monotonic() - started,
    )
    return ServedModel(spec.name, config, tokenizer, backend, scheduler, spec.batch_size, time.time())
