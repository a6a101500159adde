"""How many forward passes of a model run at once, on how many threads each, and where
interactive batches run: CPU and CUDA defaults, and the settings that override them."""

from __future__ import annotations

import pytest

from embedserve.engine.registry import cpu_cores, forward_threads, lanes, max_batch_tokens
from embedserve.errors import ConfigError
from embedserve.settings import load_settings


@pytest.mark.parametrize(
    ("env", "on_cuda", "cores", "expected"),
    [
        ({}, False, 2, (2, 1)),  # CPU: two single-threaded forward passes at once
        ({}, False, 16, (2, 8)),
        ({}, False, 1, (2, 1)),  # never zero threads
        ({}, True, 16, (1, 16)),  # CUDA: one stream, one batch at a time
        ({"FORWARD_WORKERS": "4"}, False, 16, (4, 4)),
        ({"FORWARD_WORKERS": "1"}, False, 2, (1, 2)),
        ({"INTRA_OP_THREADS": "3"}, False, 16, (2, 3)),
        ({"FORWARD_WORKERS": "3", "INTRA_OP_THREADS": "2"}, True, 16, (3, 2)),
    ],
)
def test_forward_workers_and_threads_follow_the_device_unless_set(
    env: dict[str, str], on_cuda: bool, cores: int, expected: tuple[int, int]
) -> None:
    assert forward_threads(load_settings([], env), on_cuda, cores) == expected


@pytest.mark.parametrize(
    ("value", "on_cuda", "alongside"),
    [("auto", False, True), ("auto", True, False), ("on", True, True), ("off", False, False)],
)
def test_interactive_batches_get_a_worker_of_their_own_on_cpu_unless_set(
    value: str, on_cuda: bool, alongside: bool
) -> None:
    settings = load_settings([], {"INTERACTIVE_WORKER": value})
    assert lanes(settings, on_cuda).alongside is alongside
    assert lanes(settings, on_cuda).bulk_batch_s == settings.bulk_batch_ms / 1e3


def test_a_bad_interactive_worker_value_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="INTERACTIVE_WORKER must be one of auto, on, off, got 'sometimes'"):
        load_settings(["--interactive-worker", "sometimes"], {})


def test_cpu_cores_counts_what_this_process_may_use() -> None:
    import os

    assert cpu_cores() == len(os.sched_getaffinity(0))


def test_batch_tokens_are_smaller_on_cpu_unless_set() -> None:
    assert max_batch_tokens(load_settings([]), on_cuda=False) == 4096
    assert max_batch_tokens(load_settings([]), on_cuda=True) == 16384
    assert max_batch_tokens(load_settings(["--max-batch-tokens", "2000"]), on_cuda=True) == 2000
