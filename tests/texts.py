"""Texts that no other request of the test session sends. The vector cache is on by default, and
answers a text it has seen without a forward pass; a test that needs real work (load, a queue,
a lane, a timing) sends these."""

from __future__ import annotations

import itertools

_SERIAL = itertools.count()


def fresh(text: str) -> str:
    """`text` after a number no earlier call gave: one or two more tokens, never seen before."""
    return f"{next(_SERIAL)} {text}"


def fresh_texts(text: str, count: int) -> list[str]:
    """`count` different texts, each `text` after its own new number."""
    return [fresh(text) for _ in range(count)]
