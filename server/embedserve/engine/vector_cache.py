"""A content-addressed cache of dense vectors, shared by every request for every dense model, so
that a text seen before costs no tokenizing and no forward pass.

What a vector depends on, and so what its key holds:

* the model: its id, backend, execution provider, dtype, pooling and the path it was loaded from
  (`model_identity`). A model loads once per process, so this also pins its export (ONNX graph)
  for as long as the cache lives; the cache is in memory and never outlives the process.
* the exact text the model reads: the input after its prompt (a named, default or literal one)
  is put before it. Two requests whose prompts give the same text share the entry; the same
  input under another prompt does not.

What is not in the key, because it comes after pooling and is applied to a copy of the cached
vector per request: `dimensions` (the Matryoshka cut) and `normalize`. Requests that differ only
in those share entries. Nor is `truncate`: an input that fits the model is read whole either
way, and one that does not fails with truncate=false; so the entry records whether its text was
cut, and a truncate=false request treats a cut entry as a miss, which then fails as it would
have without the cache. The entry also keeps the text's token count, so usage is the same,
cached or not.

The key is a 16-byte BLAKE2b digest of the text, keyed by the model's identity: its size does
not grow with the text's. Entries are least recently used out first, each counted as the bytes
it really holds (vector, digest, entry and table overhead). Everything runs on the server's
event loop, between awaits, so nothing here needs a lock.

Duplicates within one request are computed once (`Plan`), and so are duplicates between requests
in flight at the same time (`InFlight`): a text another request is computing now is waited for,
not computed again, as long as that request's lane is not behind the waiter's (an interactive
query never waits on bulk work). Should that request fail or go away first, the waiter computes
the text itself. With max_bytes 0 the cache is off, and so is all of that: every input is
computed, as if there were no cache.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from embedserve.backends.base import FloatArray

K = TypeVar("K")
V = TypeVar("V")

# What an OrderedDict spends per entry beyond its key and value: a hash table slot (its share
# of a table kept at most 2/3 full) and the node of its order list.
ORDER_OVERHEAD = 104
DIGEST_BYTES = 16


class BytesLRU(Generic[K, V]):
    """Values by key, at most `max_bytes` of them by the size each was put with, least recently
    used dropped first; O(1) per get and put. A value larger than the whole bound is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value stored for `key`, now the most recently used; None when there is none."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Stores `value` as the most recently used, dropping the least recently used entries
        until it fits; False when it is larger than the bound (nothing is then dropped)."""
        if size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
        self._entries[key] = (value, size)
        self.bytes += size
        return True


@dataclass(frozen=True, slots=True)
class Cached:
    """A text's pooled vector (before `dimensions` and `normalize`; read-only) and what it cost."""

    vector: FloatArray
    tokens: int  # its token count, special tokens included
    truncated: bool  # its text was cut to the model's max tokens


def model_identity(*parts: str) -> bytes:
    """The key under which a model's vectors are hashed: what determines its output."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=32).digest()


class VectorCache:
    """Dense vectors by model and text, at most `max_bytes` of them; 0: off. Counts, per model,
    the inputs it answered (hits) and those that were computed (misses)."""

    def __init__(self, max_bytes: int) -> None:
        self._lru: BytesLRU[bytes, Cached] = BytesLRU(max_bytes)
        self.hits: collections.Counter[str] = collections.Counter()
        self.misses: collections.Counter[str] = collections.Counter()

    @property
    def enabled(self) -> bool:
        """False when the cache is off (VECTOR_CACHE_BYTES=0)."""
        return self._lru.max_bytes > 0

    @property
    def max_bytes(self) -> int:
        """The bound (VECTOR_CACHE_BYTES)."""
        return self._lru.max_bytes

    @property
    def bytes_held(self) -> int:
        """Bytes the entries hold now."""
        return self._lru.bytes

    def __len__(self) -> int:
        return len(self._lru)

    @staticmethod
    def key(model: bytes, text: str) -> bytes:
        """The entry's key for `text` as `model` (a `model_identity`) reads it."""
        data = text.encode("utf-8", "surrogatepass")
        return hashlib.blake2b(data, digest_size=DIGEST_BYTES, key=model).digest()

    def get(self, key: bytes) -> Cached | None:
        """The entry for `key`, None when there is none."""
        return self._lru.get(key)

    def put(self, key: bytes, vector: FloatArray, tokens: int, truncated: bool) -> Cached:
        """Stores a copy of `vector` (a row of a batch would keep the whole batch alive); the
        entry, kept or not (the cache is off, or it is larger than the whole bound)."""
        row = np.array(vector, dtype=np.float32, copy=True)
        row.setflags(write=False)
        entry = Cached(row, tokens, truncated)
        if self.enabled:
            size = sys.getsizeof(row) + sys.getsizeof(key) + sys.getsizeof(entry) + ORDER_OVERHEAD
            self._lru.put(key, entry, size)
        return entry


class InFlight:
    """The texts being computed now, by key: each a future of its entry, set by the request that
    computes it (`claim`, then `settle`), with the lane that request runs in."""

    def __init__(self) -> None:
        self._futures: dict[bytes, tuple[asyncio.Future[Cached], bool]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def find(self, key: bytes, interactive: bool) -> asyncio.Future[Cached] | None:
        """The future of `key`'s entry when a request computes it now in a lane that an
        `interactive` (or bulk) waiter may wait on; None when the waiter must compute it."""
        found = self._futures.get(key)
        if found is None or (interactive and not found[1]):
            return None
        return found[0]

    def claim(self, keys: Sequence[bytes], interactive: bool) -> list[asyncio.Future[Cached]]:
        """Registers `keys` as computed by the calling request from now on; its futures, which
        it must `settle` whatever happens."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Cached]] = []
        for key in keys:
            future: asyncio.Future[Cached] = loop.create_future()
            self._futures[key] = (future, interactive)
            futures.append(future)
        return futures

    def settle(
        self, keys: Sequence[bytes], futures: Sequence[asyncio.Future[Cached]], entries: Sequence[Cached] | None
    ) -> None:
        """Ends a claim: each future gets its entry, or, with `entries` None (the request failed
        or went away), is cancelled, which tells its waiters to compute the text themselves."""
        for i, (key, future) in enumerate(zip(keys, futures, strict=True)):
            if self._futures.get(key, (None,))[0] is future:
                del self._futures[key]
            if not future.done():
                if entries is None:
                    future.cancel()
                else:
                    future.set_result(entries[i])


class Plan:
    """One request's texts against the cache: the inputs it answers, the inputs another request
    in flight computes now (`awaited`), and the distinct texts left to compute (an input that
    repeats an earlier one of the request waits for that one's row)."""

    def __init__(
        self,
        cache: VectorCache,
        model: bytes,
        texts: Sequence[str],
        truncate: bool,
        in_flight: InFlight | None = None,
        interactive: bool = True,
    ) -> None:
        self.found: list[Cached | None] = [None] * len(texts)
        self.todo: list[str] = []  # distinct texts to compute, in the order first seen
        self.first: list[int] = []  # the input position of each, for error messages
        self.keys: list[bytes] = []  # the key of each
        self.awaited: dict[int, asyncio.Future[Cached]] = {}  # input position -> another request's future
        self._slot: list[int] = []  # per input: the index in `todo` it takes its row from; -1: found
        if not cache.enabled:
            self.todo, self.first, self._slot = list(texts), list(range(len(texts))), list(range(len(texts)))
            return
        seen: dict[bytes, int] = {}
        for i, text in enumerate(texts):
            key = cache.key(model, text)
            slot = seen.get(key)
            if slot is None:
                entry = cache.get(key)
                if entry is not None and (truncate or not entry.truncated):
                    self.found[i] = entry
                    self._slot.append(-1)
                    continue
                future = in_flight.find(key, interactive) if in_flight is not None else None
                if future is not None:
                    self.awaited[i] = future
                    self._slot.append(-1)
                    continue
                slot = seen[key] = len(self.todo)
                self.todo.append(text)
                self.first.append(i)
                self.keys.append(key)
            self._slot.append(slot)

    @property
    def cached(self) -> int:
        """Inputs not computed for themselves: found in the cache, repeating an earlier input,
        or computed by another request in flight."""
        return len(self._slot) - len(self.todo)

    def resolve(self, position: int, entry: Cached) -> None:
        """An awaited input's entry, as the request that computed it left it."""
        del self.awaited[position]
        self.found[position] = entry

    def rows(self, computed: Sequence[FloatArray], redone: Mapping[int, FloatArray] | None = None) -> list[FloatArray]:
        """Every input's vector, in input order, from the cache's, `computed` (one per `todo`) and
        `redone` (by position: awaited inputs computed after all)."""
        redone = redone or {}
        return [
            computed[s] if s >= 0 else redone[i] if i in redone else self._entry(i).vector
            for i, s in enumerate(self._slot)
        ]

    def tokens(self, lengths: Sequence[int], truncated: Sequence[int]) -> tuple[int, int]:
        """(tokens, truncated inputs) over every input, from the cache's and the computed ones'
        (`lengths` and `truncated` positions, of `todo`), as the request would count them uncached;
        awaited inputs without an entry (computed after all) not included."""
        cut = set(truncated)
        tokens = inputs_cut = 0
        for i, s in enumerate(self._slot):
            if s >= 0:
                tokens += lengths[s]
                inputs_cut += s in cut
            elif (entry := self.found[i]) is not None:
                tokens += entry.tokens
                inputs_cut += entry.truncated
        return tokens, inputs_cut

    def _entry(self, position: int) -> Cached:
        entry = self.found[position]
        assert entry is not None
        return entry
