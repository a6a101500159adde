"""Per-model dynamic batching: a bounded queue of items from all requests, cut into
length-sorted batches under a size and a token budget, run on worker threads (one forward pass
each, `workers` at once).

Admission comes before any cost is paid: a request holds room (a `Ticket`, its tokens estimated
from its length) before it is tokenized, and each lane's queue takes work while it holds fewer
than `queue_tokens` tokens (seconds of work at the measured throughput) and `queue_size` inputs.
A unary request that finds its lane full is refused at once, with when to retry; a stream's
waits, first come, first served.

Two lanes: interactive work (a few inputs a caller waits on) and bulk work. Interactive work
either runs on a worker thread of its own, alongside bulk batches (`Lanes.alongside`, what a CPU
gets: a query never waits for a bulk batch, and bulk batches stay full), or goes first, in the
next batch a worker starts: then, while interactive work may arrive, bulk batches are cut to a
time target (measured by `BatchCost`), and a bulk batch handed to a worker but not yet started
gives its place back to an interactive one, so a query waits for at most one short batch. Bulk
keeps a minimum share of the forward time under an interactive flood, and windows give equal
shares to every tenant, then to every stream of a tenant, then to every job of a stream.

Knows nothing of protobuf or models: items are opaque, each with a length in tokens, and a
`run_batch` callable turns a list of items into one result per item.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from embedserve.engine.batching import BatchLimits, cut_batches, window_shares
from embedserve.engine.cost import BatchCost
from embedserve.engine.threads import lower_priority
from embedserve.engine.types import Priority
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

__all__ = ["BatchLimits", "Job", "Lanes", "Scheduler", "SchedulerObserver", "Ticket"]


class SchedulerObserver(Protocol):
    """What a scheduler reports as it works, to whoever watches it (the server's metrics), so
    that it need not know who that is. Called on the event loop; must not raise."""

    def ran(self, lane: Priority, inputs: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        """A forward pass of `inputs` inputs of `tokens` tokens, padded to `padded_tokens` (the
        longest input x `inputs`), took `seconds`."""

    def shed(self, reason: str) -> None:
        """A request was refused (OverloadedError) for want of room in its lane: `reason` names
        the limit, `queue_inputs` (QUEUE_SIZE), `queue_tokens` (QUEUE_SECONDS) or `streams_waiting`
        (bulk unary work holds half the queue while streams wait for room)."""


@dataclass(frozen=True)
class Lanes:
    """How interactive and bulk work share the model."""

    # While interactive work may arrive, a bulk batch is cut to take at most this long (None: no
    # limit); bulk runs at full batch size when no interactive request came for `hold_s`.
    bulk_batch_s: float | None = None
    hold_s: float = 5.0
    # Share of the forward time bulk keeps while both lanes have work.
    bulk_min_share: float = 0.2
    # Time constant of the forward-time shares, in seconds.
    share_window_s: float = 1.0
    # Interactive batches run on a worker thread of their own, alongside bulk ones, instead of
    # before the next bulk batch: a query never waits for a bulk batch, and bulk batches stay full.
    alongside: bool = False


class Job(Generic[T, R]):
    """One request's items for one model, and the future its caller awaits."""

    def __init__(
        self,
        items: Sequence[T],
        lengths: Sequence[int],
        deadline: float | None = None,
        priority: Priority = Priority.BULK,
        tenant: str = "",
        flow: object | None = None,
    ) -> None:
        if len(items) != len(lengths) or not items:
            raise ValueError("a job needs one length per item and at least one item")
        self.items = items
        self.priority = priority
        self.tenant = tenant  # who sent it: windows give every tenant an equal share
        self.flow = self if flow is None else flow  # its stream: then every stream of a tenant
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
        self.unary = False  # a unary request's (refused when there is no room), not a stream's (waits)
        self.tokens_left = 0  # tokens of the items not yet computed, from admission on

    @property
    def done(self) -> bool:
        """True once the job has its results or its error."""
        return self.future.done()

    def expired(self, now: float) -> bool:
        """True when the caller's deadline has passed."""
        return self.deadline is not None and now >= self.deadline


Item = tuple[Job[T, R], int]


@dataclass
class Handed(Generic[T, R]):
    """A batch handed to the worker thread, and the future of its run."""

    batch: list[Item[T, R]]
    lane: Priority
    future: concurrent.futures.Future[tuple[Sequence[R], float, float]]


@dataclass(eq=False)
class Ticket:
    """Room in the queue held for one request: from before its texts are tokenized (an estimate
    of its tokens, from their lengths) until its job is admitted (its real tokens) or the room is
    given back. A request is refused or made to wait on these cheap facts, before any cost is paid."""

    inputs: int
    tokens: int
    lane: Priority
    unary: bool  # a unary request (refused when there is no room) rather than a stream's (waits)
    held: bool = False


class Scheduler(Generic[T, R]):
    """Batches items of many jobs for one model and runs them in a worker thread."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], Sequence[R]],
        limits: BatchLimits,
        queue_size: int,
        pipeline_depth: int = 2,
        workers: int = 1,
        on_failure: Callable[[BaseException], None] | None = None,
        lanes: Lanes | None = None,
        cost: BatchCost | None = None,
        queue_tokens: int | None = None,
        tokens_per_s: float | None = None,
        queue_seconds: float | None = None,
        rate_window_s: float = 2.0,
        niceness: int = 0,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.limits = limits
        # Each lane's queue holds at most queue_size inputs, and takes more work only while it holds
        # fewer than queue_tokens tokens (None: no limit); tokens_per_s turns tokens into seconds.
        self.queue_size = queue_size
        self._queue_tokens = queue_tokens
        self.tokens_per_s = tokens_per_s
        # With queue_seconds, the limit in tokens follows the bulk throughput: the startup
        # measurement at first, then what saturated bulk work really gets through, per window of
        # rate_window_s (under load a pass takes longer than alone: the other workers, the event
        # loop and the tokenizer share the cores).
        self.queue_seconds = queue_seconds
        self._rate_window_s = rate_window_s
        # Never below half the startup measurement: a window starved by a neighbour on the cores
        # must not shrink the queue to nothing (overload runs served half the startup rate).
        self._rate_floor = 0.5 * tokens_per_s if tokens_per_s else 0.0
        self._window: tuple[float, int] | None = None  # (start, bulk tokens delivered since)
        self.lanes = lanes or Lanes()
        # Measured forward-pass times by batch shape; bulk batches are cut to lanes.bulk_batch_s.
        self.cost = cost or BatchCost()
        # Bulk batches handed to the worker threads at once: one more than run at once, so the
        # next one is ready the moment one ends and the device never waits for the event loop.
        if workers < 1:
            raise ValueError("a scheduler needs at least one worker thread")
        self._depth = pipeline_depth + workers - 1
        self.on_failure = on_failure
        lanes_ = tuple(Priority)
        self._waiting: dict[Priority, collections.deque[Job[T, R]]] = {p: collections.deque() for p in lanes_}
        self._ready: dict[Priority, collections.deque[list[Item[T, R]]]] = {p: collections.deque() for p in lanes_}
        self._inflight: list[Handed[T, R]] = []  # handed to a worker thread, in the order handed
        self._busy_s = {p: 0.0 for p in lanes_}  # forward time per lane, decaying (share_window_s)
        self._busy_at = time.monotonic()
        self._last_interactive = -math.inf
        self._live: set[Job[T, R]] = set()
        # Inputs and tokens held per lane (tickets and admitted items not yet computed or dropped),
        # and of bulk's, those of unary requests.
        self._inputs = {p: 0 for p in lanes_}
        self._tokens = {p: 0 for p in lanes_}
        self._unary_inputs = 0
        self._unary_tokens = 0
        self._space_waiters: collections.deque[tuple[Ticket, asyncio.Future[None]]] = collections.deque()
        self._wakeup = asyncio.Event()
        # Bulk passes yield the cores to the event loop and to interactive passes (engine.threads).
        bulk = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"forward-{name}", initializer=lower_priority(niceness)
        )
        self._executors = {lane: bulk for lane in lanes_}
        if self.lanes.alongside:
            self._executors[Priority.INTERACTIVE] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"interactive-{name}"
            )
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self.observer: SchedulerObserver | None = None

    # -- admission ---------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Inputs held: admitted and not yet computed, or reserved for requests being tokenized."""
        return sum(self._inputs.values())

    def queued_inputs(self, lane: Priority) -> int:
        """Inputs a lane holds, as `queued` counts them for both."""
        return self._inputs[lane]

    def queued_tokens(self, lane: Priority) -> int:
        """Tokens a lane holds, as `queued` counts inputs."""
        return self._tokens[lane]

    def _crashed(self) -> EngineFailedError:
        return EngineFailedError(f"the worker for model {self.name} crashed: {self.failure!r}")

    def _check_healthy(self) -> None:
        if self.failure is not None:
            raise self._crashed()

    def _limit_reached(self, ticket: Ticket) -> str | None:
        """Which limit of its lane keeps a ticket out: "queue_inputs" when its inputs do not fit,
        "queue_tokens" when the lane already holds its tokens' limit (one request may take it past
        the limit, so that no legal request is too large to be admitted ever); None: room."""
        lane = ticket.lane
        if self._inputs[lane] + ticket.inputs > self.queue_size:
            return "queue_inputs"
        limit = self.queue_tokens
        if limit is not None and self._tokens[lane] >= limit:
            return "queue_tokens"
        return None

    def _has_room(self, ticket: Ticket) -> bool:
        return self._limit_reached(ticket) is None

    def _retry_after(self, lane: Priority) -> float:
        """Seconds until the lane's queue is back under its limit, at the measured throughput."""
        if self.queue_tokens is None or not self.tokens_per_s:
            return 1.0
        return max(1.0, (self._tokens[lane] - self.queue_tokens) / self.tokens_per_s)

    def _full(self, lane: Priority, limit: str) -> str:
        """What the lane holds against the limit that refused a ticket, in numbers."""
        if limit == "queue_inputs":
            return f"{self._inputs[lane]} inputs queued in its {lane.value} lane and takes at most {self.queue_size}"
        seconds = f", ~{self._tokens[lane] / self.tokens_per_s:.1f} s of work" if self.tokens_per_s else ""
        return (
            f"{self._tokens[lane]} tokens queued in its {lane.value} lane{seconds}, its limit of "
            f"{self.queue_tokens} (QUEUE_SECONDS)"
        )

    def reserve_nowait(self, inputs: int, tokens: int, lane: Priority) -> Ticket:
        """Holds room for a unary request of `inputs` inputs and about `tokens` tokens, or fails
        fast with OverloadedError (its retry_after_s: when room should free)."""
        self._check_healthy()
        ticket = Ticket(inputs, tokens, lane, unary=True)
        limit = self._limit_reached(ticket)
        if limit is not None:
            self._shed(limit)
            raise OverloadedError(
                f"model {self.name} has {self._full(lane, limit)}: retry later with backoff, or send fewer inputs "
                "at once",
                retry_after_s=self._retry_after(lane),
            )
        # A unary request that fits is admitted even while streams wait for room (they take room
        # the moment it frees, first come, first served); but then bulk unary work keeps at most
        # half of the queue, so that a flood of it cannot keep the waiting streams out for good.
        if self._space_waiters and lane is Priority.BULK:
            half_tokens = self.queue_tokens is not None and self._unary_tokens >= self.queue_tokens // 2
            if half_tokens or self._unary_inputs + inputs > self.queue_size // 2:
                self._shed("streams_waiting")
                raise OverloadedError(
                    f"model {self.name} has {self._unary_inputs} inputs ({self._unary_tokens} tokens) of unary "
                    f"requests queued, half of its queue, while streams wait for room: retry later with backoff",
                    retry_after_s=self._retry_after(lane),
                )
        self._hold(ticket)
        return ticket

    def _shed(self, reason: str) -> None:
        if self.observer is not None:
            self.observer.shed(reason)

    async def reserve(self, inputs: int, tokens: int, lane: Priority) -> Ticket:
        """Holds room for a stream's request, waiting (first come, first served) until there is."""
        self._check_healthy()
        if inputs > self.queue_size:
            self._shed("queue_inputs")
            raise OverloadedError(f"{inputs} inputs can never fit a queue of {self.queue_size}")
        ticket = Ticket(inputs, tokens, lane, unary=False)
        if not self._space_waiters and self._has_room(ticket):
            self._hold(ticket)
            return ticket
        # The waker holds the room itself before resolving the waiter, so room freed twice in
        # one loop turn is never handed out twice.
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (ticket, waiter)
        self._space_waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if entry in self._space_waiters:
                self._space_waiters.remove(entry)
                self._wake_space_waiters()
            else:
                self.release(ticket)  # room held just before the caller went away: give it back
            raise
        return ticket

    def _hold(self, ticket: Ticket) -> None:
        self._count(ticket.lane, ticket.unary, ticket.inputs, ticket.tokens)
        ticket.held = True

    def _count(self, lane: Priority, unary: bool, inputs: int, tokens: int) -> None:
        self._inputs[lane] += inputs
        self._tokens[lane] += tokens
        if unary and lane is Priority.BULK:
            self._unary_inputs += inputs
            self._unary_tokens += tokens

    def release(self, ticket: Ticket) -> None:
        """Gives back the room of a ticket whose request never became a job (it failed, or its
        caller went away, before it was admitted)."""
        if ticket.held:
            ticket.held = False
            self._count(ticket.lane, ticket.unary, -ticket.inputs, -ticket.tokens)
            self._wake_space_waiters()

    def admit(self, job: Job[T, R], ticket: Ticket) -> None:
        """Admits a job into the room its ticket held, which now counts the job's real tokens."""
        if not ticket.held:
            raise RuntimeError("a ticket admits one job, and only while it holds room")
        if self.failure is not None:
            self.release(ticket)
            raise self._crashed()
        ticket.held = False
        job.unary = ticket.unary
        job.tokens_left = sum(job.lengths)
        self._count(ticket.lane, ticket.unary, job.size - ticket.inputs, job.tokens_left - ticket.tokens)
        self._live.add(job)
        self._waiting[job.priority].append(job)
        if job.priority is Priority.INTERACTIVE:
            self._last_interactive = time.monotonic()
            self._refill()  # into the worker's next slot now, ahead of a bulk batch parked there
        self._wakeup.set()
        if job.tokens_left < ticket.tokens:  # the estimate was high: room freed
            self._wake_space_waiters()

    def submit_nowait(self, job: Job[T, R]) -> None:
        """Admits a job or fails fast with OverloadedError when its lane cannot take it."""
        self.admit(job, self.reserve_nowait(job.size, sum(job.lengths), job.priority))

    async def submit(self, job: Job[T, R]) -> None:
        """Admits a job, waiting (first come, first served) until its lane has room."""
        self.admit(job, await self.reserve(job.size, sum(job.lengths), job.priority))

    def _wake_space_waiters(self) -> None:
        while self._space_waiters:
            ticket, waiter = self._space_waiters[0]
            if waiter.done():  # its caller was cancelled; it removes itself
                self._space_waiters.popleft()
                continue
            if self.failure is not None:
                self._space_waiters.popleft()
                waiter.set_exception(self._crashed())
                continue
            if not self._has_room(ticket):
                break
            self._space_waiters.popleft()
            self._hold(ticket)
            waiter.set_result(None)

    def cancel(self, job: Job[T, R]) -> None:
        """Drops a job whose caller went away; its items never reach the model."""
        self._retire(job, CancelledRequestError("the request was cancelled"))

    def _retire(self, job: Job[T, R], error: EmbedServeError) -> None:
        if job not in self._live:
            return
        self._live.discard(job)
        self._count(job.priority, job.unary, -job.uncomputed, -job.tokens_left)
        job.uncomputed = job.tokens_left = 0
        if not job.future.done():
            job.future.set_exception(error)
            job.future.exception()  # mark retrieved: a cancelled caller never reads it
        # A batch handed to a worker but not started, all of whose jobs are gone, never runs.
        for handed in list(self._inflight):
            if all(other not in self._live for other, _ in handed.batch) and handed.future.cancel():
                self._inflight.remove(handed)
        self._wake_space_waiters()

    # -- batching ----------------------------------------------------------------------

    def _cut_window(self, lane: Priority) -> list[Item[T, R]]:
        """Takes up to a window of a lane's items, a fair share from every waiting job (`window_shares`),
        so a small request behind a large one waits for one window, not for the whole large one."""
        now = time.monotonic()
        jobs = []
        for job in self._waiting[lane]:
            if job not in self._live:
                continue
            if job.expired(now):
                self._retire(job, DeadlineExpiredError("the deadline passed while the request was queued"))
                continue
            jobs.append(job)
        room = self.limits.max_batch_size * self.limits.window_batches
        window: list[Item[T, R]] = []
        for job, n in zip(jobs, window_shares(jobs, room), strict=True):
            window.extend((job, pos) for pos in job.order[job.cursor : job.cursor + n])
            job.cursor += n
        self._waiting[lane] = collections.deque(job for job in jobs if job.cursor < job.size)
        return window

    def _cut_batches(self, window: list[Item[T, R]]) -> list[list[Item[T, R]]]:
        """Sorts a window (of one lane) by length and cuts it where the total cost is least
        (`cut_batches`); bulk batches within the time target while interactive work may arrive."""
        window.sort(key=lambda item: item[0].lengths[item[1]])
        lengths = [job.lengths[pos] for job, pos in window]
        fits = self._fits(window[0][0].priority)
        return [window[start:end] for start, end in cut_batches(lengths, self.limits, fits)]

    def _fits(self, lane: Priority) -> Callable[[int, int], bool] | None:
        target = self.lanes.bulk_batch_s
        recent = time.monotonic() - self._last_interactive < self.lanes.hold_s
        if lane is Priority.INTERACTIVE or self.lanes.alongside or target is None or not recent or not self.cost.known:
            return None
        return lambda count, longest: self.cost.seconds(count, longest) <= target

    def _next_batch(self, lane: Priority) -> list[Item[T, R]] | None:
        """Returns a lane's next batch to run, without items of jobs that are gone or expired."""
        now = time.monotonic()
        ready = self._ready[lane]
        while True:
            if not ready:
                window = self._cut_window(lane)
                if not window:
                    return None
                ready.extend(self._cut_batches(window))
            batch = []
            for job, pos in ready.popleft():
                if job in self._live and job.expired(now):
                    self._retire(job, DeadlineExpiredError("the deadline passed while the request was queued"))
                if job in self._live:
                    batch.append((job, pos))
            if batch:
                return batch

    def _has_work(self, lane: Priority) -> bool:
        return bool(self._ready[lane]) or any(job in self._live for job in self._waiting[lane])

    def _lanes_in_order(self) -> tuple[Priority, Priority]:
        """Interactive first, unless bulk has work and is below its minimum share."""
        if self._bulk_share() < self.lanes.bulk_min_share and self._has_work(Priority.BULK):
            return Priority.BULK, Priority.INTERACTIVE
        return Priority.INTERACTIVE, Priority.BULK

    def _bulk_share(self) -> float:
        self._decay_busy(time.monotonic())
        total = sum(self._busy_s.values())
        return 1.0 if total == 0 else self._busy_s[Priority.BULK] / total

    def _decay_busy(self, now: float) -> None:
        factor = math.exp(-(now - self._busy_at) / self.lanes.share_window_s)
        self._busy_at = now
        for lane in self._busy_s:
            self._busy_s[lane] *= factor

    # -- the worker --------------------------------------------------------------------

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        self._loop_ref = asyncio.get_running_loop()
        self._task = self._loop_ref.create_task(self._loop(), name=f"scheduler-{self.name}")
        self._task.add_done_callback(self._loop_ended)

    def _timed_run(self, items: list[T]) -> tuple[Sequence[R], float, float]:
        started = time.monotonic()
        results = self._run_batch(items)
        return results, started, time.monotonic()

    def _ran(self, _: concurrent.futures.Future[tuple[Sequence[R], float, float]]) -> None:
        """A worker thread finished (or dropped) a batch: wake the loop."""
        loop = self._loop_ref
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wakeup.set)

    def _hand(self, batch: list[Item[T, R]], lane: Priority) -> None:
        items = [job.items[pos] for job, pos in batch]
        future = self._executors[lane].submit(self._timed_run, items)
        self._inflight.append(Handed(batch, lane, future))
        future.add_done_callback(self._ran)

    def _handed(self, lane: Priority) -> int:
        return sum(1 for handed in self._inflight if handed.lane is lane)

    def _refill(self) -> None:
        """Hands batches to the workers up to the pipeline depth."""
        if self._task is None or self.failure is not None:
            return
        if self.lanes.alongside:
            self._refill_alongside()
        else:
            self._refill_shared()

    def _refill_alongside(self) -> None:
        """Each lane fills its own worker thread, bulk to the pipeline depth; interactive one batch at
        a time (its batches are small, and the next is cut the moment one ends)."""
        for lane, depth in ((Priority.INTERACTIVE, 1), (Priority.BULK, self._depth)):
            while self._handed(lane) < depth:
                batch = self._next_batch(lane)
                if batch is None:
                    break
                self._hand(batch, lane)

    def _refill_shared(self) -> None:
        """One worker thread for both lanes. An interactive batch takes the place of a bulk batch
        handed over but not started, which goes back to the front of its lane."""
        if self._inflight and self._has_work(Priority.INTERACTIVE):
            parked = self._inflight[-1]  # cancel() refuses a batch that has started
            if parked.lane is Priority.BULK and parked.future.cancel():
                self._inflight.pop()
                self._ready[Priority.BULK].appendleft(parked.batch)
        while len(self._inflight) < self._depth:
            for lane in self._lanes_in_order():
                batch = self._next_batch(lane)
                if batch is not None:
                    self._hand(batch, lane)
                    break
            else:
                return

    async def _loop(self) -> None:
        while True:
            self._refill()
            finished = [handed for handed in self._inflight if handed.future.done()]
            if not finished:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            for handed in finished:
                self._inflight.remove(handed)
                self._finish(handed)

    def _finish(self, handed: Handed[T, R]) -> None:
        """Delivers a finished batch's results, or fails its jobs when the forward pass failed."""
        try:
            results, started, ended = handed.future.result()
            if len(results) != len(handed.batch):
                raise RuntimeError(f"backend returned {len(results)} results for {len(handed.batch)} inputs")
        except Exception as exc:
            log.exception("forward pass failed for model %s", self.name)
            for job in {job for job, _ in handed.batch}:
                self._retire(job, EngineFailedError(f"the forward pass of model {self.name} failed: {exc!r}"))
            return
        self._account(handed, started, ended)
        self._deliver(handed.batch, results, started, ended)
        if handed.lane is Priority.BULK:
            self._measure_rate(sum(job.lengths[pos] for job, pos in handed.batch), ended)

    @property
    def queue_tokens(self) -> int | None:
        """Tokens a lane may hold before it refuses work: QUEUE_SECONDS at the bulk throughput,
        or the fixed number the scheduler was made with (None: no limit)."""
        if self.queue_seconds and self.tokens_per_s:
            return max(1, round(self.tokens_per_s * self.queue_seconds))
        return self._queue_tokens

    def _measure_rate(self, tokens: int, ended: float) -> None:
        """Bulk tokens delivered per second while bulk work kept waiting (the lane was never
        empty), blended into tokens_per_s once per window; a window with idle time says nothing
        of the throughput, and starts over."""
        if self._tokens[Priority.BULK] <= 0:
            self._window = None  # idle: what came through was all there was
            return
        if self._window is None:
            self._window = (ended, 0)
            return
        start, delivered = self._window
        delivered += tokens
        if ended - start < self._rate_window_s:
            self._window = (start, delivered)
            return
        measured = delivered / (ended - start)
        blended = measured if not self.tokens_per_s else 0.5 * self.tokens_per_s + 0.5 * measured
        self.tokens_per_s = max(self._rate_floor, blended)
        self._window = (ended, 0)

    def _account(self, handed: Handed[T, R], started: float, ended: float) -> None:
        """Feeds a finished batch's time to the cost model and the lanes' shares."""
        batch = handed.batch
        longest = max(job.lengths[pos] for job, pos in batch)
        self.cost.observe(len(batch), longest, ended - started)
        if self.observer is not None:
            tokens = sum(job.lengths[pos] for job, pos in batch)
            self.observer.ran(handed.lane, len(batch), tokens, longest * len(batch), ended - started)
        self._decay_busy(ended)
        self._busy_s[handed.lane] += ended - started
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "model %s: %s batch of %d (longest %d tokens) in %.1f ms, predicted %.1f ms",
                self.name,
                handed.lane.value,
                len(batch),
                longest,
                (ended - started) * 1e3,
                self.cost.seconds(len(batch), longest) * 1e3,
            )

    def _deliver(self, batch: list[Item[T, R]], results: Sequence[R], started: float, ended: float) -> None:
        touched = set()
        for (job, pos), result in zip(batch, results, strict=True):
            if job not in self._live:
                continue  # cancelled or expired while its batch ran; already accounted
            job.results[pos] = result
            job.uncomputed -= 1
            job.tokens_left -= job.lengths[pos]
            self._count(job.priority, job.unary, -1, -job.lengths[pos])
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
        for handed in self._inflight:
            handed.future.cancel()
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
            for executor in set(self._executors.values()):
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
