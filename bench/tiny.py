"""Tiny seeded BERT models with MiniLM's real tokenizer, built on the fly: a dense
sentence-transformers model for bench.ceiling, and the cross-encoder and masked-LM the tests use.

They are random-initialized (torch.manual_seed(0)), so their outputs mean nothing, but they are
small, deterministic, and run through exactly the code paths a real model of their kind does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from embedserve.models import bundled_path

# Files of a BERT uncased WordPiece tokenizer; the bundled MiniLM carries them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
DENSE_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
# bench.ceiling's model, under --cache-dir, by hidden size; bump the suffix when the recipe changes.
TINY_DENSE_FOLDER = "bench-models/tiny-minilm-dense-h{}-v1"
# all-MiniLM-L6-v2's sentence_bert_config.json.
TINY_DENSE_MAX_TOKENS = 256


def tiny_config(hidden_size: int = 32, intermediate_size: int = 64, **extra: object) -> Any:
    """A 2-layer, 2-head BertConfig with BERT uncased's vocabulary."""
    from transformers import BertConfig

    return BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        # 10x BERT's 0.02: at 0.02 a 2-layer model attends almost uniformly and a cross-encoder
        # scores every pair the same to 3 decimals; at 0.2 scores and term weights vary per input.
        initializer_range=0.2,
        **extra,
    )


def copy_tokenizer(path: Path) -> None:
    """Copies the bundled MiniLM's tokenizer files into path."""
    source = bundled_path(DENSE_SOURCE)
    if source is None:
        raise RuntimeError(f"the bundled {DENSE_SOURCE} is not installed; it carries the tokenizer the tiny models use")
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, path / name)


def _save(model_class: str, path: Path, config: Any) -> None:
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model: Any = getattr(transformers, model_class)(config)
    model.eval().save_pretrained(str(path))
    copy_tokenizer(path)


def build_tiny_masked_lm(path: Path) -> Path:
    """Saves a tiny random BertForMaskedLM (a SPLADE-shaped model) with a real tokenizer into path."""
    _save("BertForMaskedLM", path, tiny_config())
    return path


def build_tiny_cross_encoder(path: Path) -> Path:
    """Saves a tiny random BertForSequenceClassification with one label (a cross-encoder) into path."""
    _save("BertForSequenceClassification", path, tiny_config(num_labels=1))
    return path


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_tiny_dense(path: Path, hidden_size: int = 128) -> Path:
    """Saves a tiny random sentence-transformers model shaped like all-MiniLM-L6-v2 but cheaper:
    BertModel with 2 layers, `hidden_size` (128), 2 heads, intermediate 4x hidden; mean pooling,
    then Normalize; max_seq_length 256; MiniLM's tokenizer."""
    _save("BertModel", path, tiny_config(hidden_size=hidden_size, intermediate_size=4 * hidden_size))
    st = "sentence_transformers.models."
    _write_json(
        path / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"},
        ],
    )
    _write_json(
        path / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    (path / "2_Normalize").mkdir(exist_ok=True)
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": TINY_DENSE_MAX_TOKENS, "do_lower_case": False})
    return path


def cached_tiny_dense(cache_dir: Path, hidden_size: int = 128) -> Path:
    """bench.ceiling's tiny dense model under cache_dir, built the first time (atomically: a
    half-built folder is never seen)."""
    target = cache_dir / TINY_DENSE_FOLDER.format(hidden_size)
    if (target / "modules.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        build_tiny_dense(work, hidden_size)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
