"""The tokenizer loads from tokenizer.json with the `tokenizers` library alone, and tokenizes
exactly as transformers' fast tokenizer of the same model does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embedserve.backends.config import load_fast_tokenizer
from embedserve.engine.tokenizer import TextTokenizer
from embedserve.models import resolve_model_path
from embedserve.settings import DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL

TEXTS = [
    "Hello, World!",
    "ÀÉÎÕÜ accents and CAPITALS",
    "日本語のテキストと中文",
    "emoji 🙂 and symbols ©®™ and tabs\tand\nnewlines",
    "don't split-words weirdly... 3.14159 $100",
    "a " * 400,
    "",
]


@pytest.mark.parametrize("name", [DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL])
def test_same_ids_and_padding_as_transformers(name: str) -> None:
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    ours, pad_id = load_fast_tokenizer(path)
    ours.no_padding()  # as TextTokenizer sets it (MiniLM's file pads to 128); transformers too
    ours.no_truncation()
    theirs = AutoTokenizer.from_pretrained(str(path), use_fast=True)  # type: ignore[no-untyped-call]
    assert pad_id == theirs.pad_token_id
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.encode(text, "a second text").ids == theirs(text, "a second text")["input_ids"], text


def test_loading_the_tokenizer_imports_neither_transformers_nor_torch() -> None:
    code = (
        "import sys\n"
        "from embedserve.engine.tokenizer import TextTokenizer\n"
        "from embedserve.models import resolve_model_path\n"
        f"TextTokenizer(resolve_model_path({DEFAULT_DENSE_MODEL!r}), 256).encode(['x'])\n"
        "print(sorted({'transformers', 'torch'} & set(sys.modules)))\n"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"
    assert TextTokenizer(resolve_model_path(DEFAULT_DENSE_MODEL), 256).pad_id == 0


def _long_texts() -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while embeddings hum".split()
    prose = " ".join(words[i % len(words)] for i in range(9000))
    return [
        prose,  # ~60 KB of ordinary words
        "日本語の長い文章です。" * 3000,  # no spaces, a token per character
        "x" * 40_000,  # one enormous word (one [UNK] for BERT)
        " " * 30_000 + prose[:5000],  # white space first: the cut keeps too few tokens
        ("supercalifragilistic" * 30 + " ") * 200,  # 600-character words
        "a\n\tb\r" * 8000,
    ]


@pytest.mark.parametrize("name", [DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL])
def test_long_texts_are_cut_before_tokenizing_to_exactly_what_the_whole_text_gives(name: str) -> None:
    tokenizer = TextTokenizer(resolve_model_path(name), 256)
    whole, _ = load_fast_tokenizer(resolve_model_path(name))
    whole.no_padding()
    whole.enable_truncation(max_length=256)
    texts = _long_texts()
    tokenized = tokenizer.encode(texts)
    assert tokenized.truncated == [i for i, text in enumerate(texts) if whole.encode(text).overflowing]
    assert len(tokenized.truncated) >= 3
    for text, encoding in zip(texts, tokenized.encoded, strict=True):
        assert encoding.ids.tolist() == whole.encode(text).ids
        assert encoding.type_ids.tolist() == whole.encode(text).type_ids
    pairs = tokenizer.encode_pairs("a query", texts)
    whole.enable_truncation(max_length=256, strategy="only_second")
    for text, encoding in zip(texts, pairs.encoded, strict=True):
        assert encoding.ids.tolist() == whole.encode("a query", text).ids
        assert encoding.type_ids.tolist() == whole.encode("a query", text).type_ids
