"""What every bench shares: the seeded corpus and how it is cut, what an in-process pass measured
and the ceiling made of two, the comparisons with the server's answers, statistics, progress
lines, and the end of a run (report, JSON summary, exit code)."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int32]
# One sparse vector: vocabulary ids (ascending) of the positive terms, and their weights.
Terms = tuple[IndexArray, FloatArray]

TARGET_RATIO = 0.90
# Largest difference between a server vector and its in-process twin before the run fails.
VECTOR_TOLERANCE = 1e-4
# The short input of the latency phases.
LATENCY_INPUT = "hello world"
# Queries are short (ms-marco questions are 5-10 words), documents are the corpus texts.
QUERY_WORDS = (4, 12)

# A fixed vocabulary so the corpus depends only on the seed (and not on any file or locale).
WORDS = """
the of and to in is was for on that with as by at from his an were are which this be
has had have not but they their one all its new more been also after first two who
other when time would there can into only most over such some these city world year
may about between during under through where while both since than many each later
state known school house people part them made team then after before could three
system music river church album group because water season early public national
game life light market model power order paper place point road science service side
small sound space story street study table test town train tree value voice war week
word work young area body book business car case child company country day door end
eye face fact family field friend government hand head home idea job kind land law
level line lot member minute moment money month morning mother name night number
office parent party person picture problem program question reason report result
room sense share social son stage start student system teacher thing thought today
top travel truth understand university until use view wait walk want watch weather
west whole why wide window winter wish woman wonder wood write yard yellow zone
embedding vector server batch token stream request latency network memory thread
""".split()


# -- the corpus ------------------------------------------------------------------------------


def make_corpus(count: int, seed: int, min_words: int = 8, max_words: int = 120) -> list[str]:
    """Returns `count` texts of min..max words drawn from WORDS; the same seed gives the same corpus."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """Splits items into consecutive lists of at most `size`."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@dataclass(frozen=True)
class Workload:
    """The seeded corpus cut into requests: Rerank sends queries[i] with groups[i]; SparseEmbed
    sends groups[i]. Pair j of the flattened groups is texts[j]."""

    texts: list[str]
    queries: list[str]
    groups: list[list[str]]


def make_workload(texts: int, request_size: int, seed: int) -> Workload:
    """The embed corpus as documents, and one short query per request from the next seed."""
    corpus = make_corpus(texts, seed)
    groups = chunks(corpus, request_size)
    queries = make_corpus(len(groups), seed + 1, *QUERY_WORDS)
    return Workload(corpus, queries, groups)


def length_order(lengths: Sequence[int], window: int) -> list[int]:
    """Positions sorted by length within consecutive windows of `window` items (0: all at once)."""
    window = window or len(lengths)
    order: list[int] = []
    for begin in range(0, len(lengths), window):
        order.extend(sorted(range(begin, min(begin + window, len(lengths))), key=lengths.__getitem__))
    return order


def padding_efficiency(lengths: Sequence[int], batch_size: int, window: int) -> float:
    """Real / padded tokens when batches of `batch_size` are cut from length-sorted windows."""
    order = length_order(lengths, window)
    padded = sum(
        max(lengths[i] for i in order[b : b + batch_size]) * len(order[b : b + batch_size])
        for b in range(0, len(order), batch_size)
    )
    return sum(lengths) / padded


# -- what an in-process pass measured -----------------------------------------------------------


@dataclass
class InProcessRun:
    """One pass of the corpus through tokenizer + ONNX Runtime + post-processing in this process."""

    seconds: float
    tokenize_s: float
    forward_s: float
    tokens: int
    padded_tokens: int
    cpu_s: float
    # Tokens of each text, for padding estimates; left out of the JSON summary.
    lengths: list[int] = field(default_factory=list, repr=False)

    def texts_per_s(self, texts: int) -> float:
        """Throughput over the whole pass."""
        return texts / self.seconds

    @property
    def cores_used(self) -> float:
        """CPU seconds per wall second: how much of the machine the pass got."""
        return self.cpu_s / self.seconds

    @property
    def padding_efficiency(self) -> float:
        """Real / padded tokens of the pass."""
        return self.tokens / self.padded_tokens


@dataclass(frozen=True)
class Ceiling:
    """The in-process ceiling (a) for `items` texts or pairs: the mean of the passes before and
    after the server, which cancels slow drift."""

    before: InProcessRun
    after: InProcessRun
    items: int

    @property
    def before_per_s(self) -> float:
        """Items per second of the pass before the server."""
        return self.before.texts_per_s(self.items)

    @property
    def after_per_s(self) -> float:
        """Items per second of the pass after the server."""
        return self.after.texts_per_s(self.items)

    @property
    def per_s(self) -> float:
        """The ceiling: the mean of the two rates."""
        return (self.before_per_s + self.after_per_s) / 2

    @property
    def cpu_s(self) -> float:
        """Mean CPU seconds of the two passes."""
        return (self.before.cpu_s + self.after.cpu_s) / 2

    @property
    def spread(self) -> float:
        """How far apart the two rates are, as a share of the ceiling."""
        return abs(self.before_per_s - self.after_per_s) / self.per_s

    def ratio(self, per_s: float) -> float:
        """A rate (items/s) as a share of the ceiling."""
        return per_s / self.per_s

    def cpu_ratio(self, cpu_s: float) -> float:
        """The ceiling's CPU seconds over `cpu_s` spent on the same items elsewhere."""
        return self.cpu_s / cpu_s


Measured = TypeVar("Measured")


@dataclass
class RerankSparsePass(Generic[Measured]):
    """One pass of the rerank/sparse workload, in process or through the server: what each
    RPC's pass measured, and what it answered."""

    rerank: Measured
    sparse: Measured
    scores: FloatArray  # one score (the raw logit) per pair, in pair order
    terms: list[Terms]  # one sparse vector per text


# -- comparisons and statistics ----------------------------------------------------------------


def max_abs_diff(a: FloatArray, b: FloatArray) -> float:
    """Largest element-wise difference between two equally shaped arrays."""
    return float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")


def terms_diff(server: Sequence[Terms], in_process: Sequence[Terms], vocab_size: int) -> tuple[float, int]:
    """Largest weight difference over all texts, a term missing on one side counting its whole
    weight; and how many texts have a different set of terms."""
    if len(server) != len(in_process):
        return float("inf"), abs(len(server) - len(in_process))
    worst, differing = 0.0, 0
    a, b = np.zeros(vocab_size, np.float32), np.zeros(vocab_size, np.float32)
    for (ia, va), (ib, vb) in zip(server, in_process, strict=True):
        a[ia], b[ib] = va, vb
        worst = max(worst, float(np.max(np.abs(a - b))))
        differing += not np.array_equal(ia, ib)
        a[ia], b[ib] = 0.0, 0.0
    return worst, differing


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


# -- output ------------------------------------------------------------------------------------


def step(message: str) -> None:
    """Progress on stderr, so stdout holds only the report and the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_summary(report: Sequence[str], summary: dict[str, Any], json_out: Path | None) -> None:
    """Prints the report, then the summary as one JSON line (also written to json_out)."""
    print("\n".join(report))
    line = json.dumps(summary, sort_keys=True)
    print(line)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(line + "\n")


def emit(report: Sequence[str], summary: dict[str, Any], json_out: Path | None, mismatch: str) -> int:
    """`print_summary`; returns 1 when the server's results differ from the in-process ones
    beyond the tolerance, saying `mismatch` on stderr, else 0."""
    print_summary(report, summary, json_out)
    worst = max(summary["max_abs_diff"].values())
    if worst >= VECTOR_TOLERANCE:
        print(f"{mismatch} by up to {worst:.1e}", file=sys.stderr)
        return 1
    return 0


Bench = TypeVar("Bench")


def bench_main(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], Bench],
    report: Callable[[argparse.Namespace, Bench], Sequence[str]],
    summary: Callable[[argparse.Namespace, Bench], dict[str, Any]],
    mismatch: str,
) -> int:
    """One bench's entry point: parse its options, measure, print the report and the JSON line
    (`emit`); 1 when the server's results differ from the in-process ones."""
    args = parse_args(argv)
    bench = run(args)
    return emit(report(args, bench), summary(args, bench), args.json_out, mismatch)
