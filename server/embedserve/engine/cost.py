"""What a forward pass costs, as a function of the batch's shape, measured on the backend."""

from __future__ import annotations

import time

import numpy as np

from embedserve.backends.base import Backend

# (count, longest, seconds) of one timed forward pass.
Measured = tuple[int, int, float]

# Features are scaled so that the fit is well conditioned: thousands of tokens, and millions of
# token x length (attention grows with the square of the length).
_SCALE = np.array([1.0, 1e-3, 1e-6])


def _features(count: int, longest: int) -> np.ndarray:
    tokens = count * longest
    features: np.ndarray = np.array([1.0, tokens, tokens * longest]) * _SCALE
    return features


def _weighted(count: int, longest: int, seconds: float) -> tuple[np.ndarray, float]:
    # Each measurement is divided by its time, so that the fit minimizes relative errors: a
    # small batch's time matters as much as a large one's.
    weight = 1.0 / max(seconds, 1e-5)
    return _features(count, longest) * weight, seconds * weight


class BatchCost:
    """Seconds of one forward pass ~ a + b * tokens + c * tokens * longest (tokens = count x
    longest, padded), fitted by least squares of relative errors to the batches measured at
    startup (kept with a fixed weight) and to the ones served since (recent ones weigh most).
    Refitted when a prediction is asked for, not on every batch: a bulk-only load asks for none."""

    def __init__(self, decay: float = 0.98, startup_weight: float = 8.0) -> None:
        self._decay = decay
        self._startup_weight = startup_weight
        self._base = (np.zeros((3, 3)), np.zeros(3), 0)  # startup measurements
        self._recent = (np.zeros((3, 3)), np.zeros(3))
        # The coefficients (seconds, per token, per token x length), None before any measurement;
        # stale once a batch was observed since the last fit.
        self._abc: tuple[float, float, float] | None = None
        self._stale = False

    def calibrate(self, measured: list[Measured]) -> None:
        """Takes (count, longest, seconds) of batches run at startup."""
        xtx, xty = np.zeros((3, 3)), np.zeros(3)
        for count, longest, seconds in measured:
            x, y = _weighted(count, longest, seconds)
            xtx += np.outer(x, x)
            xty += x * y
        self._base = (xtx, xty, len(measured))
        self._stale = True

    def observe(self, count: int, longest: int, seconds: float) -> None:
        """Takes one batch served."""
        x, y = _weighted(count, longest, seconds)
        xtx, xty = self._recent
        self._recent = (xtx * self._decay + np.outer(x, x), xty * self._decay + x * y)
        self._stale = True

    def _fitted(self) -> tuple[float, float, float] | None:
        if self._stale:
            self._stale = False
            base_xtx, base_xty, measured = self._base
            weight = self._startup_weight / max(1, measured)
            xty = base_xty * weight + self._recent[1]
            if xty.any():
                fit = _non_negative_least_squares(base_xtx * weight + self._recent[0], xty) * _SCALE
                self._abc = (float(fit[0]), float(fit[1]), float(fit[2]))
        return self._abc

    def describe(self) -> str:
        """The fitted costs, for the startup log."""
        fitted = self._fitted()
        if fitted is None:
            return "not measured"
        a, b, c = fitted
        return f"{a * 1e3:.2f} ms + {b * 1e6:.1f} us/token + {c * 1e9:.2f} ns/token/length"

    @property
    def known(self) -> bool:
        """True once anything was measured."""
        return self._fitted() is not None

    def seconds(self, count: int, longest: int) -> float:
        """Predicted seconds of a batch of `count` inputs padded to `longest` tokens (0 unknown)."""
        fitted = self._fitted()
        if fitted is None:
            return 0.0
        a, b, c = fitted
        return a + (b + c * longest) * count * longest

    def overhead_tokens(self) -> int | None:
        """What one more forward pass costs beyond its tokens, in token-equivalents (a / b)."""
        fitted = self._fitted()
        if fitted is None or fitted[1] <= 0:
            return None
        a, b, _ = fitted
        return max(1, round(a / b))


def _non_negative_least_squares(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """The least-squares coefficients, none negative (costs are never negative), from the normal
    equations: the best of the fits restricted to each subset of the features (3 features, 7
    subsets), so that a negative coefficient is not merely clipped, which skews the others."""
    best, best_loss = np.zeros(3), 0.0
    for mask in range(1, 8):
        used = [i for i in range(3) if mask >> i & 1]
        solved = np.linalg.lstsq(xtx[np.ix_(used, used)], xty[used], rcond=None)[0]
        if (solved < 0).any():
            continue
        candidate = np.zeros(3)
        candidate[used] = solved
        loss = float(candidate @ xtx @ candidate - 2 * candidate @ xty)  # + y'y, the same for all
        if loss < best_loss:
            best, best_loss = candidate, loss
    return best


def warm_up(backend: Backend) -> None:
    """One small forward pass, untimed: the first one allocates what the runtime keeps, so that
    no request pays for it."""
    ids = np.full((1, 16), 100, dtype=np.int64)
    backend.forward(ids, np.ones_like(ids), np.zeros_like(ids))


def calibrate(backend: Backend, max_batch_size: int, max_tokens: int, max_batch_tokens: int) -> list[Measured]:
    """Times the backend's forward pass on a few batch shapes within the limits (the best of
    two runs each, after one untimed); what `BatchCost.calibrate` takes."""
    counts = sorted({1, min(4, max_batch_size), min(16, max_batch_size)})
    lengths = sorted({min(16, max_tokens), min(64, max_tokens), min(256, max_tokens)})
    # Up to 1,024 tokens a batch: enough to fit the per-token cost, quick at startup.
    shapes = [(c, n) for n in lengths for c in counts if c * n <= min(max_batch_tokens, 1024)]
    measured = []
    for count, longest in shapes:
        ids = np.full((count, longest), 100, dtype=np.int64)
        mask = np.ones((count, longest), dtype=np.int64)
        types = np.zeros((count, longest), dtype=np.int64)
        backend.forward(ids, mask, types)
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            backend.forward(ids, mask, types)
            runs.append(time.perf_counter() - started)
        measured.append((count, longest, min(runs)))
    return measured
