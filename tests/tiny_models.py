"""Tiny BERT models built on the fly (fixed seed, real BERT uncased tokenizer) for sparse and rerank tests.

They are random-initialized, so their outputs mean nothing, but they are small (~1 M parameters,
mostly the 30522-token embedding), deterministic, and run through exactly the code paths a real
SPLADE masked-LM or cross-encoder does.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from embedserve.models import bundled_path

# Files of a BERT uncased WordPiece tokenizer; the bundled MiniLM carries them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_DENSE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _tiny_config(**extra: object) -> Any:
    from transformers import BertConfig

    return BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        # 10x BERT's 0.02: at 0.02 a 2-layer model attends almost uniformly and a cross-encoder
        # scores every pair the same to 3 decimals; at 0.2 scores and term weights vary per input.
        initializer_range=0.2,
        **extra,
    )


def _copy_tokenizer(path: Path) -> None:
    source = bundled_path(_DENSE_MODEL)
    if source is None:
        raise RuntimeError(f"the bundled {_DENSE_MODEL} is not installed; it carries the tokenizer the tiny models use")
    for name in _TOKENIZER_FILES:
        shutil.copyfile(source / name, path / name)


def build_tiny_masked_lm(path: Path) -> Path:
    """Saves a tiny random BertForMaskedLM (a SPLADE-shaped model) with a real tokenizer into path."""
    import torch
    from transformers import BertForMaskedLM

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model: Any = BertForMaskedLM(_tiny_config())  # type: ignore[no-untyped-call]
    model.eval().save_pretrained(str(path))
    _copy_tokenizer(path)
    return path


def build_tiny_cross_encoder(path: Path) -> Path:
    """Saves a tiny random BertForSequenceClassification with one label (a cross-encoder) into path."""
    import torch
    from transformers import BertForSequenceClassification

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model: Any = BertForSequenceClassification(_tiny_config(num_labels=1))  # type: ignore[no-untyped-call]
    model.eval().save_pretrained(str(path))
    _copy_tokenizer(path)
    return path
