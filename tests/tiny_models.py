"""Tiny BERT models built on the fly (fixed seed, real BERT uncased tokenizer) for sparse and rerank tests.

They are random-initialized, so their outputs mean nothing, but they are small (~1 M parameters,
mostly the 30522-token embedding), deterministic, and run through exactly the code paths a real
SPLADE masked-LM or cross-encoder does. Built by bench/tiny.py, which bench.ceiling shares.
"""

from __future__ import annotations

from bench.tiny import build_tiny_cross_encoder as build_tiny_cross_encoder
from bench.tiny import build_tiny_masked_lm as build_tiny_masked_lm
