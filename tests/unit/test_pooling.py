"""Pooling token outputs into one vector per input, and L2 normalization."""

from __future__ import annotations

import numpy as np
import pytest

from embedserve.engine.pooling import normalize, pool

# Two inputs, four token slots, hidden size 3. Row 0 has 4 real tokens, row 1 has 2 and
# 2 padding slots whose values are large so that any leak into the result shows.
HIDDEN = np.array(
    [
        [[1.0, 2.0, 3.0], [3.0, 0.0, -1.0], [5.0, 4.0, 1.0], [-1.0, 2.0, 5.0]],
        [[2.0, -2.0, 0.0], [4.0, 6.0, 2.0], [100.0, 100.0, 100.0], [-100.0, -100.0, -100.0]],
    ],
    dtype=np.float32,
)
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=np.int64)


def test_mean_pooling_averages_only_real_tokens() -> None:
    pooled = pool(HIDDEN, MASK, "mean")
    by_hand = np.array([[(1 + 3 + 5 - 1) / 4, (2 + 0 + 4 + 2) / 4, (3 - 1 + 1 + 5) / 4], [3.0, 2.0, 1.0]])
    np.testing.assert_allclose(pooled, by_hand, rtol=1e-6)
    assert pooled.dtype == np.float32
    assert pooled.shape == (2, 3)


def test_mean_pooling_of_a_row_is_independent_of_how_much_padding_follows() -> None:
    alone = pool(HIDDEN[1:, :2, :], MASK[1:, :2], "mean")
    padded = pool(HIDDEN[1:], MASK[1:], "mean")
    np.testing.assert_allclose(padded, alone, rtol=1e-6)


def test_mean_pooling_of_a_fully_masked_row_is_zero_not_nan() -> None:
    pooled = pool(HIDDEN, np.zeros_like(MASK), "mean")
    assert np.all(np.isfinite(pooled))
    np.testing.assert_array_equal(pooled, 0.0)


def test_cls_pooling_takes_the_first_token() -> None:
    pooled = pool(HIDDEN, MASK, "cls")
    np.testing.assert_array_equal(pooled, HIDDEN[:, 0, :])
    assert pooled.dtype == np.float32 and pooled.flags.c_contiguous


def test_lasttoken_pooling_takes_the_last_real_token_of_each_row() -> None:
    pooled = pool(HIDDEN, MASK, "lasttoken")
    np.testing.assert_array_equal(pooled, np.stack([HIDDEN[0, 3], HIDDEN[1, 1]]))
    assert pooled.flags.c_contiguous


def test_max_pooling_ignores_padding() -> None:
    pooled = pool(HIDDEN, MASK, "max")
    np.testing.assert_array_equal(pooled, [[5.0, 4.0, 5.0], [4.0, 6.0, 2.0]])
    assert pooled.dtype == np.float32


def test_max_pooling_keeps_negative_maxima() -> None:
    hidden = (-np.abs(HIDDEN) - 1.0).astype(np.float32)
    pooled = pool(hidden, MASK, "max")
    np.testing.assert_array_equal(pooled[1], np.maximum(hidden[1, 0], hidden[1, 1]))


def test_normalize_gives_unit_rows_in_the_same_direction() -> None:
    vectors = np.array([[3.0, 4.0, 0.0], [1e-3, -2e-3, 2e-3], [-10.0, 0.0, 0.0]], dtype=np.float32)
    unit = normalize(vectors)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit[0], [0.6, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_allclose(unit[2], [-1.0, 0.0, 0.0])
    assert unit.dtype == np.float32


def test_normalize_keeps_zero_rows_zero() -> None:
    unit = normalize(np.array([[0.0, 0.0], [0.0, 2.0]], dtype=np.float32))
    assert np.all(np.isfinite(unit))
    np.testing.assert_array_equal(unit, [[0.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken", "max"])
def test_every_mode_returns_one_float32_vector_per_input(mode: str) -> None:
    pooled = pool(HIDDEN, MASK, mode)  # type: ignore[arg-type]
    assert pooled.shape == (2, 3) and pooled.dtype == np.float32
