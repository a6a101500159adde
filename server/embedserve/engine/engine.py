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
    EmbedParams,
    EmbedResult,
    Kind,
    ModelDescription,
    Timing,
    Usage,
)
from embedserve.errors import ConfigError, InvalidInputError, ModelNotFoundError, WrongModelKindError
from embedserve.models import resolve_model_path
from embedserve.settings import ModelSettings, Settings

log = logging.getLogger(__name__)

Vector = np.ndarray


@dataclass
class ServedModel:
    """One loaded model with its tokenizer, backend and scheduler."""

    id: str
    config: ModelConfig
    tokenizer: TextTokenizer
    backend: Backend
    scheduler: Scheduler[Encoding, Vector]
    batch_size: int

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
        )


def _dense_runner(
    tokenizer: TextTokenizer, backend: Backend, config: ModelConfig
) -> Callable[[list[Encoding]], Sequence[Vector]]:
    def run(encodings: list[Encoding]) -> Sequence[Vector]:
        ids, mask, types = tokenizer.collate(encodings)
        hidden = backend.forward(ids, mask, types)
        return list(pool(hidden, mask, config.pooling))

    return run


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

    def model(self, name: str, kind: Kind, rpc: str) -> ServedModel:
        """Finds the model a request names (empty = the first model of that kind)."""
        if not name:
            for model_id in self._order:
                if self._models[model_id].kind is kind:
                    return self._models[model_id]
            raise ModelNotFoundError(
                f"no {kind.value} model is served, so {rpc} needs one in MODEL_NAMES; served: {self._served()}"
            )
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model {name!r} is not served; served models: {self._served()}")
        if model.kind is not kind:
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

    async def _tokenize(self, model: ServedModel, texts: list[str], truncate: bool) -> tuple[Tokenized, float]:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        tokenized = await loop.run_in_executor(self._tokenize_pool, model.tokenizer.encode, texts)
        if tokenized.truncated and not truncate:
            first = tokenized.truncated[0]
            length = await loop.run_in_executor(self._tokenize_pool, model.tokenizer.full_length, texts[first])
            raise InvalidInputError(
                f"inputs[{first}] has {length} tokens but model {model.id} accepts at most "
                f"{model.tokenizer.max_tokens}: shorten it or set truncate=true "
                f"({len(tokenized.truncated)} input(s) too long)"
            )
        return tokenized, time.monotonic() - started

    async def _run(
        self, model: ServedModel, tokenized: Tokenized, deadline: float | None, wait: bool
    ) -> tuple[list[Vector], Job[Encoding, Vector]]:
        job: Job[Encoding, Vector] = Job(tokenized.encodings, tokenized.lengths, deadline)
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
        model = self.model(params.model, Kind.DENSE, "Embed")
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
        vectors = np.stack(rows)
        if params.dimensions is not None:
            vectors = vectors[:, : params.dimensions]
        if model.config.normalize if params.normalize is None else params.normalize:
            vectors = normalize(vectors)
        done = time.monotonic()
        return EmbedResult(
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            model=model.id,
            usage=Usage(prompt_tokens=tokenized.tokens, truncated_inputs=len(tokenized.truncated)),
            timing=Timing(
                queue_ms=(job.last_batch_started_at - job.admitted_at) * 1e3,
                tokenize_ms=tokenize_s * 1e3,
                inference_ms=job.inference_s * 1e3,
                total_ms=(done - arrived) * 1e3,
            ),
        )

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


def load_served_model(spec: ModelSettings, settings: Settings) -> ServedModel:
    """Loads one model's config, tokenizer and backend, logging what was loaded and how long it took."""
    started = time.monotonic()
    path = resolve_model_path(spec.name)
    config = load_model_config(path, spec.kind)
    if config.kind != "dense":
        raise ConfigError(f"model {spec.name} is a {config.kind} model; only dense models are served so far")
    if config.max_input_tokens > settings.max_batch_tokens:
        raise ConfigError(
            f"model {spec.name} takes inputs of up to {config.max_input_tokens} tokens but MAX_BATCH_TOKENS is "
            f"{settings.max_batch_tokens}: raise --max-batch-tokens to at least {config.max_input_tokens}"
        )
    tokenizer = TextTokenizer(path, config.max_input_tokens)
    backend = load_backend(config, spec.backend, spec.dtype, settings.cache_dir, settings.intra_op_threads)
    limits = BatchLimits(
        max_batch_size=spec.batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        padded=backend.info.padded,
        batch_overhead_tokens=backend.info.batch_overhead_tokens,
    )
    scheduler: Scheduler[Encoding, Vector] = Scheduler(
        spec.name, _dense_runner(tokenizer, backend, config), limits, settings.queue_size
    )
    info = backend.info
    log.info(
        "loaded model %s (%s, %d-d, max %d tokens, pooling %s%s) from %s: "
        "backend %s, provider %s, dtype %s, batch %d, in %.1f s",
        spec.name,
        config.kind,
        config.hidden_size,
        config.max_input_tokens,
        config.pooling,
        ", normalized" if config.normalize else "",
        path,
        info.name,
        info.provider,
        info.dtype,
        spec.batch_size,
        time.monotonic() - started,
    )
    return ServedModel(spec.name, config, tokenizer, backend, scheduler, spec.batch_size)
