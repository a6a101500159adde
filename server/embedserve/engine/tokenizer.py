"""Tokenization with exact token counts and truncation that matches sentence-transformers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from embedserve.backends.base import IntArray
from embedserve.errors import InvalidInputError


@dataclass(frozen=True)
class Tokenized:
    """Encodings of a batch of texts and what truncation did to them."""

    encodings: list[Encoding]
    lengths: list[int]
    truncated: list[int]  # positions of inputs that were cut to the model's max

    @property
    def tokens(self) -> int:
        """Tokens over all inputs, special tokens included."""
        return sum(self.lengths)


class TextTokenizer:
    """A fast (Rust) tokenizer that truncates to the model's max input tokens."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), use_fast=True)  # type: ignore[no-untyped-call]
        backend: Tokenizer = hf.backend_tokenizer
        self.max_tokens = max_tokens
        self.pad_id = int(hf.pad_token_id or 0)
        self._truncating = copy.deepcopy(backend)
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_tokens)
        # Query/document pairs are cut on the document side only, never the query.
        self._pairs = copy.deepcopy(backend)
        self._pairs.no_padding()
        self._pairs.enable_truncation(max_length=max_tokens, strategy="only_second")
        self._full = copy.deepcopy(backend)
        self._full.no_padding()
        self._full.no_truncation()

    def encode(self, texts: list[str]) -> Tokenized:
        """Tokenizes texts, cutting any longer than max_tokens. Releases the GIL while it works."""
        # The fast variant skips the character offsets, which nothing here reads (~15% less CPU).
        return self._tokenized(self._truncating.encode_batch_fast(texts))

    def encode_pairs(self, query: str, documents: list[str]) -> Tokenized:
        """Tokenizes (query, document) pairs, cutting documents so each pair fits max_tokens."""
        try:
            encodings = self._pairs.encode_batch_fast([(query, document) for document in documents])
        except Exception as exc:  # tokenizers raises a bare Exception when the query alone is too long
            query_tokens = len(self._full.encode(query).ids)
            raise InvalidInputError(
                f"the query has {query_tokens} tokens, which leaves no room for a document within the "
                f"model's {self.max_tokens} tokens: shorten the query"
            ) from exc
        return self._tokenized(encodings)

    def _tokenized(self, encodings: list[Encoding]) -> Tokenized:
        # len(encoding) counts tokens without building the list of ids; only an input cut to
        # max_tokens can have overflowing parts.
        lengths = [len(e) for e in encodings]
        cut = self.max_tokens
        truncated = [i for i, n in enumerate(lengths) if n >= cut and encodings[i].overflowing]
        return Tokenized(encodings, lengths, truncated)

    def token(self, token_id: int) -> str:
        """The vocabulary token of an id."""
        return self._full.id_to_token(token_id) or ""

    def full_length(self, text: str) -> int:
        """Tokens of text without truncation (for error messages)."""
        return len(self._full.encode(text).ids)

    def collate(self, encodings: list[Encoding]) -> tuple[IntArray, IntArray, IntArray]:
        """Pads encodings to the longest into input_ids, attention_mask and token_type_ids."""
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        real = np.arange(lengths.max()) < lengths[:, None]
        # One list of every real token, scattered into the rows in one step: row-major order
        # of `real` is the order of the tokens.
        ids, types = np.full(real.shape, self.pad_id, dtype=np.int64), np.zeros(real.shape, dtype=np.int64)
        flat_ids: list[int] = []
        flat_types: list[int] = []
        for enc in encodings:
            flat_ids += enc.ids
            flat_types += enc.type_ids
        ids[real] = flat_ids
        types[real] = flat_types
        return ids, real.astype(np.int64), types
