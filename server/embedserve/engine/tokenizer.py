"""Tokenization with exact token counts and truncation that matches sentence-transformers."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding

from embedserve.backends.base import IntArray
from embedserve.backends.config import load_fast_tokenizer
from embedserve.errors import InvalidInputError


class Tokens:
    """One input's token ids and token type ids, all the model reads of its encoding: a tokenizer's
    Encoding also keeps every token's text, offsets, masks, words and its overflow windows,
    ~100 bytes a token, for as long as the input waits and runs (600 MB for 2,048 long inputs)."""

    __slots__ = ("ids", "type_ids")

    def __init__(self, encoding: Encoding) -> None:
        self.ids = np.array(encoding.ids, dtype=np.int32)
        self.type_ids = np.array(encoding.type_ids, dtype=np.int8)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Tokenized:
    """The tokens of a batch of texts and what truncation did to them."""

    encoded: list[Tokens]
    lengths: list[int]
    truncated: list[int]  # positions of inputs that were cut to the model's max

    @property
    def tokens(self) -> int:
        """Tokens over all inputs, special tokens included."""
        return sum(self.lengths)


# Characters a text keeps per token of the model's max before it is tokenized: no tokenizer of ours
# turns 16 characters of text into less than one token, white space runs and very long words
# aside (they are caught: `_cut_first`).
CHARS_PER_TOKEN = 16
# Characters a token of the estimate (`TextTokenizer.estimate`) takes.
CHARS_PER_TOKEN_ESTIMATE = 4
# Texts tokenized at once (the tokenizer still spreads each slice over its threads).
TOKENIZE_SLICE = 256


def _cut_at_space(text: str, limit: int) -> str:
    """The text's first `limit` characters, back to its last white space in the second half of
    them (so no word is cut in two), else exactly `limit`."""
    head = text[:limit]
    space = max(head.rfind(c, limit // 2) for c in " \n\t\r")
    return head[:space] if space > 0 else head


class TextTokenizer:
    """A fast (Rust) tokenizer that truncates to the model's max input tokens."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        backend, self.pad_id = load_fast_tokenizer(path)
        self.max_tokens = max_tokens
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
        return self._cut_first(texts, self._truncating.encode_batch_fast)

    def encode_pairs(self, query: str, documents: list[str]) -> Tokenized:
        """Tokenizes (query, document) pairs, cutting documents so each pair fits max_tokens."""
        try:
            return self._cut_first(
                documents, lambda cut: self._pairs.encode_batch_fast([(query, document) for document in cut])
            )
        except Exception as exc:  # tokenizers raises a bare Exception when the query alone is too long
            query_tokens = len(self._full.encode(query).ids)
            raise InvalidInputError(
                f"the query has {query_tokens} tokens, which leaves no room for a document within the "
                f"model's {self.max_tokens} tokens: shorten the query"
            ) from exc

    def _cut_first(self, texts: list[str], encode: Callable[[list[str]], list[Encoding]]) -> Tokenized:
        """Encodes texts with `encode`, a text longer than CHARS_PER_TOKEN x max_tokens characters
        first cut to that length, at a white space, since the tokens past the max are thrown away.
        A tokenizer keeps every token of the whole text (in overflow windows) until the encoding
        is gone: 2,048 inputs of 30 KB cost +2.5 GB and seconds of tokenizing. A cut text that then
        fits max_tokens (white space or long words took more characters than that) is encoded
        whole, so that what is kept is always what the whole text would have given."""
        encoded: list[Tokens] = []
        lengths: list[int] = []
        truncated: list[int] = []
        # A slice at a time, so that only one slice's full encodings exist at once.
        for start in range(0, len(texts), TOKENIZE_SLICE):
            encodings = self._cut_and_encode(texts[start : start + TOKENIZE_SLICE], encode)
            for i, encoding in enumerate(encodings, start):
                length = len(encoding)  # counts tokens without building the list of ids
                # Only an input cut to max_tokens can have overflowing parts.
                if length >= self.max_tokens and encoding.overflowing:
                    truncated.append(i)
                lengths.append(length)
                encoded.append(Tokens(encoding))
        return Tokenized(encoded, lengths, truncated)

    def _cut_and_encode(self, texts: list[str], encode: Callable[[list[str]], list[Encoding]]) -> list[Encoding]:
        limit = self.max_tokens * CHARS_PER_TOKEN
        long = [i for i, text in enumerate(texts) if len(text) > limit]
        if not long:
            return encode(texts)
        cut = list(texts)
        for i in long:
            cut[i] = _cut_at_space(texts[i], limit)
        encodings = encode(cut)
        short = [i for i in long if not encodings[i].overflowing]
        for i, encoding in zip(short, encode([texts[i] for i in short]) if short else [], strict=True):
            encodings[i] = encoding
        return encodings

    def estimate(self, texts: Sequence[str], query: str | None = None) -> int:
        """About how many tokens texts (or query/text pairs) become, from their lengths alone,
        before any tokenizing: what admission holds room for. ~4 characters a token (English
        prose through BERT's WordPiece), at most max_tokens an input, 2 special tokens (3 and the
        query's for a pair); the job's real count replaces it once tokenized."""
        extra = 2 if query is None else 3 + len(query) // CHARS_PER_TOKEN_ESTIMATE
        cap = self.max_tokens
        return sum(min(cap, len(text) // CHARS_PER_TOKEN_ESTIMATE + extra) for text in texts)

    def token(self, token_id: int) -> str:
        """The vocabulary token of an id."""
        return self._full.id_to_token(token_id) or ""

    def full_length(self, text: str) -> int:
        """Tokens of text without truncation (for error messages)."""
        return len(self._full.encode(text).ids)

    def collate(self, inputs: list[Tokens]) -> tuple[IntArray, IntArray, IntArray]:
        """Pads inputs to the longest into input_ids, attention_mask and token_type_ids."""
        lengths = np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs))
        real = np.arange(lengths.max()) < lengths[:, None]
        # Every real token, scattered into the rows in one step: row-major order of `real` is the
        # order of the tokens.
        ids, types = np.full(real.shape, self.pad_id, dtype=np.int64), np.zeros(real.shape, dtype=np.int64)
        ids[real] = np.concatenate([tokens.ids for tokens in inputs])
        types[real] = np.concatenate([tokens.type_ids for tokens in inputs])
        return ids, real.astype(np.int64), types
