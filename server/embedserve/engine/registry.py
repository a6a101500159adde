"""The served models: loading them at startup, finding the one a request names."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar

from embedserve.backends import Backend, expects_cuda, load_backend
from embedserve.backends.config import ModelConfig, load_model_config
from embedserve.engine.calibration import cached_measurement, model_files
from embedserve.engine.cost import BatchCost, calibrate, warm_up
from embedserve.engine.kinds import DENSE, KINDS, SPARSE, KindSpec, serving
from embedserve.engine.scheduler import BatchLimits, Lanes, Scheduler
from embedserve.engine.threads import lower_new_threads
from embedserve.engine.tokenizer import TextTokenizer, Tokens
from embedserve.engine.types import ModelDescription
from embedserve.errors import ConfigError, ModelNotFoundError, Words, WrongModelKindError, quoted
from embedserve.kinds import Capability, ModelKind
from embedserve.models import resolve_model_path
from embedserve.settings import ModelSettings, Settings

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass
class ServedModel(Generic[R]):
    """One loaded model with its tokenizer, backend and scheduler; each input becomes an `R`."""

    id: str
    spec: KindSpec[R]
    config: ModelConfig
    tokenizer: TextTokenizer
    backend: Backend
    scheduler: Scheduler[Tokens, R]
    batch_size: int
    loaded_at: float  # Unix time the model finished loading

    @property
    def kind(self) -> ModelKind:
        """What the model computes."""
        return self.spec.kind

    def describe(self) -> ModelDescription:
        """What ListModels reports."""
        info = self.backend.info
        return ModelDescription(
            id=self.id,
            kind=self.kind,
            capabilities=self.spec.capabilities,
            dimension=self.config.hidden_size if self.spec is DENSE else 0,
            vocab_size=self.config.vocab_size if self.spec is SPARSE else 0,
            max_input_tokens=self.config.max_input_tokens,
            backend=info.name,
            provider=info.provider,
            dtype=info.dtype,
            normalize=self.config.normalize,
            max_batch_size=self.batch_size,
            prompts=dict(self.config.prompts),
            default_prompt_name=self.config.default_prompt_name or "",
            loaded_at=int(self.loaded_at),
            pooling=self.config.pooling if self.spec is DENSE else "",
            max_batch_tokens=self.scheduler.limits.max_batch_tokens,
            queued=self.scheduler.queued,
        )


def is_kind(model: ServedModel[Any], spec: KindSpec[R]) -> TypeGuard[ServedModel[R]]:
    """True when the model is of `spec`'s kind; narrows its result type."""
    return model.spec is spec


class Registry:
    """Every served model, in configuration order."""

    def __init__(self, models: Sequence[ServedModel[Any]]) -> None:
        self._models = {m.id: m for m in models}

    @classmethod
    def load(cls, settings: Settings) -> Registry:
        """Loads every configured model; raises ConfigError saying what to change."""
        return cls([load_served_model(model, settings) for model in settings.models])

    def __iter__(self) -> Iterator[ServedModel[Any]]:
        return iter(self._models.values())

    def describe(self) -> list[ModelDescription]:
        """Every served model, in configuration order."""
        return [m.describe() for m in self._models.values()]

    def find(self, name: str, capability: Capability) -> ServedModel[Any]:
        """The model a request names; empty picks the first served model of the kind that suits
        the capability best (for rerank: a cross-encoder, else a dense model)."""
        kinds = serving(capability)
        if not name:
            for spec in kinds:
                for candidate in self._models.values():
                    if candidate.spec is spec:
                        return candidate
            wanted = " or ".join(spec.kind.value for spec in kinds)
            served = self._served()

            def no_default(say: Words) -> str:
                return (
                    f"no {wanted} model is served, so {say(capability)[0]} needs one in MODEL_NAMES; served: {served}"
                )

            raise ModelNotFoundError(no_default)
        model = self._named(name)
        if model.spec not in kinds:
            offered = model.spec.capabilities

            def wrong_kind(say: Words) -> str:
                answers = ", ".join(word for c in offered for word in say(c))
                kind = model.kind.value
                return f"model {quoted(name)} is a {kind} model and answers {answers}, not {say(capability)[0]}"

            raise WrongModelKindError(wrong_kind)
        return model

    def describe_model(self, name: str, capability: Capability | None = None) -> ModelDescription:
        """The model `name` names, of any kind, or with `capability` the one `find` picks."""
        return (self._named(name) if capability is None else self.find(name, capability)).describe()

    def _named(self, name: str) -> ServedModel[Any]:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model {quoted(name)} is not served; served models: {self._served()}")
        return model

    def _served(self) -> str:
        return ", ".join(f"{m.id} ({m.kind.value})" for m in self._models.values())

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Calls `callback` when any model's worker crashes (to flip health)."""
        for model in self._models.values():
            model.scheduler.on_failure = callback


def load_served_model(wanted: ModelSettings, settings: Settings) -> ServedModel[Any]:
    """Loads one model's config, tokenizer and backend, logging what was loaded and how long it took."""
    started = time.monotonic()
    path = resolve_model_path(wanted.name)
    config = load_model_config(path, wanted.kind)
    expected_cuda = expects_cuda(wanted.backend)
    batch_tokens = max_batch_tokens(settings, expected_cuda)
    if config.max_input_tokens > batch_tokens:
        raise ConfigError(
            f"model {wanted.name} takes inputs of up to {config.max_input_tokens} tokens but MAX_BATCH_TOKENS is "
            f"{batch_tokens}: raise --max-batch-tokens to at least {config.max_input_tokens}"
        )
    if config.kind is ModelKind.RERANK and config.num_labels != 1:
        raise ConfigError(
            f"model {wanted.name} is a sequence classifier with {config.num_labels} labels; rerank needs a "
            f"cross-encoder with one relevance label (num_labels=1)"
        )
    kind = KINDS[config.kind]
    tokenizer = TextTokenizer(path, config.max_input_tokens)
    # Threads are set when the backend loads; were CUDA expected and did not start, the CPU
    # runs one worker on every core (the backend logs why), and the lanes follow what it got.
    workers, threads = forward_threads(settings, expected_cuda, cpu_cores())
    with lower_new_threads(settings.worker_niceness):  # ONNX Runtime's intra-op pool, where it starts one
        backend = load_backend(config, kind.graph, wanted.backend, wanted.dtype, settings.cache_dir, threads)
    model_lanes = lanes(settings, backend.info.on_cuda)
    cost = BatchCost()
    calibrating = time.monotonic()
    identity = {
        "model": wanted.name,
        "path": str(path),
        "files": model_files(path),
        "graph": repr(kind.graph),
        "backend": [backend.info.name, backend.info.provider, backend.info.dtype, backend.info.artifact],
        "threads": threads,
        "limits": [wanted.batch_size, config.max_input_tokens, batch_tokens],
    }
    measured, kept_in = cached_measurement(
        settings.cache_dir,
        identity,
        lambda: calibrate(backend, wanted.batch_size, config.max_input_tokens, batch_tokens),
    )
    if kept_in is not None:
        warm_up(backend)
    cost.calibrate(measured)
    limits = BatchLimits(
        max_batch_size=wanted.batch_size,
        max_batch_tokens=batch_tokens,
        batch_overhead_tokens=cost.overhead_tokens() or backend.info.batch_overhead_tokens,
    )
    log.info(
        "model %s: forward pass costs %s (%s; overhead %d token-equivalents per batch)",
        wanted.name,
        cost.describe(),
        f"measured at an earlier start on this machine, kept in {kept_in}; remove it to measure again"
        if kept_in is not None
        else f"measured in {time.monotonic() - calibrating:.1f} s",
        limits.batch_overhead_tokens,
    )
    rate = throughput(cost, limits, config.max_input_tokens, workers)
    scheduler = Scheduler(
        wanted.name,
        kind.runner(tokenizer, backend, config),
        limits,
        settings.queue_size,
        workers=workers,
        lanes=model_lanes,
        cost=cost,
        tokens_per_s=rate or None,
        queue_seconds=settings.queue_seconds or None,
        niceness=settings.worker_niceness,
    )
    log.info(
        "model %s: each lane queues at most %d inputs and %s",
        wanted.name,
        settings.queue_size,
        f"{scheduler.queue_tokens} tokens (~{settings.queue_seconds:g} s of work at the {rate:.0f} tokens/s measured "
        "at startup; it follows the bulk throughput served since)"
        if scheduler.queue_tokens
        else "no limit in tokens",
    )
    log.info(
        "model %s: %d bulk forward worker(s) x %d intra-op thread(s) at nice +%d; interactive batches %s",
        wanted.name,
        workers,
        threads,
        settings.worker_niceness,
        "on a thread of their own, alongside bulk ones"
        if model_lanes.alongside
        else f"first, bulk batches cut to {settings.bulk_batch_ms:g} ms while they arrive",
    )
    info = backend.info
    log.info(
        "loaded model %s (%s, %s, max %d tokens) from %s: backend %s, provider %s, dtype %s, batch %d inputs / %d "
        "tokens, in %.1f s",
        wanted.name,
        config.kind.value,
        kind.summary(config),
        config.max_input_tokens,
        path,
        info.name,
        info.provider,
        info.dtype,
        wanted.batch_size,
        batch_tokens,
        time.monotonic() - started,
    )
    return ServedModel(wanted.name, kind, config, tokenizer, backend, scheduler, wanted.batch_size, time.time())


def cpu_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def forward_threads(settings: Settings, on_cuda: bool, cores: int) -> tuple[int, int]:
    """(bulk forward workers, intra-op threads of each forward pass). On CPU two single-threaded
    forward passes at once beat one on both cores: measured on 2 cores, bulk alone ran 1.01-1.11x
    the one-worker server's, and ten queries a second beside it cost it 4-5% instead of 17-25%
    (docs/benchmarks.md). On CUDA one stream runs one batch at a time."""
    workers = settings.forward_workers or (1 if on_cuda else 2)
    return workers, settings.intra_op_threads or max(1, cores // workers)


def throughput(cost: BatchCost, limits: BatchLimits, max_tokens: int, workers: int) -> float:
    """Tokens a second the model's bulk workers get through on full batches of 128-token inputs
    (shorter if the model takes fewer), by the forward-pass costs measured at startup; 0 unknown."""
    length = min(128, max_tokens)
    count = max(1, min(limits.max_batch_size, limits.max_batch_tokens // length))
    seconds = cost.seconds(count, length)
    return workers * count * length / seconds if seconds > 0 else 0.0


def max_batch_tokens(settings: Settings, on_cuda: bool) -> int:
    """Padded tokens of one forward pass. On CPU 4,096: the activations of a pass grow with its
    tokens (attention with tokens x length), and on 2 cores 32 x 256-token MiniLM batches held
    ~1.6 GB under the worst legal requests at once where 16 x 256 held 1.3 GB, in the same time
    (111 s for 2,048 x 30 KB `Embed` beside a 2,048-document `Rerank`). On CUDA 16,384, as TEI."""
    return settings.max_batch_tokens or (16384 if on_cuda else 4096)


def lanes(settings: Settings, on_cuda: bool) -> Lanes:
    """How interactive and bulk work share each model."""
    alongside = settings.interactive_worker == "on" or (settings.interactive_worker == "auto" and not on_cuda)
    return Lanes(
        bulk_batch_s=settings.bulk_batch_ms / 1e3 if settings.bulk_batch_ms > 0 else None,
        hold_s=settings.interactive_hold,
        bulk_min_share=settings.bulk_min_share,
        alongside=alongside,
    )
