"""The batching scheduler, driven by a fake backend in its worker thread: batch limits,
length sorting, fairness, cancellation, deadlines, admission and failure handling; and its
lanes: queries go first and never wait behind a parked bulk batch, bulk keeps full batches
alone and a minimum share under a flood, tenants share equally, and bulk batches shrink to the
time target while queries arrive; or, with a worker of their own, queries run while a bulk
batch runs, and several bulk batches run at once."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from embedserve.engine.cost import BatchCost
from embedserve.engine.scheduler import BatchLimits, Job, Lanes, Scheduler
from embedserve.engine.types import Priority
from embedserve.errors import CancelledRequestError, DeadlineExpiredError, EngineFailedError, OverloadedError

TIMEOUT_S = 5.0  # nothing in this file should take more than a fraction of this


@dataclass(frozen=True)
class Item:
    """An opaque input as the scheduler sees it: which job, which position, how many tokens."""

    job: str
    index: int
    length: int


def value_of(item: Item) -> str:
    """What the fake backend computes for an item, so results can be traced to their inputs."""
    return f"{item.job}:{item.index}:{item.length}"


class FakeBackend:
    """A `run_batch` that records every batch, and can hold one in flight until released."""

    def __init__(self) -> None:
        self.batches: list[list[Item]] = []
        self.started = threading.Event()  # set when a batch reaches the backend
        self._release = threading.Event()
        self._release.set()
        self._held: Callable[[list[Item]], bool] = lambda batch: True
        self.fail_when: Callable[[list[Item]], bool] = lambda batch: False
        self.drop_one_when: Callable[[list[Item]], bool] = lambda batch: False

    def hold(self, only: Callable[[list[Item]], bool] | None = None) -> None:
        """Makes the next batches (those `only` picks, when given) block in their worker thread
        until `release()`."""
        self._held = only or (lambda batch: True)
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    async def wait_started(self) -> None:
        """Waits until a batch is in the worker thread (without blocking the event loop)."""
        assert await asyncio.to_thread(self.started.wait, TIMEOUT_S), "no batch reached the backend"

    def __call__(self, items: list[Item]) -> Sequence[str]:
        self.batches.append(list(items))
        self.started.set()
        if self._held(items):
            assert self._release.wait(TIMEOUT_S), "test never released the held batch"
        if self.fail_when(items):
            raise RuntimeError("device on fire")
        results = [value_of(item) for item in items]
        return results[:-1] if self.drop_one_when(items) else results

    def items_of(self, job: str) -> list[Item]:
        return [item for batch in self.batches for item in batch if item.job == job]


def make_job(tag: str, lengths: Sequence[int], deadline: float | None = None) -> Job[Item, str]:
    return Job([Item(tag, i, n) for i, n in enumerate(lengths)], list(lengths), deadline)


def expected(job: Job[Item, str]) -> list[str]:
    return [value_of(item) for item in job.items]


async def result_of(job: Job[Item, str]) -> list[str]:
    """Awaits a job's results; shielded so a timeout here cannot cancel the scheduler's future."""
    return await asyncio.wait_for(asyncio.shield(job.future), TIMEOUT_S)


async def error_of(job: Job[Item, str]) -> BaseException:
    """Awaits a job that must fail and returns its error."""
    try:
        await result_of(job)
    except Exception as exc:
        return exc
    raise AssertionError("the job succeeded but should have failed")


async def settle() -> None:
    """Lets every task that is ready to run take its turn on the event loop."""
    for _ in range(10):
        await asyncio.sleep(0)


@dataclass
class Harness:
    backend: FakeBackend
    scheduler: Scheduler[Item, str]
    failures: list[BaseException]


MakeScheduler = Callable[..., Harness]


@pytest.fixture
async def make_scheduler() -> AsyncIterator[MakeScheduler]:
    """Builds schedulers over fake backends; closes them all (releasing held batches) at the end."""
    made: list[Harness] = []

    def make(
        max_batch_size: int = 4,
        max_batch_tokens: int = 1_000_000,
        padded: bool = True,
        window_batches: int = 4,
        queue_size: int = 100_000,
        start: bool = True,
        **kwargs: Any,
    ) -> Harness:
        backend = FakeBackend()
        failures: list[BaseException] = []
        limits = BatchLimits(max_batch_size, max_batch_tokens, padded=padded, window_batches=window_batches)
        scheduler: Scheduler[Item, str] = Scheduler(
            "fake", backend, limits, queue_size, on_failure=failures.append, **kwargs
        )
        if start:
            scheduler.start()
        harness = Harness(backend, scheduler, failures)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.backend.release()
        await harness.scheduler.close()


# -- batch limits ----------------------------------------------------------------------


async def test_batches_never_exceed_max_batch_size(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=8)
    jobs = [make_job(f"j{k}", [5] * n) for k, n in enumerate([1, 7, 8, 9, 30, 100])]
    for job in jobs:
        h.scheduler.submit_nowait(job)
    for job in jobs:
        assert await result_of(job) == expected(job)
    assert max(len(batch) for batch in h.backend.batches) == 8
    assert sum(len(batch) for batch in h.backend.batches) == sum(job.size for job in jobs)


async def test_padded_batches_cost_longest_times_count_within_max_batch_tokens(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=64, max_batch_tokens=100, padded=True)
    lengths = random.Random(7).choices(range(1, 51), k=200)
    job = make_job("j", lengths)
    h.scheduler.submit_nowait(job)
    assert await result_of(job) == expected(job)
    for batch in h.backend.batches:
        assert max(item.length for item in batch) * len(batch) <= 100
    # The budget, not the size limit, is what cut these batches.
    assert max(len(batch) for batch in h.backend.batches) < 64


async def test_unpadded_batches_cost_the_sum_of_lengths(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=64, max_batch_tokens=100, padded=False)
    job = make_job("j", [10, 10, 10, 10, 10, 30, 30, 30, 30])
    h.scheduler.submit_nowait(job)
    assert await result_of(job) == expected(job)
    for batch in h.backend.batches:
        assert sum(item.length for item in batch) <= 100
    # Padded, [10 x 5, 30] would cost 30 x 6 = 180 > 100; unpadded it costs 80 and fits.
    assert [len(batch) for batch in h.backend.batches] == [6, 3]


def test_batch_limits_cost_is_padded_product_or_sum() -> None:
    assert BatchLimits(8, 100, padded=True).cost(longest=10, total=25, count=3) == 30
    assert BatchLimits(8, 100, padded=False).cost(longest=10, total=25, count=3) == 25


async def test_an_item_longer_than_the_token_budget_runs_alone(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=8, max_batch_tokens=50)
    job = make_job("j", [5, 80, 5])
    h.scheduler.submit_nowait(job)
    assert await result_of(job) == expected(job)
    assert [[item.length for item in batch] for batch in h.backend.batches] == [[5, 5], [80]]


# -- ordering ----------------------------------------------------------------------------


async def test_a_window_of_items_from_several_jobs_is_cut_into_length_sorted_batches(
    make_scheduler: MakeScheduler,
) -> None:
    # Not started: both jobs wait, so the first window holds items of both.
    h = make_scheduler(max_batch_size=4, window_batches=4, start=False)
    rng = random.Random(3)
    a = make_job("a", rng.choices(range(1, 100), k=8))
    b = make_job("b", rng.choices(range(1, 100), k=8))
    h.scheduler.submit_nowait(a)
    h.scheduler.submit_nowait(b)
    h.scheduler.start()
    assert await result_of(a) == expected(a)
    assert await result_of(b) == expected(b)
    assert all(len(batch) <= 4 for batch in h.backend.batches)
    window = [item.length for batch in h.backend.batches for item in batch]
    assert window == sorted([*a.lengths, *b.lengths])


async def test_batches_are_cut_where_padding_costs_more_than_another_forward_pass(
    make_scheduler: MakeScheduler,
) -> None:
    # One batch of all four would pad three short inputs to 100 tokens (400 + 32 overhead);
    # two batches cost 30 + 100 tokens + 2 x 32 overhead, so the scheduler cuts there.
    h = make_scheduler(max_batch_size=4, start=False)
    job = make_job("j", [10, 100, 10, 10])
    h.scheduler.submit_nowait(job)
    h.scheduler.start()
    await result_of(job)
    assert [[item.length for item in batch] for batch in h.backend.batches] == [[10, 10, 10], [100]]


async def test_inputs_of_equal_length_fill_whole_batches(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=4, start=False)
    job = make_job("j", [20] * 9)
    h.scheduler.submit_nowait(job)
    h.scheduler.start()
    await result_of(job)
    assert sorted(len(batch) for batch in h.backend.batches) == [1, 4, 4]


async def test_results_come_back_in_input_order_whatever_the_batch_order(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=3, window_batches=2)
    lengths = [9, 1, 7, 3, 3, 12, 2, 8, 1, 5, 6, 4]
    job = make_job("j", lengths)
    h.scheduler.submit_nowait(job)
    assert await result_of(job) == [f"j:{i}:{n}" for i, n in enumerate(lengths)]
    # The backend saw them in a different (length) order, so the reordering is real.
    seen = h.backend.items_of("j")
    assert [item.length for item in seen] == sorted(lengths)
    assert [item.index for item in seen] != list(range(len(lengths)))


async def test_queued_counts_items_until_they_are_computed(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=2)
    h.backend.hold()
    job = make_job("j", [1, 2, 3])
    h.scheduler.submit_nowait(job)
    assert h.scheduler.queued == 3
    await h.backend.wait_started()
    assert h.scheduler.queued == 3  # in flight still counts
    h.backend.release()
    await result_of(job)
    assert h.scheduler.queued == 0


# -- fairness ----------------------------------------------------------------------------


async def test_a_small_job_behind_a_large_one_waits_about_one_window_not_the_whole_job(
    make_scheduler: MakeScheduler,
) -> None:
    batch_size, window = 32, 4
    h = make_scheduler(max_batch_size=batch_size, window_batches=window)
    big = make_job("big", [10] * 2048)
    small = make_job("small", [10])
    h.backend.hold()
    h.scheduler.submit_nowait(big)
    await h.backend.wait_started()  # the big job's first window is cut and running
    h.scheduler.submit_nowait(small)
    h.backend.release()
    assert await result_of(small) == expected(small)
    small_batch = next(i for i, batch in enumerate(h.backend.batches) if any(it.job == "small" for it in batch))
    # At worst the rest of the current window, then the small job's share of the next one;
    # the big job alone needs 2048 / 32 = 64 batches.
    assert small_batch < 2 * window
    assert await result_of(big) == expected(big)
    assert len(h.backend.batches) >= 2048 // batch_size


# -- cancellation and deadlines ----------------------------------------------------------


async def test_a_cancelled_queued_job_never_reaches_the_backend(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=2)
    h.backend.hold()
    first = make_job("first", [4])
    h.scheduler.submit_nowait(first)
    await h.backend.wait_started()
    doomed = make_job("doomed", [4, 4, 4, 4, 4])
    h.scheduler.submit_nowait(doomed)
    assert h.scheduler.queued == 6
    h.scheduler.cancel(doomed)
    assert h.scheduler.queued == 1
    assert isinstance(await error_of(doomed), CancelledRequestError)
    h.backend.release()
    assert await result_of(first) == expected(first)
    after = make_job("after", [4])
    h.scheduler.submit_nowait(after)
    assert await result_of(after) == expected(after)
    assert h.backend.items_of("doomed") == []
    assert h.scheduler.queued == 0


async def test_cancelling_a_job_mid_flight_drops_its_remaining_batches(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=1, window_batches=8, pipeline_depth=1)
    h.backend.hold()
    job = make_job("j", [1, 2, 3, 4, 5, 6])
    h.scheduler.submit_nowait(job)
    await h.backend.wait_started()
    h.scheduler.cancel(job)
    assert h.scheduler.queued == 0
    h.backend.release()
    assert isinstance(await error_of(job), CancelledRequestError)
    after = make_job("after", [1])
    h.scheduler.submit_nowait(after)
    assert await result_of(after) == expected(after)
    assert len(h.backend.items_of("j")) == 1  # only the batch already in the worker ran
    assert h.scheduler.queued == 0


async def test_cancel_is_a_no_op_for_a_finished_job(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler()
    job = make_job("j", [1, 2])
    h.scheduler.submit_nowait(job)
    assert await result_of(job) == expected(job)
    h.scheduler.cancel(job)
    assert job.future.result() == expected(job)
    assert h.scheduler.queued == 0


async def test_a_job_whose_deadline_passed_is_dropped_before_compute(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler()
    late = make_job("late", [3, 3], deadline=time.monotonic() - 1.0)
    h.scheduler.submit_nowait(late)
    error = await error_of(late)
    assert isinstance(error, DeadlineExpiredError)
    on_time = make_job("on_time", [3], deadline=time.monotonic() + 60)
    h.scheduler.submit_nowait(on_time)
    assert await result_of(on_time) == expected(on_time)
    assert h.backend.items_of("late") == []
    assert h.scheduler.queued == 0


async def test_a_deadline_that_passes_while_batches_wait_drops_them_before_compute(
    make_scheduler: MakeScheduler,
) -> None:
    # Both jobs share one window; "short" is longest, so its batch is cut but comes last.
    h = make_scheduler(max_batch_size=1, window_batches=8, start=False)
    h.backend.hold()
    first = make_job("first", [1, 2, 3])
    deadline = time.monotonic() + 0.05
    short = make_job("short", [9], deadline=deadline)
    h.scheduler.submit_nowait(first)
    h.scheduler.submit_nowait(short)
    h.scheduler.start()
    await h.backend.wait_started()
    await asyncio.sleep(deadline - time.monotonic() + 0.01)  # time itself is what this test needs to pass
    h.backend.release()
    assert isinstance(await error_of(short), DeadlineExpiredError)
    assert await result_of(first) == expected(first)
    assert h.backend.items_of("short") == []
    assert h.scheduler.queued == 0


def test_job_without_items_or_with_mismatched_lengths_is_rejected() -> None:
    with pytest.raises(ValueError):
        Job([], [])
    with pytest.raises(ValueError):
        Job(["a", "b"], [1])


# -- admission ---------------------------------------------------------------------------


async def test_submit_nowait_is_overloaded_when_the_job_does_not_fit(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=10, start=False)
    h.scheduler.submit_nowait(make_job("a", [1] * 6))
    with pytest.raises(OverloadedError, match="6 inputs queued in its bulk lane and takes at most 10"):
        h.scheduler.submit_nowait(make_job("b", [1] * 5))
    assert h.scheduler.queued == 6
    h.scheduler.submit_nowait(make_job("c", [1] * 4))  # exactly full is fine
    assert h.scheduler.queued == 10


async def test_submit_waits_for_space_then_proceeds(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=4)
    h.backend.hold()
    first = make_job("first", [1, 1, 1])
    h.scheduler.submit_nowait(first)
    await h.backend.wait_started()
    second = make_job("second", [1, 1])
    admitting = asyncio.create_task(h.scheduler.submit(second))
    await settle()
    assert not admitting.done()  # backpressure: 3 + 2 > 4
    assert h.scheduler.queued == 3
    h.backend.release()
    await asyncio.wait_for(admitting, TIMEOUT_S)
    assert await result_of(first) == expected(first)
    assert await result_of(second) == expected(second)


async def test_submit_admits_waiters_first_come_first_served(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=4, start=False)
    blocker = make_job("blocker", [1] * 4)
    h.scheduler.submit_nowait(blocker)
    big = make_job("big", [1] * 3)
    small = make_job("small", [1])
    big_task = asyncio.create_task(h.scheduler.submit(big))
    await settle()
    small_task = asyncio.create_task(h.scheduler.submit(small))
    await settle()
    # Room for the small one would be there after 1 item frees, but it must not overtake.
    with pytest.raises(OverloadedError):
        h.scheduler.submit_nowait(make_job("barger", [1]))
    admitted: list[str] = []
    big_task.add_done_callback(lambda _: admitted.append("big"))
    small_task.add_done_callback(lambda _: admitted.append("small"))
    h.scheduler.cancel(blocker)
    await asyncio.wait_for(asyncio.gather(big_task, small_task), TIMEOUT_S)
    assert admitted == ["big", "small"]
    assert h.scheduler.queued == 4


async def test_a_waiting_submit_does_not_let_a_smaller_later_one_overtake(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=4, start=False)
    blockers = [make_job(f"b{i}", [1]) for i in range(4)]
    for job in blockers:
        h.scheduler.submit_nowait(job)
    big_task = asyncio.create_task(h.scheduler.submit(make_job("big", [1] * 3)))
    await settle()
    small_task = asyncio.create_task(h.scheduler.submit(make_job("small", [1])))
    await settle()
    h.scheduler.cancel(blockers[0])  # 1 free: fits the small job, not the big one at the head
    await settle()
    assert not big_task.done() and not small_task.done()
    h.scheduler.cancel(blockers[1])
    h.scheduler.cancel(blockers[2])  # 3 free: the big one goes, the small one still waits
    await settle()
    assert big_task.done() and not small_task.done()
    h.scheduler.cancel(blockers[3])
    await asyncio.wait_for(small_task, TIMEOUT_S)
    assert h.scheduler.queued == 4


async def test_a_job_larger_than_the_queue_is_overloaded_at_once(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=4, start=False)
    with pytest.raises(OverloadedError, match="can never fit"):
        await asyncio.wait_for(h.scheduler.submit(make_job("huge", [1] * 5)), TIMEOUT_S)
    assert h.scheduler.queued == 0


async def test_a_cancelled_waiting_submit_leaves_the_queue_to_the_next_waiter(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=4, start=False)
    blocker = make_job("blocker", [1] * 4)
    h.scheduler.submit_nowait(blocker)
    gone = asyncio.create_task(h.scheduler.submit(make_job("gone", [1] * 4)))
    await settle()
    next_task = asyncio.create_task(h.scheduler.submit(make_job("next", [1] * 2)))
    await settle()
    gone.cancel()
    await settle()
    assert gone.cancelled()
    h.scheduler.cancel(blocker)
    await asyncio.wait_for(next_task, TIMEOUT_S)
    assert h.scheduler.queued == 2


async def test_waking_waiters_twice_before_they_run_never_overfills_the_queue(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=4, start=False)
    first, second = make_job("first", [1, 1]), make_job("second", [1, 1])
    h.scheduler.submit_nowait(first)
    h.scheduler.submit_nowait(second)
    waiters = []
    for tag in "abc":
        waiters.append(asyncio.create_task(h.scheduler.submit(make_job(tag, [1, 1]))))
        await settle()
    # Two frees in the same turn of the loop (as when _cut_window retires two expired jobs).
    h.scheduler.cancel(first)
    h.scheduler.cancel(second)
    await settle()
    assert h.scheduler.queued <= h.scheduler.queue_size
    assert [task.done() for task in waiters] == [True, True, False]


async def test_a_waiter_cancelled_right_after_being_woken_passes_its_turn_on(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=4, start=False)
    blocker = make_job("blocker", [1] * 4)
    h.scheduler.submit_nowait(blocker)
    woken = asyncio.create_task(h.scheduler.submit(make_job("woken", [1] * 4)))
    await settle()
    behind = asyncio.create_task(h.scheduler.submit(make_job("behind", [1] * 2)))
    await settle()
    h.scheduler.cancel(blocker)  # wakes `woken` ...
    woken.cancel()  # ... whose caller goes away before it runs
    await settle()
    assert woken.cancelled()
    await asyncio.wait_for(behind, 0.5)
    assert h.scheduler.queued == 2


# -- failures ----------------------------------------------------------------------------


async def test_a_failing_batch_fails_exactly_its_jobs_and_the_scheduler_keeps_serving(
    make_scheduler: MakeScheduler,
) -> None:
    h = make_scheduler(max_batch_size=2, start=False)
    h.backend.fail_when = lambda batch: any(item.job == "bad" for item in batch)
    # Lengths keep the jobs in separate batches: [good 1, good 1] [bad 5, bad 5] [other 9].
    good = make_job("good", [1, 1])
    bad = make_job("bad", [5, 5])
    other = make_job("other", [9])
    for job in (good, bad, other):
        h.scheduler.submit_nowait(job)
    h.scheduler.start()
    error = await error_of(bad)
    assert isinstance(error, EngineFailedError)
    assert "device on fire" in str(error)
    assert await result_of(good) == expected(good)
    assert await result_of(other) == expected(other)
    later = make_job("later", [3])
    h.scheduler.submit_nowait(later)
    assert await result_of(later) == expected(later)
    assert h.scheduler.failure is None and h.failures == []
    assert h.scheduler.queued == 0


async def test_a_failing_batch_fails_every_job_with_an_item_in_it(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=4, start=False)
    h.backend.fail_when = lambda batch: True
    a, b = make_job("a", [1]), make_job("b", [2])
    h.scheduler.submit_nowait(a)
    h.scheduler.submit_nowait(b)
    h.scheduler.start()
    assert isinstance(await error_of(a), EngineFailedError)
    assert isinstance(await error_of(b), EngineFailedError)
    assert len(h.backend.batches) == 1
    assert h.scheduler.queued == 0


async def test_a_backend_returning_the_wrong_number_of_results_fails_those_jobs_loudly(
    make_scheduler: MakeScheduler,
) -> None:
    h = make_scheduler(max_batch_size=4)
    h.backend.drop_one_when = lambda batch: any(item.job == "short" for item in batch)
    short = make_job("short", [2, 2, 2])
    h.scheduler.submit_nowait(short)
    error = await error_of(short)
    assert isinstance(error, EngineFailedError)
    assert "2 results for 3 inputs" in str(error)
    later = make_job("later", [2])
    h.scheduler.submit_nowait(later)
    assert await result_of(later) == expected(later)
    assert h.scheduler.failure is None
    assert h.scheduler.queued == 0


async def test_a_crashed_loop_fails_every_waiting_job_and_refuses_new_ones(
    make_scheduler: MakeScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_scheduler(queue_size=6, start=False)

    def broken(window: object) -> list[Any]:
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(h.scheduler, "_cut_batches", broken)
    jobs = [make_job(f"j{i}", [1, 2]) for i in range(3)]
    for job in jobs:
        h.scheduler.submit_nowait(job)
    waiting = asyncio.create_task(h.scheduler.submit(make_job("waiting", [1])))
    await settle()
    h.scheduler.start()
    for job in jobs:
        error = await error_of(job)
        assert isinstance(error, EngineFailedError)
        assert "scheduler bug" in str(error)
    with pytest.raises(EngineFailedError):
        await asyncio.wait_for(waiting, TIMEOUT_S)  # a waiter for space is not left hanging
    assert isinstance(h.scheduler.failure, RuntimeError)
    assert h.failures == [h.scheduler.failure]
    assert h.scheduler.queued == 0
    assert h.backend.batches == []
    with pytest.raises(EngineFailedError, match="crashed"):
        h.scheduler.submit_nowait(make_job("late", [1]))
    with pytest.raises(EngineFailedError, match="crashed"):
        await asyncio.wait_for(h.scheduler.submit(make_job("late", [1])), TIMEOUT_S)


async def test_close_after_a_crashed_loop_does_not_raise(
    make_scheduler: MakeScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_scheduler(start=False)

    def broken(window: object) -> list[Any]:
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(h.scheduler, "_cut_batches", broken)
    h.scheduler.start()
    job = make_job("j", [1])
    h.scheduler.submit_nowait(job)
    assert isinstance(await error_of(job), EngineFailedError)
    await asyncio.wait_for(h.scheduler.close(), TIMEOUT_S)


async def test_close_fails_waiting_jobs_without_calling_on_failure(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(start=False)
    h.scheduler.start()
    job = make_job("j", [1, 2])
    h.scheduler.submit_nowait(job)
    await h.scheduler.close()  # before the loop had a turn, so the job is still waiting
    assert isinstance(await error_of(job), EngineFailedError)
    assert h.failures == []
    assert h.scheduler.queued == 0


async def test_a_caller_cancelling_its_future_does_not_crash_the_loop(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler()
    h.backend.hold()
    impatient = make_job("impatient", [1])
    h.scheduler.submit_nowait(impatient)
    await h.backend.wait_started()
    impatient.future.cancel()
    h.backend.release()
    after = make_job("after", [1])
    h.scheduler.submit_nowait(after)
    assert await result_of(after) == expected(after)
    assert h.scheduler.failure is None


# -- lanes: interactive and bulk ----------------------------------------------------------


def job(
    tag: str, lengths: Sequence[int], priority: Priority = Priority.BULK, tenant: str = "", flow: object = None
) -> Job[Item, str]:
    return Job([Item(tag, i, n) for i, n in enumerate(lengths)], list(lengths), None, priority, tenant, flow)


def query(tag: str) -> Job[Item, str]:
    return job(tag, [4], Priority.INTERACTIVE)


class FixedCost(BatchCost):
    """A cost model that says every batch takes per_token_s per padded token, whatever the fake
    backend's real (microsecond) timings."""

    def __init__(self, per_token_s: float = 0.001) -> None:
        super().__init__()
        self.calibrate([(count, n, count * n * per_token_s) for count in (1, 4, 16) for n in (8, 32, 64)])

    def observe(self, count: int, longest: int, seconds: float) -> None:
        pass


async def test_a_query_arriving_while_bulk_is_queued_runs_in_the_next_batch(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=4)
    bulk = job("bulk", [10] * 64)
    h.backend.hold()
    h.scheduler.submit_nowait(bulk)
    await h.backend.wait_started()  # one bulk batch runs, the next one is parked behind it
    await settle()
    q = query("q")
    h.scheduler.submit_nowait(q)
    h.backend.release()
    assert await result_of(q) == expected(q)
    assert await result_of(bulk) == expected(bulk)
    assert [item.job for item in h.backend.batches[1]] == ["q"]  # right after the running batch
    assert sum(len(batch) for batch in h.backend.batches) == 65  # the parked batch ran later, once


async def test_a_bulk_only_load_keeps_full_batches(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=8, lanes=Lanes(bulk_batch_s=0.004), cost=FixedCost())
    bulk = job("bulk", [10] * 160)
    h.scheduler.submit_nowait(bulk)
    assert await result_of(bulk) == expected(bulk)
    assert {len(batch) for batch in h.backend.batches} == {8}


async def test_bulk_batches_shrink_to_the_time_target_while_queries_arrive(make_scheduler: MakeScheduler) -> None:
    # 10 tokens x 1 ms per token: the 25 ms target allows 2 items per batch instead of 8.
    h = make_scheduler(max_batch_size=8, lanes=Lanes(bulk_batch_s=0.025, hold_s=60), cost=FixedCost())
    q = query("q")
    h.scheduler.submit_nowait(q)
    assert await result_of(q) == expected(q)
    bulk = job("bulk", [10] * 64)
    h.scheduler.submit_nowait(bulk)
    assert await result_of(bulk) == expected(bulk)
    assert max(len(batch) for batch in h.backend.batches if batch[0].job == "bulk") == 2


async def test_bulk_keeps_its_minimum_share_under_an_interactive_flood(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=4, lanes=Lanes(bulk_min_share=0.3, share_window_s=60))
    bulk = job("bulk", [10] * 400)
    h.scheduler.submit_nowait(bulk)
    queries: list[Job[Item, str]] = []
    deadline = time.monotonic() + TIMEOUT_S
    while not bulk.done and time.monotonic() < deadline:  # keep the interactive lane full
        queries.append(query(f"q{len(queries)}"))
        h.scheduler.submit_nowait(queries[-1])
        await asyncio.sleep(0.0005)
    assert await result_of(bulk) == expected(bulk)
    for q in queries:
        assert await result_of(q) == expected(q)
    ran = [batch[0].job == "bulk" for batch in h.backend.batches]
    assert sum(ran) >= 0.2 * len(ran)  # bulk got about its 30% of the batches, not starved


@pytest.mark.parametrize("by", ["tenant", "flow"])
async def test_two_tenants_and_two_streams_share_the_bulk_lane_equally_whatever_they_send(
    make_scheduler: MakeScheduler, by: str
) -> None:
    # By tenant: tenant a runs four streams' worth of jobs, tenant b one. By flow: one tenant's
    # two streams, one with four requests in flight, the other with one.
    h = make_scheduler(max_batch_size=8, window_batches=2)
    h.backend.hold()

    def sent_by(tag: str, who: str) -> Job[Item, str]:
        if by == "tenant":
            return job(tag, [10] * 200, tenant=who)
        return job(tag, [10] * 200, flow=who)

    many_jobs = [sent_by(f"m{i}", "many") for i in range(4)]
    one_job = sent_by("o0", "one")
    for j in [*many_jobs, one_job]:
        h.scheduler.submit_nowait(j)
    h.backend.release()
    await result_of(one_job)
    done_by_many = sum(len(h.backend.items_of(j.items[0].job)) for j in many_jobs)
    # When the single one's 200 inputs are done, the other side has had about as many.
    assert 0.8 * 200 <= done_by_many <= 1.25 * 200 + 16
    for j in many_jobs:
        assert await result_of(j) == expected(j)


async def test_an_interactive_job_is_admitted_while_bulk_waits_for_room(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=8)
    h.backend.hold()
    h.scheduler.submit_nowait(job("full", [1] * 6))
    waiting = asyncio.create_task(h.scheduler.submit(job("waiting", [1] * 4)))
    await settle()
    q = query("q")
    h.scheduler.submit_nowait(q)  # fits: not refused because a bulk stream waits for room
    h.backend.release()
    assert await result_of(q) == expected(q)
    await asyncio.wait_for(waiting, TIMEOUT_S)


async def test_a_query_whose_deadline_passes_while_it_waits_is_dropped_before_compute(
    make_scheduler: MakeScheduler,
) -> None:
    h = make_scheduler(max_batch_size=4)
    h.backend.hold()
    h.scheduler.submit_nowait(job("bulk", [10] * 8))
    await h.backend.wait_started()
    first = query("first")  # takes the worker's next slot
    h.scheduler.submit_nowait(first)
    late: Job[Item, str] = Job([Item("late", 0, 4)], [4], time.monotonic() + 0.01, Priority.INTERACTIVE)
    h.scheduler.submit_nowait(late)  # waits in the interactive lane
    await asyncio.sleep(0.05)
    h.backend.release()
    assert await result_of(first) == expected(first)
    assert isinstance(await error_of(late), DeadlineExpiredError)
    assert h.backend.items_of("late") == []


# -- worker threads: interactive alongside bulk, several bulk batches at once ------------------


def is_bulk(batch: list[Item]) -> bool:
    return batch[0].job.startswith("bulk")


async def wait_for_batches(h: Harness, count: int) -> None:
    """Waits until `count` batches reached the backend."""
    deadline = time.monotonic() + TIMEOUT_S
    while len(h.backend.batches) < count:
        assert time.monotonic() < deadline, f"{len(h.backend.batches)} batches started, not {count}"
        await asyncio.sleep(0.001)


async def test_alongside_a_query_is_answered_while_a_bulk_batch_runs(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=4, lanes=Lanes(alongside=True, bulk_batch_s=0.001), cost=FixedCost())
    h.backend.hold(only=is_bulk)
    bulk = job("bulk", [10] * 16)
    h.scheduler.submit_nowait(bulk)
    await h.backend.wait_started()
    q = query("q")
    h.scheduler.submit_nowait(q)
    assert await result_of(q) == expected(q)  # the bulk batch is still held in its worker
    assert not bulk.done
    h.backend.release()
    assert await result_of(bulk) == expected(bulk)
    # Queries do not shrink bulk batches when they have a worker of their own.
    assert [len(batch) for batch in h.backend.batches if is_bulk(batch)] == [4, 4, 4, 4]


async def test_workers_run_that_many_bulk_batches_at_once(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(max_batch_size=4, workers=2)
    h.backend.hold()
    bulk = job("bulk", [10] * 16)
    h.scheduler.submit_nowait(bulk)
    await wait_for_batches(h, 2)
    await asyncio.sleep(0.02)
    assert len(h.backend.batches) == 2  # two run, the third waits for a free worker
    h.backend.release()
    assert await result_of(bulk) == expected(bulk)
    assert sorted(item.index for item in h.backend.items_of("bulk")) == list(range(16))  # each once


async def test_alongside_a_query_past_its_deadline_and_a_cancelled_bulk_job_never_reach_the_backend(
    make_scheduler: MakeScheduler,
) -> None:
    h = make_scheduler(max_batch_size=4, workers=2, lanes=Lanes(alongside=True))
    h.backend.hold()
    bulk = job("bulk", [10] * 40)
    h.scheduler.submit_nowait(bulk)
    first = query("first")
    h.scheduler.submit_nowait(first)  # held in the interactive worker
    await wait_for_batches(h, 3)
    late: Job[Item, str] = Job([Item("late", 0, 4)], [4], time.monotonic() + 0.01, Priority.INTERACTIVE)
    h.scheduler.submit_nowait(late)
    await asyncio.sleep(0.05)
    h.scheduler.cancel(bulk)
    h.backend.release()
    assert await result_of(first) == expected(first)
    assert isinstance(await error_of(late), DeadlineExpiredError)
    assert isinstance(await error_of(bulk), CancelledRequestError)
    await settle()
    assert h.backend.items_of("late") == []
    assert len(h.backend.items_of("bulk")) == 8  # the two batches running when it was cancelled
    assert h.scheduler.queued == 0


def test_a_scheduler_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        Scheduler("fake", FakeBackend(), BatchLimits(4, 100), 10, workers=0)


# -- admission: unary requests and waiting streams share the queue -----------------------------


async def test_a_unary_request_that_fits_is_admitted_while_a_stream_waits_for_room(
    make_scheduler: MakeScheduler,
) -> None:
    h = make_scheduler(queue_size=8)
    h.backend.hold()
    await h.scheduler.submit(job("stream", [1] * 5))
    waiting = asyncio.create_task(h.scheduler.submit(job("waiting", [1] * 4)))  # 5 + 4 > 8: waits
    await settle()
    assert not waiting.done()
    unary = job("unary", [1] * 3)
    h.scheduler.submit_nowait(unary)  # 5 + 3 fits: admitted, though a stream waits
    with pytest.raises(OverloadedError, match="8 inputs queued in its bulk lane and takes at most 8"):
        h.scheduler.submit_nowait(job("no room", [1]))
    h.backend.release()
    assert await result_of(unary) == expected(unary)
    await asyncio.wait_for(waiting, TIMEOUT_S)


async def test_while_streams_wait_unary_work_keeps_at_most_half_the_queue(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_size=16)
    h.backend.hold()
    first, second, streamed = job("first", [1] * 6), job("second", [1] * 2), job("waiting", [1] * 12)
    h.scheduler.submit_nowait(first)  # unary, before any stream waits
    waiting = asyncio.create_task(h.scheduler.submit(streamed))
    await settle()
    h.scheduler.submit_nowait(second)  # 8 of unary work: half the queue
    with pytest.raises(OverloadedError, match=r"8 inputs \(8 tokens\) of unary requests queued, half of its queue"):
        h.scheduler.submit_nowait(job("third", [1] * 2))  # room for it (10 of 16), but over the half
    q = query("q")
    h.scheduler.submit_nowait(q)  # interactive work is not held to the half
    h.backend.release()
    await asyncio.wait_for(waiting, TIMEOUT_S)
    for done in (q, first, second, streamed):
        assert await result_of(done) == expected(done)
    assert h.scheduler.queued == 0 and h.scheduler._unary_inputs == h.scheduler._unary_tokens == 0  # all given back


# -- admission by tokens, before tokenizing ---------------------------------------------


async def test_a_lane_holding_its_tokens_refuses_unary_work_with_a_retry_after(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_tokens=100, tokens_per_s=50.0)
    h.backend.hold()
    first = job("first", [30] * 5)
    h.scheduler.submit_nowait(first)  # 150 tokens: past the limit, one request may
    with pytest.raises(OverloadedError, match=r"150 tokens queued in its bulk lane, ~3\.0 s of work") as refused:
        h.scheduler.reserve_nowait(1, 1, Priority.BULK)
    assert refused.value.retry_after_s == pytest.approx(1.0)  # (150 - 100) / 50 tokens/s
    q = query("q")
    h.scheduler.submit_nowait(q)  # the interactive lane has room of its own
    assert h.scheduler.queued_tokens(Priority.INTERACTIVE) == 4
    h.backend.release()
    assert await result_of(q) == expected(q)
    assert await result_of(first) == expected(first)  # its batches run on worker threads: wait for them
    await settle()
    assert h.scheduler.queued_tokens(Priority.BULK) == 0
    h.scheduler.submit_nowait(job("then", [30] * 5))  # room again


async def test_a_ticket_holds_the_estimate_until_the_job_takes_its_real_tokens(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_tokens=100, start=False)
    ticket = h.scheduler.reserve_nowait(3, 120, Priority.BULK)  # estimated before tokenizing
    assert (h.scheduler.queued, h.scheduler.queued_tokens(Priority.BULK)) == (3, 120)
    with pytest.raises(OverloadedError):  # while it is tokenized, the room is taken
        h.scheduler.reserve_nowait(1, 1, Priority.BULK)
    h.scheduler.admit(job("real", [10, 10, 10]), ticket)
    assert (h.scheduler.queued, h.scheduler.queued_tokens(Priority.BULK)) == (3, 30)
    with pytest.raises(RuntimeError, match="one job"):
        h.scheduler.admit(job("again", [1]), ticket)
    h.scheduler.release(h.scheduler.reserve_nowait(1, 5, Priority.BULK))  # a request that failed to tokenize
    assert (h.scheduler.queued, h.scheduler.queued_tokens(Priority.BULK)) == (3, 30)


async def test_room_given_back_by_a_failed_request_wakes_a_waiting_stream(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_tokens=100, start=False)
    ticket = h.scheduler.reserve_nowait(1, 200, Priority.BULK)
    waiting = asyncio.create_task(h.scheduler.reserve(1, 10, Priority.BULK))
    await settle()
    assert not waiting.done()
    h.scheduler.release(ticket)
    stream_ticket = await asyncio.wait_for(waiting, TIMEOUT_S)
    assert stream_ticket.held and h.scheduler.queued_tokens(Priority.BULK) == 10


async def test_the_token_limit_follows_the_bulk_throughput_served(make_scheduler: MakeScheduler) -> None:
    h = make_scheduler(queue_seconds=1.0, tokens_per_s=8000.0, rate_window_s=0.05)  # measured at "startup"
    assert h.scheduler.queue_tokens == 8000
    slow = h.backend.__call__

    def slowly(items: list[Item]) -> Sequence[str]:
        time.sleep(0.01)
        return slow(items)

    h.scheduler._run_batch = slowly
    jobs = [job(f"bulk{i}", [10] * 4) for i in range(40)]  # 1,600 tokens, 40 batches of 4 x 10 at ~10 ms
    for j in jobs:
        h.scheduler.submit_nowait(j)
    for j in jobs:
        await result_of(j)
    # Saturated bulk got through at most 4,000 tokens a second (40 per 10 ms pass): the limit
    # follows it down, to half the startup rate at most.
    assert h.scheduler.queue_tokens is not None and 4000 <= h.scheduler.queue_tokens < 7000
