"""Cutting batches: a window of waiting items taken in fair shares (per tenant, per stream, per job),
sorted by length, and cut where padding plus the cost of another forward pass is least."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BatchLimits:
    """How big one forward pass may be."""

    max_batch_size: int
    max_batch_tokens: int
    # Whether a batch costs longest x size (padded) or the sum of lengths (a backend that packs
    # inputs without padding, as TEI's flash-attention ones do; none of ours does today).
    padded: bool = True
    # What one more forward pass costs beyond its tokens, in token-equivalents (measured at startup).
    batch_overhead_tokens: int = 32
    # A window of up to this many batches' worth of waiting items is sorted by length
    # before batches are cut from it; larger = less padding, coarser fairness.
    window_batches: int = 4

    def cost(self, longest: int, total: int, count: int) -> int:
        """Tokens a batch of `count` items costs the backend."""
        return longest * count if self.padded else total


class Waiting(Protocol):
    """What window cutting reads of a job: who sent it, on which stream (any hashable that is
    the same for the jobs of one stream, and unique to a unary request), how many items are left."""

    tenant: str
    flow: object
    size: int
    cursor: int


def water_fill(wants: Sequence[int], room: int) -> list[int]:
    """Splits `room` into equal shares, none above what its taker wants; what one cannot use goes
    to the others. When room is short of one each, the first takers (the oldest) get it."""
    takes = [0] * len(wants)
    active = [i for i, want in enumerate(wants) if want > 0]
    while room > 0 and active:
        share = max(1, room // len(active))
        still = []
        for i in active:
            n = min(share, wants[i] - takes[i], room)
            takes[i] += n
            room -= n
            if takes[i] < wants[i]:
                still.append(i)
            if room == 0:
                break
        active = still
    return takes


def window_shares(jobs: Sequence[Waiting], room: int) -> list[int]:
    """How many items each job gives the next window: equal shares per tenant, then per stream
    of a tenant, then per job of a stream, so neither one tenant's many streams nor one stream's
    many requests in flight crowd out the others."""
    return _nested_shares([(job.tenant, job.flow) for job in jobs], [job.size - job.cursor for job in jobs], room)


def _nested_shares(keys: Sequence[tuple[object, ...]], left: Sequence[int], room: int) -> list[int]:
    if not keys or not keys[0]:
        return water_fill(left, room)
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key[0], []).append(i)
    takes = [0] * len(keys)
    rooms = water_fill([sum(left[i] for i in members) for members in groups.values()], room)
    for members, group_room in zip(groups.values(), rooms, strict=True):
        inner = _nested_shares([keys[i][1:] for i in members], [left[i] for i in members], group_room)
        for i, n in zip(members, inner, strict=True):
            takes[i] = n
    return takes


def cut_batches(
    lengths: Sequence[int], limits: BatchLimits, fits: Callable[[int, int], bool] | None = None
) -> list[tuple[int, int]]:
    """Cuts items sorted by length into batches where the total cost is least: padded tokens plus
    the backend's fixed cost per batch, within the size and token budget and, when given,
    `fits(count, longest)` (a time target). Returns (start, end) of each batch, in order."""
    count = len(lengths)
    # best[j]: least cost of batching the first j items; cut[j]: where its last batch starts.
    best = [0] * (count + 1)
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = lengths[end - 1]  # sorted: the last item of a batch is its longest
        best_cost = -1
        total = 0
        for start in range(end - 1, max(-1, end - 1 - limits.max_batch_size), -1):
            total += lengths[start]
            size = end - start
            tokens = limits.cost(longest, total, size)
            too_big = tokens > limits.max_batch_tokens or (fits is not None and not fits(size, longest))
            if too_big and size > 1:
                break
            cost = best[start] + tokens + limits.batch_overhead_tokens
            if best_cost < 0 or cost <= best_cost:  # ties go to the larger batch
                best_cost, cut[end] = cost, start
        best[end] = best_cost
    spans = []
    end = count
    while end > 0:
        spans.append((cut[end], end))
        end = cut[end]
    spans.reverse()
    return spans
