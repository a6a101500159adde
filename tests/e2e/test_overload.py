"""Overload (issue 10): 256 unary gRPC clients and 64 REST clients through Envoy, each sending a
request of 8-16 texts every second for 8 s, several times what a server whose lanes queue
QUEUE_SECONDS = 0.5 s of work can answer. Every request is answered or refused for overload
(RESOURCE_EXHAUSTED with retry-after; over REST 429 with Retry-After and OpenAI's JSON error),
never anything else; refusals come fast; health stays fast and SERVING.

The load is bench.overload's (bench/overload_phases.py), against a server process of its own, so
the clients' event loop and the server's never share a process or a GIL; health is timed from a
third process (bench.probe)."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator

import pytest

from bench.overload_phases import ANSWERED, GRPC, PATHS, REST, SHED, Load, Phase, Shape, make_requests
from bench.process import ServerProcess
from bench.shared_phases import Reference
from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import CACHE_DIR
from tests.e2e.conftest import Gateway

QUEUE_SECONDS = 0.5
LOAD = Shape(grpc_clients=256, rest_clients=64, seconds=8.0, period_s=1.0)
# A refusal's median, at most: loose, for a loaded 2-core CI machine (they take milliseconds).
REFUSAL_MEDIAN_S = 0.5
HEALTH_MEDIAN_MS = 50.0


@pytest.fixture(scope="module")
def overloaded() -> Iterator[Phase]:
    """What the clients saw of the overload, with the health checks meanwhile. The server must
    still exit 0 after SIGTERM when the module is done."""
    flags = [
        "--model-names",
        DEFAULT_DENSE_MODEL,
        "--queue-seconds",
        f"{QUEUE_SECONDS:g}",
        "--cache-dir",
        str(CACHE_DIR),
    ]
    with ServerProcess(flags) as server, Gateway(server.address) as envoy:
        requests = make_requests(2048, (8, 16), (8, 16), seed=0)
        load = Load(server.address, envoy.base_url, DEFAULT_DENSE_MODEL, requests, Reference(*PATHS))
        asyncio.run(load.run(Shape(grpc_clients=4, rest_clients=1, seconds=1.0)))  # warm: first shapes allocate
        yield asyncio.run(load.run(LOAD, probe=True))


def test_every_request_is_answered_or_refused_for_overload_and_nothing_else(overloaded: Phase) -> None:
    assert overloaded.unexpected() == {}  # no INTERNAL, UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED, 5xx
    assert len(overloaded.outcomes) > LOAD.clients  # every client sent more than once


@pytest.mark.parametrize("path", PATHS)
def test_the_overload_is_shed_and_what_is_admitted_is_answered(overloaded: Phase, path: str) -> None:
    statuses = overloaded.statuses(path)
    assert statuses[SHED[path]] > 0, statuses
    assert statuses[ANSWERED[path]] > 0, statuses


@pytest.mark.parametrize("path", PATHS)
def test_every_refusal_says_when_to_retry_and_a_rest_one_is_openai_json(overloaded: Phase, path: str) -> None:
    hinted, refused = overloaded.hinted(path)
    assert refused > 0
    assert hinted == refused, [o for o in overloaded.on(path) if o.shed][:3]


def test_a_refusal_comes_much_faster_than_an_answer(overloaded: Phase) -> None:
    for path in (GRPC, REST):
        refused = statistics.median(overloaded.latencies_ms(path, shed=True)) / 1e3
        answered = statistics.median(overloaded.latencies_ms(path)) / 1e3
        assert refused < REFUSAL_MEDIAN_S, (path, refused, answered)
        assert refused < answered / 3, (path, refused, answered)


def test_health_stays_serving_and_fast_under_the_overload(overloaded: Phase) -> None:
    assert set(overloaded.health) == {"SERVING"}, overloaded.health
    assert overloaded.health["SERVING"] >= 20  # one every 50 ms for 8 s, at the least a few dozen
    assert statistics.median(overloaded.health_ms) < HEALTH_MEDIAN_MS
