"""Per-model dynamic batching: a bounded queue of items from all requests, cut into
length-sorted batches under a size and a token budget, run one at a time in a worker thread.

Knows nothing of protobuf or models: items are opaque, each with a length in tokens, and a
`run_batch` callable turns a list of items into one result per item.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from embedserve.errors import (
    CancelledRequestError,
    DeadlineExpiredError,
    EmbedServeError,
    EngineFailedError,
    OverloadedError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchLimits:
    """How big one forward pass may be."""

    max_batch_size: int
    max_batch_tokens: int
    # Whether a batch costs longest x size (padded) or the sum of lengths (a backend that packs
    # inputs without padding, as TEI's flash-attention ones do; none of ours does today).
    padded: bool = True
    # From the backend: what one more batch costs beyond its tokens, in token-equivalents.
    batch_overhead_tokens: int = 32
    # A window of up to this many batches' worth of waiting items is sorted by length
    # before batches are cut from it; larger = less padding, coarser fairness.
    window_batches: int = 4

    def cost(self, longest: int, total: int, count: int) -> int:
        """Tokens a batch of `count` items costs the backend."""
        return longest * count if self.padded else total


class Job(Generic[T, R]):
    """One request's items for one model, and the future its caller awaits."""

    def __init__(self, items: Sequence[T], lengths: Sequence[int], deadline: float | None = None) -> None:
        if len(items) != len(lengths) or not items:
            raise ValueError("a job needs one length per item and at least one item")
        self.items = items
        self.lengths = lengths
        self.size = len(items)
        self.deadline = deadline  # time.monotonic() value, or None
        # Longest-last order within the job, so consecutive windows of a large job hold
        # inputs of similar length.
        self.order = sorted(range(self.size), key=lengths.__getitem__)
        self.cursor = 0  # next position in `order` to hand to a window
        self.results: dict[int, R] = {}  # by position; complete when uncomputed is 0
        self.uncomputed = self.size
        self.future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self.admitted_at = time.monotonic()
        self.last_batch_started_at = self.admitted_at
        self.inference_s = 0.0

    @property
    def done(self) -> bool:
        """True once the job has its results or its error."""
        return self.future.done()

    def expired(self, now: float) -> bool:
        """True when the caller's deadline has passed."""
        return self.deadline is not None and now >= self.deadline


Item = tuple[Job[T, R], int]


class Scheduler(Generic[T, R]):
    """Batches items of many jobs for one model and runs them in a worker thread."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], Sequence[R]],
        limits: BatchLimits,
        queue_size: int,
        pipeline_depth: int = 2,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.limits = limits
        self.queue_size = queue_size
        # Batches handed to the worker thread at once: the next one is ready to run the
        # moment the current one ends, so the device never waits for the event loop.
        self._depth = pipeline_depth
        self.on_failure = on_failure
        self._waiting: collections.deque[Job[T, R]] = collections.deque()  # items not yet in a window
        self._ready: collections.deque[list[Item[T, R]]] = collections.deque()  # batches cut, not started
        self._live: set[Job[T, R]] = set()
        self._queued = 0  # admitted items not yet computed or dropped
        self._space_waiters: collections.deque[tuple[Job[T, R], asyncio.Future[None]]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    # -- admission ---------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Items admitted and not yet computed."""
        return self._queued

    def _crashed(self) -> EngineFailedError:
        return EngineFailedError(f"the worker for model {self.name} crashed: {self.failure!r}")

    def _check_healthy(self) -> None:
        if self.failure is not None:
            raise self._crashed()

    def submit_nowait(self, job: Job[T, R]) -> None:
        """Admits a job or fails fast with OverloadedError when the queue cannot take it."""
        self._check_healthy()
        if self._queued + job.size > self.queue_size or self._space_waiters:
            raise OverloadedError(
                f"model {self.name} has {self._queued} inputs queued and takes at most "
                f"{self.queue_size}: retry later with backoff, or send fewer inputs at once"
            )
        self._admit(job)

    async def submit(self, job: Job[T, R]) -> None:
        """Admits a job, waiting (first come, first served) until the queue has room."""
        self._check_healthy()
        if job.size > self.queue_size:
            raise OverloadedError(f"{job.size} inputs can never fit a queue of {self.queue_size}")
        if not self._space_waiters and self._queued + job.size <= self.queue_size:
            self._admit(job)
            return
        # The waker admits the job itself before resolving the waiter, so room freed twice
        # in one loop turn is never handed out twice.
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (job, waiter)
        self._space_waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if entry in self._space_waiters:
                self._space_waiters.remove(entry)
                self._wake_space_waiters()
            else:
                self.cancel(job)  # admitted just before the caller went away: hand the room back
            raise

    def _admit(self, job: Job[T, R]) -> None:
        self._queued += job.size
        self._live.add(job)
        self._waiting.append(job)
        self._wakeup.set()

    def _wake_space_waiters(self) -> None:
        while self._space_waiters:
            job, waiter = self._space_waiters[0]
            if waiter.done():  # its caller was cancelled; it removes itself
                self._space_waiters.popleft()
                continue
            if self.failure is not None:
                self._space_waiters.popleft()
                waiter.set_exception(self._crashed())
                continue
            if self._queued + job.size > self.queue_size:
                break
            self._space_waiters.popleft()
            self._admit(job)
            waiter.set_result(None)

    def cancel(self, job: Job[T, R]) -> None:
        """Drops a job whose caller went away; its items never reach the model."""
        self._retire(job, CancelledRequestError("the request was cancelled"))

    def _retire(self, job: Job[T, R], error: EmbedServeError) -> None:
        if job not in self._live:
            return
        self._live.discard(job)
        self._queued -= job.uncomputed
        job.uncomputed = 0
        if not job.future.done():
            job.future.set_exception(error)
            job.future.exception()  # mark retrieved: a cancelled caller never reads it
        self._wake_space_waiters()

    # -- batching ----------------------------------------------------------------------

    def _cut_window(self) -> list[Item[T, R]]:
        """Takes up to a window of items, an equal share from every waiting job, so a small
        request behind a large one waits for one window, not for the whole large one."""
        now = time.monotonic()
        jobs = []
        for job in self._waiting:
            if job not in self._live:
                continue
            if job.expired(now):
                self._retire(job, DeadlineExpiredError("the deadline passed while the request was queued"))
                continue
            jobs.append(job)
        room = self.limits.max_batch_size * self.limits.window_batches
        takes = {job: 0 for job in jobs}
        active = jobs
        while room > 0 and active:
            share = max(1, room // len(active))
            still = []
            for job in active:
                left = job.size - job.cursor - takes[job]
                n = min(share, left, room)
                takes[job] += n
                room -= n
                if left > n:
                    still.append(job)
                if room == 0:
                    break
            active = still
        window: list[Item[T, R]] = []
        for job in jobs:
            n = takes[job]
            window.extend((job, pos) for pos in job.order[job.cursor : job.cursor + n])
            job.cursor += n
        self._waiting = collections.deque(job for job in jobs if job.cursor < job.size)
        return window

    def _cut_batches(self, window: list[Item[T, R]]) -> list[list[Item[T, R]]]:
        """Sorts a window by length and cuts it where the total cost is least: padded tokens
        plus the backend's fixed cost per batch, within the size and token budget."""
        window.sort(key=lambda item: item[0].lengths[item[1]])
        lengths = [job.lengths[pos] for job, pos in window]
        limits = self.limits
        count = len(window)
        # best[j]: least cost of batching the first j items; cut[j]: where its last batch starts.
        best = [0] + [0] * count
        cut = [0] * (count + 1)
        for end in range(1, count + 1):
            longest = lengths[end - 1]  # sorted: the last item of a batch is its longest
            best_cost = -1
            total = 0
            for start in range(end - 1, max(-1, end - 1 - limits.max_batch_size), -1):
                total += lengths[start]
                size = end - start
                tokens = limits.cost(longest, total, size)
                if tokens > limits.max_batch_tokens and size > 1:
                    break
                cost = best[start] + tokens + limits.batch_overhead_tokens
                if best_cost < 0 or cost <= best_cost:  # ties go to the larger batch
                    best_cost, cut[end] = cost, start
            best[end] = best_cost
        batches: list[list[Item[T, R]]] = []
        end = count
        while end > 0:
            batches.append(window[cut[end] : end])
            end = cut[end]
        batches.reverse()
        return batches

    def _next_batch(self) -> list[Item[T, R]] | None:
        """Returns the next batch to run, without items of jobs that are gone or expired."""
        now = time.monotonic()
        while True:
            if not self._ready:
                window = self._cut_window()
                if not window:
                    return None
                self._ready.extend(self._cut_batches(window))
            batch = []
            for job, pos in self._ready.popleft():
                if job in self._live and job.expired(now):
                    self._retire(job, DeadlineExpiredError("the deadline passed while the request was queued"))
                if job in self._live:
                    batch.append((job, pos))
            if batch:
                return batch

    # -- the worker --------------------------------------------------------------------

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler-{self.name}")
        self._task.add_done_callback(self._loop_ended)

    def _timed_run(self, items: list[T]) -> tuple[Sequence[R], float, float]:
        started = time.monotonic()
        results = self._run_batch(items)
        return results, started, time.monotonic()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        inflight: collections.deque[tuple[list[Item[T, R]], asyncio.Future[tuple[Sequence[R], float, float]]]]
        inflight = collections.deque()
        while True:
            while len(inflight) < self._depth:
                batch = self._next_batch()
                if batch is None:
                    break
                items = [job.items[pos] for job, pos in batch]
                inflight.append((batch, loop.run_in_executor(self._executor, self._timed_run, items)))
            if not inflight:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, future = inflight.popleft()
            try:
                results, started, ended = await future
                if len(results) != len(batch):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(batch)} inputs")
            except Exception as exc:
                log.exception("forward pass failed for model %s", self.name)
                for job in {job for job, _ in batch}:
                    self._retire(job, EngineFailedError(f"the forward pass of model {self.name} failed: {exc!r}"))
                continue
            self._deliver(batch, results, started, ended)

    def _deliver(self, batch: list[Item[T, R]], results: Sequence[R], started: float, ended: float) -> None:
        touched = set()
        for (job, pos), result in zip(batch, results, strict=True):
            if job not in self._live:
                continue  # cancelled or expired while its batch ran; already accounted
            job.results[pos] = result
            job.uncomputed -= 1
            self._queued -= 1
            touched.add(job)
        for job in touched:
            job.inference_s += ended - started
            job.last_batch_started_at = max(job.last_batch_started_at, started)
            if job.uncomputed == 0:
                self._live.discard(job)
                if not job.future.done():  # a caller may have cancelled the future itself
                    job.future.set_result([job.results[pos] for pos in range(job.size)])
        self._wake_space_waiters()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        error: BaseException | None = asyncio.CancelledError() if task.cancelled() else task.exception()
        if error is None:
            return
        if not task.cancelled():
            log.critical("batching loop of model %s crashed", self.name, exc_info=error)
        self.failure = error
        for job in list(self._live):
            self._retire(job, EngineFailedError(f"the worker for model {self.name} stopped: {error!r}"))
        self._wake_space_waiters()
        if self.on_failure is not None and not task.cancelled():
            self.on_failure(error)

    async def close(self) -> None:
        """Stops the loop; any job still waiting fails with EngineFailedError."""
        try:
            if self._task is not None and not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            # The current forward pass may still run: wait for it off the event loop.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
