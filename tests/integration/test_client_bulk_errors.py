"""bulk_embed and inputs that fail validation: the error names the input's position in the whole
iterable, and on_invalid="skip" leaves a None in its place and reports it, against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import numpy.typing as npt
import pytest
from embedserve_client import AsyncClient, Client, InvalidArgumentError

from tests.conftest import RunningServer
from tests.integration.test_client import CuttingProxy

COUNT = 1_000
TOO_LONG = "word " * 1_000  # > the model's 256 tokens: rejected with truncate=False
BAD_TEXTS = ("", TOO_LONG, "lone \ud800 surrogate")  # the server's two checks, and protobuf's


def corpus(bad: dict[int, str], count: int = COUNT) -> list[str]:
    return [bad.get(i, f"text number {i}") for i in range(count)]


async def embedded(client: AsyncClient, texts: list[str]) -> npt.NDArray[np.float32]:
    """Each text's vector from unary Embed calls."""
    return np.concatenate([await client.embed(texts[i : i + 512]) for i in range(0, len(texts), 512)])


def stacked(results: list[npt.NDArray[np.float32] | None], positions: list[int]) -> npt.NDArray[np.float32]:
    """The vectors yielded at `positions`, none of which may be a skipped input's None."""
    vectors = []
    for i in positions:
        vector = results[i]
        assert vector is not None, f"input {i} was skipped"
        vectors.append(vector)
    return np.stack(vectors)


async def listed(stream: AsyncIterator[npt.NDArray[np.float32] | None]) -> list[npt.NDArray[np.float32] | None]:
    return [result async for result in stream]


@pytest.mark.parametrize("bad_text", BAD_TEXTS, ids=["empty", "too-long", "surrogate"])
async def test_the_error_names_the_first_bad_inputs_position_in_the_stream_after_every_vector_before_it(
    server: RunningServer, bad_text: str
) -> None:
    # The later bad input is in a batch that can be answered first; the earlier one still wins.
    texts = corpus({777: bad_text, 901: ""})
    yielded = []
    async with AsyncClient(server.address) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            async for vector in client.bulk_embed(texts, batch_size=64, window=16, truncate=False):
                yielded.append(vector)
        expected = await embedded(client, texts[:777])
    assert caught.value.index == 777
    assert caught.value.message.startswith("input 777 ")
    assert "inputs[" not in caught.value.message  # no position within a batch left to mislead
    assert len(yielded) == 777
    np.testing.assert_allclose(np.stack(yielded), expected, atol=1e-5)


async def test_skip_yields_none_for_each_bad_input_and_every_other_vector_in_its_place(server: RunningServer) -> None:
    bad = {3: "", 130: TOO_LONG, 131: "", 420: "x\udfff", 999: ""}
    bad |= dict.fromkeys(range(500, 550), "")  # a whole batch rejected, one input at a time
    texts = corpus(bad)
    skipped: list[tuple[int, InvalidArgumentError]] = []
    async with AsyncClient(server.address) as client:
        stream = client.bulk_embed(texts, batch_size=50, window=8, truncate=False, on_invalid="skip", skipped=skipped)
        results = await listed(stream)
        good = [i for i in range(COUNT) if i not in bad]
        expected = await embedded(client, [texts[i] for i in good])
    assert len(results) == COUNT
    assert [i for i, result in enumerate(results) if result is None] == sorted(bad)
    np.testing.assert_allclose(stacked(results, good), expected, atol=1e-5)
    assert [index for index, _ in skipped] == sorted(bad)
    for index, error in skipped:
        assert error.index == index
        assert error.message.startswith(f"input {index} ")
    assert "tokens" in dict(skipped)[130].message


async def test_skip_still_raises_an_error_about_the_whole_request(server: RunningServer) -> None:
    async with AsyncClient(server.address) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await listed(client.bulk_embed(corpus({5: ""}, 100), dimensions=100_000, on_invalid="skip"))
    assert caught.value.index is None
    assert "dimensions" in caught.value.message


async def test_skip_through_a_broken_stream_loses_and_repeats_nothing(server: RunningServer) -> None:
    count = 5_000
    bad = {i: "" for i in range(7, count, 301)}
    texts = corpus(bad, count)
    skipped: list[tuple[int, InvalidArgumentError]] = []
    proxy = CuttingProxy(server.address, cut_after=400_000)  # a few 64 x 384 x 4-byte responses
    target = await proxy.start()
    try:
        async with AsyncClient(target) as client:
            stream = client.bulk_embed(texts, batch_size=64, window=8, on_invalid="skip", skipped=skipped)
            results = await listed(stream)
    finally:
        await proxy.close()
    assert proxy.cuts == 1
    assert proxy.connections >= 2
    assert [i for i, result in enumerate(results) if result is None] == sorted(bad)
    assert [index for index, _ in skipped] == sorted(bad)
    sample = [i for i in range(0, count, 97) if i not in bad]
    async with AsyncClient(server.address) as client:
        expected = await client.embed([texts[i] for i in sample])
    np.testing.assert_allclose(stacked(results, sample), expected, atol=1e-5)


def test_sync_client_skips_and_reports_bad_inputs_in_place(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = corpus({1: "", 70: "", 71: ""}, 150)
    skipped: list[tuple[int, InvalidArgumentError]] = []
    with Client(server.address) as client:
        results = list(client.bulk_embed(texts, batch_size=32, on_invalid="skip", skipped=skipped, progress=True))
        expected = client.embed([texts[0], texts[2], texts[149]])
        with pytest.raises(InvalidArgumentError) as caught:
            list(client.bulk_embed(texts, batch_size=32))
    assert [i for i, result in enumerate(results) if result is None] == [1, 70, 71]
    assert [index for index, _ in skipped] == [1, 70, 71]
    np.testing.assert_allclose(stacked(results, [0, 2, 149]), expected, atol=1e-5)
    assert "skipped=3" in capsys.readouterr().err
    assert caught.value.index == 1
