"""Compute threads at a lower priority (WORKER_NICENESS) and the event loop (EVENT_LOOP)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from embedserve.cli import event_loop_factory
from embedserve.engine.threads import lower_new_threads, lower_priority
from embedserve.errors import ConfigError
from embedserve.settings import load_settings


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def parked_thread() -> tuple[threading.Thread, threading.Event, list[int]]:
    """A thread that records its native id and waits until released."""
    release, tids = threading.Event(), []
    started = threading.Event()

    def run() -> None:
        tids.append(threading.get_native_id())
        started.set()
        release.wait(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    return thread, release, tids


def test_the_initializer_lowers_only_the_thread_that_runs_it() -> None:
    base = nice_of(0)
    seen: list[int] = []

    def run() -> None:
        lower_priority(5)()
        seen.append(nice_of(threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [base + 5]
    assert nice_of(threading.get_native_id()) == base  # the caller's own is untouched


def test_zero_changes_nothing() -> None:
    seen: list[int] = []

    def run() -> None:
        lower_priority(0)()
        seen.append(nice_of(threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [nice_of(0)]


def test_threads_started_inside_the_block_are_lowered_and_older_ones_are_not() -> None:
    base = nice_of(0)
    older, release_older, older_tid = parked_thread()
    with lower_new_threads(3):
        newer, release_newer, newer_tid = parked_thread()
    try:
        assert nice_of(newer_tid[0]) == base + 3
        assert nice_of(older_tid[0]) == base
        assert nice_of(threading.get_native_id()) == base
    finally:
        release_older.set()
        release_newer.set()
        older.join(10)
        newer.join(10)


def test_worker_niceness_is_checked() -> None:
    assert load_settings([], {}).worker_niceness == 10
    assert load_settings([], {"WORKER_NICENESS": "0"}).worker_niceness == 0
    with pytest.raises(ConfigError, match="WORKER_NICENESS must be from 0 to 19, got '20'"):
        load_settings([], {"WORKER_NICENESS": "20"})


def test_event_loop_auto_is_uvloop_and_asyncio_is_asyncio_s_own() -> None:
    import uvloop

    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None
    with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_without_uvloop_auto_falls_back_and_uvloop_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert event_loop_factory("auto") is None
    with pytest.raises(ConfigError, match="pip install uvloop"):
        event_loop_factory("uvloop")
    with pytest.raises(ConfigError, match="EVENT_LOOP must be one of auto, uvloop, asyncio"):
        load_settings([], {"EVENT_LOOP": "trio"})
