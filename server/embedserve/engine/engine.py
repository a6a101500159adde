"""The request path: validate, look up the vector cache, tokenize, schedule, turn results into
answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from embedserve.backends.base import FloatArray
from embedserve.engine import results, validation
from embedserve.engine.kinds import RERANK
from embedserve.engine.registry import Registry, ServedModel, is_kind
from embedserve.engine.scheduler import Job, Ticket
from embedserve.engine.streaming import StreamDrain, windowed
from embedserve.engine.threads import lower_priority
from embedserve.engine.tokenizer import Tokenized, Tokens
from embedserve.engine.types import (
    Call,
    EmbedParams,
    EmbedResult,
    ModelDescription,
    Priority,
    RerankParams,
    RerankResult,
    Result,
    SparseParams,
    SparseResult,
    Usage,
)
from embedserve.engine.vector_cache import Cached, InFlight, Plan, VectorCache, model_identity
from embedserve.errors import InvalidInputError
from embedserve.kinds import Capability
from embedserve.settings import Settings

K = TypeVar("K")
R = TypeVar("R")
AnyResult = TypeVar("AnyResult", bound=Result)

NO_CALL = Call()  # a request with no deadline, tenant or metadata (in-process callers)


@dataclass(frozen=True)
class Dense:
    """The pooled vectors of a request's texts and what they cost: the cache's and the computed."""

    rows: list[FloatArray]
    usage: Usage
    tokenize_s: float
    job: Job[Tokens, FloatArray] | None  # None: the cache held every text
    cached: int  # inputs not computed for themselves (`Plan.cached`)


class EngineObserver(Protocol):
    """What the engine reports of each request, to whoever watches it (the server's metrics),
    so that it need not know who that is. Called in the request's task; must not raise."""

    def resolved(self, model: str) -> None:
        """The request is for served model `model` (named, or the default of its kind)."""

    def answered(self, result: Result) -> None:
        """The request was answered: `result` has its model, usage and timing."""


class Engine:
    """Owns every served model; the only thing services talk to."""

    def __init__(self, settings: Settings, registry: Registry, tokenize_pool: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.registry = registry
        self._tokenize_pool = tokenize_pool
        self.observer: EngineObserver | None = None
        self.vectors = VectorCache(settings.vector_cache_bytes)
        self._in_flight = InFlight()  # texts being computed now, shared between requests
        self._streams = StreamDrain()
        self._identities = {
            m.id: model_identity(
                m.id,
                m.backend.info.name,
                m.backend.info.provider,
                m.backend.info.dtype,
                m.config.pooling,
                str(m.config.path),
            )
            for m in registry
        }

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Loads every configured model; raises ConfigError saying what to change."""
        return cls(
            settings,
            Registry.load(settings),
            ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="tokenize", initializer=lower_priority(settings.worker_niceness)
            ),
        )

    def set_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Calls `callback` when any model's worker crashes (to flip health)."""
        self.registry.on_failure(callback)

    def start(self) -> None:
        """Starts every model's batching loop (call inside the running event loop)."""
        for model in self.registry:
            model.scheduler.start()

    def end_streams(self, grace_s: float) -> None:
        """Ends every open `embed_stream`, and any opened from now on, once it has answered the
        requests it has read (within `grace_s`), with ShuttingDownError: the server is stopping."""
        self._streams.begin(grace_s)

    async def close(self) -> None:
        """Stops the schedulers and worker threads."""
        for model in self.registry:
            await model.scheduler.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> list[ModelDescription]:
        """Every served model, in configuration order."""
        return self.registry.describe()

    def describe_model(self, name: str, capability: Capability | None = None) -> ModelDescription:
        """One served model: the one named, of any kind, or with `capability` the one a request
        for it gets (empty: the default of its kind); raises ModelNotFoundError or
        WrongModelKindError, as such a request would."""
        return self.registry.describe_model(name, capability)

    # -- requests ----------------------------------------------------------------------

    def lane(self, requested: Priority | None, call: Call, inputs: int, streamed: bool = False) -> Priority:
        """The lane a request's work takes: as its message, else its metadata asks; else
        interactive for a unary request of at most INTERACTIVE_MAX_INPUTS inputs, bulk for
        streams and larger requests."""
        if requested is not None:
            return requested
        if call.priority is not None:
            return call.priority
        if streamed or inputs > self.settings.interactive_max_inputs:
            return Priority.BULK
        return Priority.INTERACTIVE

    async def embed(self, params: EmbedParams, call: Call = NO_CALL, wait: bool = False) -> EmbedResult:
        """Returns one vector per input. With wait=True (streams) a full queue delays admission
        and the work is bulk unless the request says otherwise; without, a full queue fails fast
        with OverloadedError, before the texts are tokenized."""
        arrived = time.monotonic()
        model = self._find(params.model, Capability.EMBED)
        validation.check_inputs(params.inputs, self.settings.max_inputs_per_request)
        validation.check_dimensions(params, model.id, model.config.hidden_size)
        prefix = validation.prompt_prefix(params, model.id, model.config)
        texts = [prefix + t for t in params.inputs] if prefix else list(params.inputs)
        lane = self.lane(params.priority, call, len(params.inputs), streamed=wait)
        dense = await self._dense(model, texts, params.truncate, call, lane, wait)
        return self._answered(
            EmbedResult(
                vectors=results.vectors(dense.rows, params, model.config.normalize),
                model=model.id,
                usage=dense.usage,
                timing=results.timing(arrived, dense.tokenize_s, dense.job, dense.cached),
            )
        )

    async def embed_stream(
        self, requests: AsyncIterator[tuple[K, EmbedParams]], call: Call = NO_CALL
    ) -> AsyncIterator[tuple[K, EmbedResult | Exception]]:
        """Answers a stream of embedding requests, each as soon as it is done, with its key;
        a failed request yields its error and the stream goes on. At most `stream_window`
        requests are read ahead of their answers, and a full queue delays admission. After
        `end_streams` it ends with ShuttingDownError."""

        async def answer(request: tuple[K, EmbedParams]) -> EmbedResult:
            return await self.embed(request[1], call, wait=True)

        window, idle_s = self.settings.stream_window, self.settings.stream_idle_timeout
        async for (key, _), outcome in windowed(requests, answer, window, idle_s, self._streams):
            yield key, outcome

    async def sparse_embed(self, params: SparseParams, call: Call = NO_CALL) -> SparseResult:
        """Returns one SPLADE vector per input, optionally cut to its top_k or heaviest terms."""
        arrived = time.monotonic()
        model = self._find(params.model, Capability.SPARSE_EMBED)
        validation.check_inputs(params.inputs, self.settings.max_inputs_per_request)
        validation.check_sparse(params)
        texts = list(params.inputs)
        lane = self.lane(params.priority, call, len(texts))
        ticket = await self._reserve(model, len(texts), model.tokenizer.estimate(texts), lane)
        tokenized, tokenize_s = await self._tokenize(model, ticket, texts, params.truncate)
        rows, job = await self._run(model, tokenized, call, lane, ticket)
        vectors = [results.select_terms(row, params, model.tokenizer) for row in rows]
        return self._answered(
            SparseResult(
                vectors=vectors,
                model=model.id,
                usage=results.usage(tokenized),
                timing=results.timing(arrived, tokenize_s, job),
            )
        )

    async def rerank(self, params: RerankParams, call: Call = NO_CALL) -> RerankResult:
        """Scores documents against the query with a cross-encoder, or by cosine similarity
        with a dense model; returns them highest first."""
        arrived = time.monotonic()
        model = self._find(params.model, Capability.RERANK)
        validation.check_rerank(params, self.settings.max_inputs_per_request)
        lane = self.lane(params.priority, call, len(params.documents))
        if is_kind(model, RERANK):
            estimate = model.tokenizer.estimate(params.documents, params.query)
            ticket = await self._reserve(model, len(params.documents), estimate, lane)
            tokenized, tokenize_s = await self._tokenize(
                model, ticket, params.documents, params.truncate, params.query, "documents[{}]".format
            )
            logits, job = await self._run(model, tokenized, call, lane, ticket)
            scores = results.cross_encoder_scores(logits, params.raw_scores)
            usage, timing = results.usage(tokenized), results.timing(arrived, tokenize_s, job)
        else:  # bi-encoder: cosine between the query's vector and each document's
            query_prompt, document_prompt = validation.document_prompts(model.config)
            texts = [query_prompt + params.query, *(document_prompt + d for d in params.documents)]
            dense = await self._dense(
                model,
                texts,
                params.truncate,
                call,
                lane,
                name=lambda i: "the query" if i == 0 else f"documents[{i - 1}]",
            )
            scores = results.cosine_scores(dense.rows)
            usage, timing = dense.usage, results.timing(arrived, dense.tokenize_s, dense.job, dense.cached)
        return self._answered(
            RerankResult(results=results.ranking(scores, params), model=model.id, usage=usage, timing=timing)
        )

    # -- steps -------------------------------------------------------------------------

    def _find(self, name: str, capability: Capability) -> ServedModel[Any]:
        """The served model a request names (`Registry.find`), reported to the observer."""
        model = self.registry.find(name, capability)
        if self.observer is not None:
            self.observer.resolved(model.id)
        return model

    def _answered(self, result: AnyResult) -> AnyResult:
        if self.observer is not None:
            self.observer.answered(result)
        return result

    async def _dense(
        self,
        model: ServedModel[Any],
        texts: list[str],
        truncate: bool,
        call: Call,
        lane: Priority,
        wait: bool = False,
        name: Callable[[int], str] = "inputs[{}]".format,
        share: bool = True,
    ) -> Dense:
        """The pooled vector of every text (as the model reads it, prompt included): those the
        vector cache holds from it, those another request computes now (with `share`), the
        others tokenized and computed, each distinct text once, then cached. Only those take
        room in the queue; a request the cache answers whole takes none, and is never refused
        for want of it."""
        in_flight = self._in_flight if share else None
        plan = Plan(self.vectors, self._identities[model.id], texts, truncate, in_flight, lane is Priority.INTERACTIVE)
        computed: list[FloatArray] = []
        tokenized: Tokenized | None = None
        tokenize_s, job = 0.0, None
        if plan.todo:
            claimed = self._in_flight.claim(plan.keys, lane is Priority.INTERACTIVE) if self.vectors.enabled else []
            entries: list[Cached] | None = None
            try:
                ticket = await self._reserve(model, len(plan.todo), model.tokenizer.estimate(plan.todo), lane, wait)
                tokenized, tokenize_s = await self._tokenize(
                    model, ticket, plan.todo, truncate, name=lambda j: name(plan.first[j])
                )
                computed, job = await self._run(model, tokenized, call, lane, ticket)
                if self.vectors.enabled:
                    cut = set(tokenized.truncated)
                    entries = [
                        self.vectors.put(key, computed[j], tokenized.lengths[j], j in cut)
                        for j, key in enumerate(plan.keys)
                    ]
            finally:
                if claimed:
                    self._in_flight.settle(plan.keys, claimed, entries)
        redo = await self._awaited(plan, truncate)
        self._count_cached(model.id, plan.cached - len(redo), len(plan.todo))
        lengths, cut_positions = (tokenized.lengths, tokenized.truncated) if tokenized is not None else ([], [])
        usage = Usage(*plan.tokens(lengths, cut_positions))
        if not redo:
            return Dense(plan.rows(computed), usage, tokenize_s, job, plan.cached)
        # The requests computing these failed or went away first (or cut a text this request
        # may not have cut): computed here after all, as if they had never been shared.
        again = await self._dense(
            model, [texts[i] for i in redo], truncate, call, lane, wait, lambda j: name(redo[j]), False
        )
        rows = plan.rows(computed, dict(zip(redo, again.rows, strict=True)))
        usage = Usage(
            usage.prompt_tokens + again.usage.prompt_tokens, usage.truncated_inputs + again.usage.truncated_inputs
        )
        return Dense(rows, usage, tokenize_s + again.tokenize_s, job or again.job, plan.cached - len(redo))

    @staticmethod
    async def _awaited(plan: Plan, truncate: bool) -> list[int]:
        """Waits for the inputs of `plan` that other requests compute (never cancelling their
        work when this request goes away) and takes their entries; the positions it could not
        take an entry for, to compute."""
        if not plan.awaited:
            return []
        await asyncio.wait(set(plan.awaited.values()))
        redo = []
        for position, future in list(plan.awaited.items()):
            entry = None if future.cancelled() else future.result()
            if entry is None or (entry.truncated and not truncate):
                redo.append(position)
            else:
                plan.resolve(position, entry)
        return redo

    def _count_cached(self, model: str, hits: int, misses: int) -> None:
        self.vectors.hits[model] += hits
        self.vectors.misses[model] += misses

    @staticmethod
    async def _reserve(model: ServedModel[Any], inputs: int, tokens: int, lane: Priority, wait: bool = False) -> Ticket:
        """Holds room in the model's queue for a request, before it is tokenized: a full queue
        refuses a unary request at once (OverloadedError) and makes a stream's wait."""
        if wait:
            return await model.scheduler.reserve(inputs, tokens, lane)
        return model.scheduler.reserve_nowait(inputs, tokens, lane)

    async def _tokenize(
        self,
        model: ServedModel[Any],
        ticket: Ticket,
        texts: list[str],
        truncate: bool,
        query: str | None = None,
        name: Callable[[int], str] = "inputs[{}]".format,
    ) -> tuple[Tokenized, float]:
        """Tokenizes texts (or query/text pairs) off the event loop; with truncate=False an
        input over the model's max tokens fails the request, naming it (`name(position)`) and
        both lengths. A request that fails here, or whose caller goes away, gives its ticket's
        room back."""
        try:
            return await self._tokenized(model, texts, truncate, query, name)
        except BaseException:
            model.scheduler.release(ticket)
            raise

    async def _tokenized(
        self,
        model: ServedModel[Any],
        texts: list[str],
        truncate: bool,
        query: str | None,
        name: Callable[[int], str],
    ) -> tuple[Tokenized, float]:
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

    @staticmethod
    async def _run(
        model: ServedModel[R], tokenized: Tokenized, call: Call, lane: Priority, ticket: Ticket
    ) -> tuple[list[R], Job[Tokens, R]]:
        """Queues the inputs on the model's scheduler, in the room `ticket` holds, and awaits one
        result per input."""
        job: Job[Tokens, R] = Job(tokenized.encoded, tokenized.lengths, call.deadline, lane, call.tenant, call)
        model.scheduler.admit(job, ticket)
        try:
            rows = await asyncio.shield(job.future)
        except asyncio.CancelledError:
            model.scheduler.cancel(job)
            raise
        return rows, job
