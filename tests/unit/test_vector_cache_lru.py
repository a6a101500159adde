"""The vector cache's LRU and its plan of a request: bounded by bytes, least recently used out
first, duplicates computed once, within a request and between requests in flight."""

from __future__ import annotations

import asyncio

import numpy as np

from embedserve.engine.vector_cache import BytesLRU, Cached, InFlight, Plan, VectorCache, model_identity


def test_the_least_recently_used_entry_goes_first_and_bytes_stay_under_the_bound() -> None:
    lru: BytesLRU[str, int] = BytesLRU(max_bytes=30)
    for key in "abc":
        assert lru.put(key, ord(key), 10)
    assert lru.bytes == 30
    assert lru.get("a") == ord("a")  # "a" is now the most recently used: "b" goes first
    assert lru.put("d", 4, 10)
    assert "b" not in lru and {"a", "c", "d"} == {k for k in "abcd" if k in lru}
    assert lru.put("e", 5, 25)  # 25 + 10 > 30: every other entry goes
    assert len(lru) == 1 and lru.bytes == 25 and lru.get("e") == 5
    assert lru.get("a") is None


def test_a_value_larger_than_the_bound_is_not_kept_and_drops_nothing() -> None:
    lru: BytesLRU[str, int] = BytesLRU(max_bytes=10)
    assert lru.put("a", 1, 4)
    assert not lru.put("big", 2, 11)
    assert "big" not in lru and lru.get("a") == 1 and lru.bytes == 4


def test_putting_a_key_again_replaces_its_bytes() -> None:
    lru: BytesLRU[str, int] = BytesLRU(max_bytes=100)
    lru.put("a", 1, 40)
    lru.put("a", 2, 10)
    assert len(lru) == 1 and lru.bytes == 10 and lru.get("a") == 2


def test_the_cache_counts_each_entry_as_its_vector_key_and_overhead_and_evicts_to_its_bound() -> None:
    vector = np.arange(384, dtype=np.float32)
    one = VectorCache(1 << 20)
    model = model_identity("m", "onnx")
    one.put(one.key(model, "text"), vector, 3, False)
    size = one.bytes_held
    assert size > vector.nbytes + 16  # the vector, its digest and their overhead
    cache = VectorCache(10 * size)
    for i in range(25):
        cache.put(cache.key(model, f"text {i}"), vector, 3, False)
        assert cache.bytes_held <= cache.max_bytes
    assert len(cache) == 10
    assert cache.get(cache.key(model, "text 24")) is not None and cache.get(cache.key(model, "text 0")) is None


def test_entries_are_copies_that_cannot_be_written() -> None:
    cache = VectorCache(1 << 20)
    batch = np.ones((4, 8), dtype=np.float32)
    key = cache.key(model_identity("m"), "x")
    cache.put(key, batch[1], 2, False)
    entry = cache.get(key)
    assert entry is not None and entry.vector.base is None and not entry.vector.flags.writeable
    batch[1] = 0
    assert float(entry.vector.sum()) == 8.0


def test_keys_differ_by_model_and_by_exact_text() -> None:
    a, b = model_identity("m", "fp32"), model_identity("m", "int8")
    assert VectorCache.key(a, "text") != VectorCache.key(b, "text")
    assert VectorCache.key(a, "text") != VectorCache.key(a, "text ")
    assert VectorCache.key(a, "text") == VectorCache.key(a, "text")


def test_a_plan_computes_each_distinct_miss_once_and_puts_rows_back_in_input_order() -> None:
    cache = VectorCache(1 << 20)
    model = model_identity("m")
    cache.put(cache.key(model, "known"), np.full(2, 9, dtype=np.float32), 5, False)
    plan = Plan(cache, model, ["a", "known", "b", "a", "known"], truncate=True)
    assert plan.todo == ["a", "b"] and plan.first == [0, 2] and plan.cached == 3
    rows = plan.rows([np.full(2, 1, dtype=np.float32), np.full(2, 2, dtype=np.float32)])
    assert [float(r[0]) for r in rows] == [1, 9, 2, 1, 9]
    assert plan.tokens([3, 4], truncated=[1]) == (3 + 5 + 4 + 3 + 5, 1)


def test_a_truncated_entry_is_a_miss_for_a_request_that_does_not_truncate() -> None:
    cache = VectorCache(1 << 20)
    model = model_identity("m")
    cache.put(cache.key(model, "long"), np.zeros(2, dtype=np.float32), 256, True)
    assert Plan(cache, model, ["long"], truncate=True).todo == []
    assert Plan(cache, model, ["long"], truncate=False).todo == ["long"]


def test_with_no_bytes_the_cache_is_off_and_every_input_is_computed() -> None:
    cache = VectorCache(0)
    model = model_identity("m")
    cache.put(cache.key(model, "a"), np.zeros(2, dtype=np.float32), 1, False)
    assert len(cache) == 0 and not cache.enabled
    plan = Plan(cache, model, ["a", "a"], truncate=True)
    assert plan.todo == ["a", "a"] and plan.cached == 0


def _entry(value: float, tokens: int = 3, truncated: bool = False) -> Cached:
    return Cached(np.full(2, value, dtype=np.float32), tokens, truncated)


def test_a_text_in_flight_is_awaited_and_its_entry_taken_not_computed_again() -> None:
    async def scenario() -> None:
        cache, in_flight, model = VectorCache(1 << 20), InFlight(), model_identity("m")
        owner = Plan(cache, model, ["a", "b"], truncate=True, in_flight=in_flight)
        futures = in_flight.claim(owner.keys, interactive=True)
        waiter = Plan(cache, model, ["c", "a", "a"], truncate=True, in_flight=in_flight)
        assert waiter.todo == ["c"] and sorted(waiter.awaited) == [1, 2] and waiter.cached == 2
        in_flight.settle(owner.keys, futures, [_entry(1), _entry(2)])
        assert len(in_flight) == 0 and all(f.done() for f in futures)
        for position, future in list(waiter.awaited.items()):
            waiter.resolve(position, future.result())
        rows = waiter.rows([np.full(2, 7, dtype=np.float32)])
        assert [float(r[0]) for r in rows] == [7, 1, 1]
        assert waiter.tokens([5], truncated=[]) == (5 + 3 + 3, 0)

    asyncio.run(scenario())


def test_a_failed_owner_cancels_its_futures_so_waiters_compute_the_text_themselves() -> None:
    async def scenario() -> None:
        cache, in_flight, model = VectorCache(1 << 20), InFlight(), model_identity("m")
        owner = Plan(cache, model, ["a"], truncate=True, in_flight=in_flight)
        futures = in_flight.claim(owner.keys, interactive=True)
        waiter = Plan(cache, model, ["a"], truncate=True, in_flight=in_flight)
        in_flight.settle(owner.keys, futures, None)
        assert futures[0].cancelled() and len(in_flight) == 0
        # Not resolved: the row comes from what the waiter computed itself (`redone`).
        assert [float(r[0]) for r in waiter.rows([], {0: np.full(2, 4, dtype=np.float32)})] == [4]
        assert waiter.tokens([], []) == (0, 0)  # counted by the request that computes it after all
        assert Plan(cache, model, ["a"], truncate=True, in_flight=in_flight).todo == ["a"]

    asyncio.run(scenario())


def test_interactive_requests_never_wait_on_bulk_work_and_a_new_claim_is_not_dropped_by_the_old() -> None:
    async def scenario() -> None:
        cache, in_flight, model = VectorCache(1 << 20), InFlight(), model_identity("m")
        key = [cache.key(model, "a")]
        bulk = in_flight.claim(key, interactive=False)
        assert in_flight.find(key[0], interactive=False) is bulk[0]  # bulk waits on bulk
        assert in_flight.find(key[0], interactive=True) is None  # an interactive query computes it
        assert Plan(cache, model, ["a"], truncate=True, in_flight=in_flight, interactive=True).todo == ["a"]
        query = in_flight.claim(key, interactive=True)
        in_flight.settle(key, bulk, [_entry(1)])  # the bulk owner ends first
        assert bulk[0].result().vector[0] == 1
        assert in_flight.find(key[0], interactive=True) is query[0]  # the query's claim still stands
        in_flight.settle(key, query, [_entry(1)])
        assert len(in_flight) == 0

    asyncio.run(scenario())


def test_with_the_cache_off_nothing_is_shared_in_flight() -> None:
    async def scenario() -> None:
        cache, in_flight, model = VectorCache(0), InFlight(), model_identity("m")
        in_flight.claim([cache.key(model, "a")], interactive=True)
        plan = Plan(cache, model, ["a"], truncate=True, in_flight=in_flight)
        assert plan.todo == ["a"] and not plan.awaited

    asyncio.run(scenario())
