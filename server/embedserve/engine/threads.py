"""Compute threads that yield the CPU to the threads that answer calls.

The event loop and gRPC's own threads accept every call, refuse what the queue cannot take and
answer health checks; bulk forward passes and tokenizing are throughput work. At the same
priority, on a machine whose cores the forward passes fill, each hop of a call (gRPC's threads,
then the loop) waits its turn on a core, and under an 8x overload refusals took seconds and
health checks up to 76 ms; with the compute threads at nice +10 refusals took 4 ms (p50) and
health 16 ms (p99) in the same run, with as much answered (docs/benchmarks.md). The CPU is not
idled by it: a lower priority only matters while something else wants the core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_TASKS = Path("/proc/self/task")


def _renice(tid: int, niceness: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    except OSError as exc:
        log.warning("cannot lower the priority of thread %d: %s", tid, exc)


def lower_priority(niceness: int) -> Callable[[], None]:
    """A thread initializer that raises the calling thread's nice value by `niceness` (Linux
    keeps one per thread, and threads it starts inherit it). 0, or an OS without it: unchanged."""

    def initializer() -> None:
        if niceness > 0 and hasattr(os, "setpriority"):
            _renice(threading.get_native_id(), niceness)

    return initializer


def _thread_ids() -> set[int]:
    try:
        return {int(task.name) for task in _TASKS.iterdir()}
    except OSError:
        return set()


@contextlib.contextmanager
def lower_new_threads(niceness: int) -> Iterator[None]:
    """Raises by `niceness` the nice value of every thread the process started inside the block
    and that still runs at its end: the thread pools a runtime starts when a model loads (ONNX
    Runtime's intra-op pool), which no initializer of ours reaches. Linux only (/proc)."""
    before = _thread_ids() if niceness > 0 and hasattr(os, "setpriority") else None
    yield
    if before is not None:
        for tid in sorted(_thread_ids() - before):
            _renice(tid, niceness)
