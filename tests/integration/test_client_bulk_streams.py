"""bulk_embed(streams=K) against real servers with a tiny seeded dense model: K EmbedStream calls
at once yield what one stream yields, in input order, each batch embedded once; a server killed
mid-run (restarted on its port, or one of two behind round_robin) costs a retry, never a lost or
repeated vector; invalid inputs are raised or skipped at the same indices as with one stream;
leaving early cancels every stream."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from embedserve_client import AsyncClient, Client, InvalidArgumentError, UnavailableError

from bench.process import ServerProcess, free_port
from bench.tiny import cached_tiny_dense
from embedserve.settings import ModelSettings
from tests.conftest import CACHE_DIR, RunningServer, make_settings
from tests.scrape import Scrape

COUNT = 5_000
TEXTS = [f"text {i} in many streams" for i in range(COUNT)]
EMBED_STREAM = "embedserve.v1.EmbeddingService/EmbedStream"
TOO_LONG = "word " * 1_000  # > the tiny model's 256 tokens: rejected with truncate=False
# Vectors of a server process and of the in-process one, or of batches cut differently, agree to this.
ATOL = 1e-5
# A run of this file's that takes longer has lost a batch and would wait for it forever.
RUN_S = 60

Vector = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def tiny_dense() -> Path:
    """bench.ceiling's tiny MiniLM-shaped dense model (128-d), built once into the test cache."""
    return cached_tiny_dense(CACHE_DIR)


@pytest.fixture(scope="module")
def tiny(tiny_dense: Path) -> Iterator[RunningServer]:
    """An in-process server of the tiny dense model, with metrics and no vector cache (each
    input sent is computed, so that the server's count of inputs shows what was sent)."""
    running = RunningServer(make_settings(models=(ModelSettings(str(tiny_dense)),), vector_cache_bytes=0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
async def expected(tiny: RunningServer) -> Vector:
    """Every text's vector from unary Embed calls; consecutive ones far apart, so that two
    vectors swapped in the output could not pass for each other."""
    async with AsyncClient(tiny.address) as client:
        vectors = np.concatenate([await client.embed(TEXTS[i : i + 512]) for i in range(0, COUNT, 512)])
    assert np.linalg.norm(vectors[1:] - vectors[:-1], axis=1).min() > 100 * ATOL
    return vectors


def scrape(metrics_address: str) -> Scrape:
    return Scrape(f"http://{metrics_address}/metrics")


def embedded_inputs(metrics_address: str) -> float:
    """Inputs the server's forward passes computed so far (with the vector cache off: every
    input it was sent)."""
    return scrape(metrics_address).value("embedserve_batch_inputs_sum")


def streams_ended(metrics_address: str, code: str) -> float:
    return scrape(metrics_address).value("embedserve_requests_total", rpc=EMBED_STREAM, code=code)


def open_streams(metrics_address: str) -> float:
    return scrape(metrics_address).value("embedserve_calls_in_flight", kind="stream")


def metrics_address_of(server: ServerProcess, seconds: float = 10.0) -> str:
    """The metrics host:port a server process logs (METRICS_PORT=0 picks a free one) just after
    the line ServerProcess waits for."""
    deadline = time.monotonic() + seconds
    while not (lines := [line for line in server.lines if "serving Prometheus metrics on http://" in line]):
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.02)
    return lines[0].split("http://", 1)[1].split("/", 1)[0]


def poll(read: Callable[[], float], want: float, seconds: float = 10.0) -> float:
    """Reads until `read()` returns `want` or `seconds` pass; returns the last value read. (From
    a coroutine: in a thread, so that the client's streams go on meanwhile.)"""
    deadline = time.monotonic() + seconds
    while (value := read()) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


async def listed(stream: AsyncIterator[Vector | None]) -> list[Vector | None]:
    return [vector async for vector in stream]


def stacked(results: list[Vector | None]) -> Vector:
    vectors = [vector for vector in results if vector is not None]
    assert len(vectors) == len(results), "an input was skipped"
    return np.stack(vectors)


def tiny_flags(tiny_dense: Path, port: int) -> list[str]:
    """A server process of the tiny model on `port` (0: any), with no vector cache, as `tiny`."""
    model = ["--model-names", str(tiny_dense), "--vector-cache-bytes", "0"]
    return ["--cache-dir", str(CACHE_DIR), *model, "--port", str(port)]


async def test_four_streams_yield_what_one_yields_in_order_and_each_batch_is_embedded_once(
    tiny: RunningServer, expected: Vector
) -> None:
    metrics = tiny.metrics_address
    async with AsyncClient(tiny.address) as client:
        inputs, ok = embedded_inputs(metrics), streams_ended(metrics, "OK")
        one = stacked(await listed(client.bulk_embed(TEXTS, batch_size=64, window=4)))
        assert poll(lambda: streams_ended(metrics, "OK"), ok + 1) == ok + 1
        assert embedded_inputs(metrics) - inputs == COUNT
        inputs, ok = embedded_inputs(metrics), ok + 1
        four = stacked(await listed(client.bulk_embed(iter(TEXTS), batch_size=64, window=4, streams=4)))
        assert poll(lambda: streams_ended(metrics, "OK"), ok + 4) == ok + 4  # four calls, each ended OK
        assert embedded_inputs(metrics) - inputs == COUNT  # no batch sent twice
    assert four.shape == (COUNT, 128)
    np.testing.assert_allclose(four, one, atol=ATOL)
    np.testing.assert_allclose(four, expected, atol=ATOL)


async def test_a_server_killed_mid_run_and_restarted_costs_a_retry_never_a_vector(
    tiny_dense: Path, expected: Vector
) -> None:
    port, kill_at, batch_size, window, streams = free_port(), 2_000, 64, 4, 4
    first = ServerProcess(tiny_flags(tiny_dense, port))
    restarted: asyncio.Task[ServerProcess] | None = None
    vectors = []
    try:
        async with asyncio.timeout(RUN_S), AsyncClient(first.address) as client:
            stream = client.bulk_embed(TEXTS, batch_size=batch_size, window=window, streams=streams)
            async for vector in stream:
                vectors.append(vector)
                if len(vectors) == kill_at:  # the run waits here: the kill lands mid-run
                    first.proc.send_signal(signal.SIGKILL)
                    first.proc.wait(timeout=30)
                    restarted = asyncio.create_task(asyncio.to_thread(ServerProcess, tiny_flags(tiny_dense, port)))
        assert restarted is not None and restarted.done()
        assert first.proc.returncode == -signal.SIGKILL
        assert len(vectors) == COUNT
        np.testing.assert_allclose(np.stack(vectors), expected, atol=ATOL)  # each once, in order
        # The restarted server embedded what the first had not answered, and no more: at least the
        # first kill_at were answered, at most that plus what the client holds besides.
        again = embedded_inputs(metrics_address_of(restarted.result()))
        assert COUNT - kill_at - streams * window * batch_size <= again <= COUNT - kill_at
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
        if restarted is not None:
            second = await restarted
            assert second.stop() == 0


async def test_one_of_two_round_robin_servers_killed_mid_run_costs_a_retry_never_a_vector(
    tiny: RunningServer, tiny_dense: Path, expected: Vector
) -> None:
    doomed = ServerProcess(tiny_flags(tiny_dense, 0))
    addresses = (tiny.metrics_address, metrics_address_of(doomed))
    survivor_before = embedded_inputs(tiny.metrics_address)
    vectors = []
    try:
        target = f"ipv4:{tiny.address},{doomed.address}"
        async with asyncio.timeout(RUN_S), AsyncClient(target, load_balancing="round_robin") as client:
            # Once both servers have answered a call, round_robin holds both connections ready.
            for _ in range(20):
                await client.embed(["warm-up"])
                if all(scrape(a).value("embedserve_requests_total", code="OK") > 0 for a in addresses):
                    break
            async for vector in client.bulk_embed(TEXTS, batch_size=64, window=4, streams=4):
                vectors.append(vector)
                if len(vectors) == 1_500:
                    assert embedded_inputs(metrics_address_of(doomed)) > 0  # the streams are spread
                    assert embedded_inputs(tiny.metrics_address) > survivor_before
                    doomed.proc.send_signal(signal.SIGKILL)
                    doomed.proc.wait(timeout=30)
    finally:
        if doomed.proc.poll() is None:
            doomed.proc.kill()
    assert len(vectors) == COUNT
    np.testing.assert_allclose(np.stack(vectors), expected, atol=ATOL)


async def test_a_paused_consumer_holds_the_streams_to_streams_times_window_batches_ahead(
    tiny: RunningServer, expected: Vector
) -> None:
    metrics, batch_size, window, streams = tiny.metrics_address, 16, 2, 3
    # The batch being yielded, and streams * window held behind it (sent, or answered early).
    most = (1 + streams * window) * batch_size
    inputs = embedded_inputs(metrics)
    async with AsyncClient(tiny.address) as client:
        stream = client.bulk_embed(TEXTS, batch_size=batch_size, window=window, streams=streams)
        vectors = [await anext(stream)]
        ahead = await asyncio.to_thread(poll, lambda: embedded_inputs(metrics) - inputs, most)
        assert ahead == most
        await asyncio.sleep(0.5)  # nothing to wait for: no more may come
        assert embedded_inputs(metrics) - inputs == most
        vectors += [vector async for vector in stream]
    np.testing.assert_allclose(np.stack(vectors), expected, atol=ATOL)


BAD = {3: "", 130: TOO_LONG, 131: "", 420: "x\udfff", 999: ""} | dict.fromkeys(range(500, 550), "")


@pytest.mark.parametrize("streams", [1, 3])
async def test_skip_gives_the_same_nones_and_indices_with_three_streams_as_with_one(
    tiny: RunningServer, expected: Vector, streams: int
) -> None:
    texts = [BAD.get(i, text) for i, text in enumerate(TEXTS[:1_000])]
    skipped: list[tuple[int, InvalidArgumentError]] = []
    async with AsyncClient(tiny.address) as client:
        stream = client.bulk_embed(
            texts, batch_size=50, window=2, streams=streams, truncate=False, on_invalid="skip", skipped=skipped
        )
        results = await listed(stream)
    assert [i for i, result in enumerate(results) if result is None] == sorted(BAD)
    assert [(index, error.index) for index, error in skipped] == [(i, i) for i in sorted(BAD)]
    assert all(error.message.startswith(f"input {index} ") for index, error in skipped)
    assert "tokens" in dict(skipped)[130].message
    good = [i for i in range(1_000) if i not in BAD]
    np.testing.assert_allclose(stacked([results[i] for i in good]), expected[good], atol=ATOL)


@pytest.mark.parametrize("streams", [1, 3])
async def test_raise_names_the_first_bad_input_after_every_vector_before_it_with_three_streams_as_with_one(
    tiny: RunningServer, expected: Vector, streams: int
) -> None:
    # The later bad input is in a batch another stream can have answered first; the earlier still wins.
    texts = [{777: "", 901: TOO_LONG}.get(i, text) for i, text in enumerate(TEXTS[:1_500])]
    yielded = []
    async with AsyncClient(tiny.address) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            async for vector in client.bulk_embed(texts, batch_size=64, window=4, streams=streams, truncate=False):
                yielded.append(vector)
    assert caught.value.index == 777
    assert caught.value.message.startswith("input 777 ")
    np.testing.assert_allclose(np.stack(yielded), expected[:777], atol=ATOL)


async def test_the_callers_iterable_failing_raises_its_error_with_three_streams(tiny: RunningServer) -> None:
    def failing() -> Iterator[str]:
        yield from TEXTS[:700]
        raise RuntimeError("the corpus file is truncated")

    async with AsyncClient(tiny.address) as client:
        with pytest.raises(RuntimeError, match="truncated"):
            await listed(client.bulk_embed(failing(), batch_size=64, streams=3))


@pytest.mark.parametrize("leave", ["break", "aclose"])
async def test_leaving_early_cancels_every_stream_and_leaves_no_task(tiny: RunningServer, leave: str) -> None:
    metrics = tiny.metrics_address
    assert await asyncio.to_thread(poll, lambda: open_streams(metrics), 0) == 0
    cancelled = streams_ended(metrics, "CANCELLED")
    before = asyncio.all_tasks()
    async with AsyncClient(tiny.address) as client:
        stream = client.bulk_embed(TEXTS, batch_size=64, window=4, streams=3)
        async for _ in stream:
            assert await asyncio.to_thread(poll, lambda: open_streams(metrics), 3) == 3  # all three at work
            if leave == "aclose":
                await stream.aclose()  # type: ignore[attr-defined]
            break
        del stream  # a generator left by `break` is closed once nothing holds it,
        await asyncio.sleep(0)  # by a task the loop's hook starts
        if left := asyncio.all_tasks() - before - {asyncio.current_task()}:
            await asyncio.wait(left, timeout=10)
        assert not asyncio.all_tasks() - before - {asyncio.current_task()}
        assert await asyncio.to_thread(poll, lambda: open_streams(metrics), 0) == 0
        ended = await asyncio.to_thread(poll, lambda: streams_ended(metrics, "CANCELLED"), cancelled + 3)
        assert ended == cancelled + 3


async def test_every_stream_giving_up_raises_unavailable_after_max_retries() -> None:
    async with AsyncClient(f"127.0.0.1:{free_port()}") as client:  # nothing listens there
        with pytest.raises(UnavailableError, match="gave up after 1 retries"):
            await listed(client.bulk_embed(TEXTS[:10], batch_size=2, streams=3, max_retries=1))


def test_the_sync_client_runs_two_streams_and_counts_progress_over_both(
    tiny: RunningServer, expected: Vector, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = tiny.metrics_address
    ok = streams_ended(metrics, "OK")
    with Client(tiny.address) as client:
        vectors = np.stack(list(client.bulk_embed(TEXTS[:2_000], batch_size=32, streams=2, progress=True)))
    np.testing.assert_allclose(vectors, expected[:2_000], atol=ATOL)
    assert poll(lambda: streams_ended(metrics, "OK"), ok + 2) == ok + 2
    assert "2000/2000" in capsys.readouterr().err
