"""Reads what a model's own files say about how to run it (HF + sentence-transformers config)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from embedserve.errors import ConfigError
from embedserve.kinds import ModelKind

Pooling = Literal["mean", "cls", "lasttoken", "max"]


@dataclass(frozen=True)
class ModelConfig:
    """How a model is meant to be used, as its authors configured it."""

    path: Path
    kind: ModelKind
    hidden_size: int
    vocab_size: int
    max_input_tokens: int
    pooling: Pooling = "mean"
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    num_labels: int = 1


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _pooling_from(config: dict[str, Any]) -> Pooling:
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_lasttoken"):
        return "lasttoken"
    if config.get("pooling_mode_max_tokens"):
        return "max"
    if config.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ConfigError(f"unsupported pooling configuration: {config}")


# model_type in config_sentence_transformers.json (sentence-transformers >= 5) -> kind
_ST_MODEL_TYPES: dict[str, ModelKind] = {
    "SentenceTransformer": ModelKind.DENSE,
    "SparseEncoder": ModelKind.SPARSE,
    "CrossEncoder": ModelKind.RERANK,
}


def detect_kind(architectures: tuple[str, ...], has_st_modules: bool, st_model_type: str | None = None) -> ModelKind:
    """Tells dense, sparse (masked-LM) and rerank (sequence classification) models apart."""
    if st_model_type in _ST_MODEL_TYPES:
        return _ST_MODEL_TYPES[st_model_type]
    if has_st_modules:
        return ModelKind.DENSE
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return ModelKind.RERANK
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return ModelKind.SPARSE
    return ModelKind.DENSE


def load_model_config(path: Path, kind: ModelKind | None = None) -> ModelConfig:
    """Reads config.json and any sentence-transformers files beside it; `kind` None detects it."""
    hf = _read_json(path / "config.json")
    architectures = tuple(hf.get("architectures") or ())
    modules_file = path / "modules.json"
    modules: list[dict[str, Any]] = []
    if modules_file.is_file():
        try:
            loaded = json.loads(modules_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {modules_file}: {exc}") from None
        modules = [m for m in loaded if isinstance(m, dict)] if isinstance(loaded, list) else []
    st_model_config = path / "config_sentence_transformers.json"
    st_data = _read_json(st_model_config) if st_model_config.is_file() else {}
    st_type = st_data.get("model_type")
    if kind is None:
        resolved = detect_kind(architectures, bool(modules), st_type if isinstance(st_type, str) else None)
    else:
        resolved = kind

    pooling: Pooling = "cls" if resolved is ModelKind.RERANK else "mean"
    normalize = False
    for module in modules:
        mtype = str(module.get("type", ""))
        if mtype.endswith("Pooling"):
            pooling_file = path / str(module.get("path", "")) / "config.json"
            if pooling_file.is_file():
                pooling = _pooling_from(_read_json(pooling_file))
        elif mtype.endswith("Normalize"):
            normalize = True

    position_limit = int(hf.get("max_position_embeddings") or 512)
    # Some architectures (RoBERTa) reserve position slots for padding offsets.
    if hf.get("model_type") in {"roberta", "xlm-roberta", "camembert"}:
        position_limit -= 2
    max_tokens = position_limit
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = min(max_tokens, int(_read_json(st_config).get("max_seq_length") or max_tokens))
    else:
        tok_config = path / "tokenizer_config.json"
        if tok_config.is_file():
            limit = _read_json(tok_config).get("model_max_length")
            if isinstance(limit, int) and 0 < limit < max_tokens:
                max_tokens = limit

    prompts = {str(k): str(v) for k, v in (st_data.get("prompts") or {}).items()}
    default_prompt_name = st_data.get("default_prompt_name") or None

    return ModelConfig(
        path=path,
        kind=resolved,
        hidden_size=int(hf.get("hidden_size") or hf.get("d_model") or 0),
        vocab_size=int(hf.get("vocab_size") or 0),
        max_input_tokens=max_tokens,
        pooling=pooling,
        normalize=normalize,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        num_labels=int(hf.get("num_labels") or len(hf.get("id2label") or {0: 0})),
    )


def load_fast_tokenizer(path: Path) -> tuple[Tokenizer, int]:
    """The model's fast tokenizer and its padding id. From its tokenizer.json with the `tokenizers`
    library alone when it has one: importing transformers for it (which imports torch) held
    ~370 MB of the server's memory for nothing. Else transformers converts the model's slow
    tokenizer files."""
    file = path / "tokenizer.json"
    if not file.is_file():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), use_fast=True)  # type: ignore[no-untyped-call]
        return hf.backend_tokenizer, int(hf.pad_token_id or 0)
    tokenizer = Tokenizer.from_file(str(file))
    pad = _special_token(path, "pad_token")
    pad_id = tokenizer.token_to_id(pad) if pad else None
    return tokenizer, int(pad_id or 0)


def _special_token(path: Path, name: str) -> str | None:
    """A special token (`pad_token`, ...) as tokenizer_config.json or special_tokens_map.json
    names it: text, or {"content": text}."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((path / file).read_text()).get(name)
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None
