"""JSON floats over REST (issue 11): how many bytes a float takes in a POST /v1/embeddings answer
with "encoding_format": "float", and how fast such answers come and parse, against this
checkout's server and a baseline commit's, each behind Envoy, in one run. The baseline is by
default 5a7ac2a^, the last commit whose JSON vectors held each float32 widened to a double, which
prints with 17 significant digits; since 5a7ac2a each prints as the shortest decimal that gives
the float32 back (9 digits at most).

       start both servers (`python -m embedserve`, the way users start it), each with Envoy
       (envoy/gateway.py's config, this checkout's for both) in front
       warm-up: 2 requests per client on each, untimed
  (f)  each round, for this checkout's server and then the baseline's (the other way round in
       even rounds, which cancels slow drift): --clients clients (raw httpx, one connection each)
       take requests of --request-size texts from a shared queue until --texts texts are done,
       POST /v1/embeddings with "encoding_format": "float" through Envoy; each answer's body is
       counted and parsed with json.loads (its CPU time timed apart), its vectors cast to float32
       stop both (SIGTERM, exit 0 checked) and both Envoys

The warm-up and every round have texts of their own, cut from one seeded corpus: both codes get
the same texts in a round, and no server gets a text twice, so a server that caches vectors by
text answers every one with the model. Per pass: JSON body bytes per float, texts/s and floats/s
answered (wall), json.loads CPU seconds per MB and nanoseconds per float, and the CPU of server,
Envoy and bench per text. The figures are medians of --rounds rounds (min-max); new/old ratios are
taken round by round, then the median. Only ratios within one run compare: the machine is shared.
It is a benchmark, not a test: it asserts nothing about speed. It fails (exit 1) when a float the
new code answered, cast to float32, is not exactly the old code's for the same text in the same
round (the same model and inputs give the same float32 values; only their printing changed), on a
failed request, or on a server that does not exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from bench.ceiling_phases import CODES, NEW, OLD
from bench.harness import FloatArray, chunks, emit, make_corpus, max_abs_diff, step
from bench.inprocess import DEFAULT_DENSE_MODEL
from bench.load import Clock, queue_load
from bench.options import add_shared_args, bench_parser, check_positive, server_flags
from bench.process import Baseline, Gateway, ServerProcess, machine_busy_s
from bench.report import json_floats_report
from bench.shared_phases import Spread, checkout_commit, quotient
from bench.summary import json_floats_summary

# The parent of 5a7ac2a, which made JSON floats the shortest decimal that round-trips.
DEFAULT_BASELINE = "5a7ac2a^"
# Words per text: short, so the model's share is small next to what the JSON costs per text.
WORDS = (8, 16)
ROUTE = "/v1/embeddings"
# How long one request may take before the run fails.
CALL_TIMEOUT_S = 120.0
# Characters of an error body quoted when a request fails.
DETAIL_CHARS = 300
# Warm-up requests per client, on each code.
WARMUP_PER_CLIENT = 2
MISMATCH = "json_floats_bench: a float, cast to float32, differs from the baseline's"


# -- one request and one pass ----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One POST /v1/embeddings answer: its body's size, the CPU seconds json.loads took on it and
    its vectors as float32."""

    body_bytes: int
    parse_cpu_s: float
    vectors: FloatArray


async def post_floats(client: httpx.AsyncClient, model: str, texts: list[str]) -> Answer:
    """POST /v1/embeddings with "encoding_format": "float"; raises on anything but 200."""
    response = await client.post(ROUTE, json={"model": model, "input": texts, "encoding_format": "float"})
    if response.status_code != 200:
        raise RuntimeError(f"POST {ROUTE} answered {response.status_code}: {response.text[:DETAIL_CHARS]}")
    body = response.content
    # Thread CPU time, not wall: a descheduled bench process (2 shared cores) does not count.
    started = time.thread_time()
    parsed = json.loads(body)
    parse_cpu_s = time.thread_time() - started
    data = sorted(parsed["data"], key=lambda d: int(d["index"]))
    vectors = np.array([d["embedding"] for d in data], dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise RuntimeError(f"POST {ROUTE} answered vectors of shape {vectors.shape} for {len(texts)} texts")
    return Answer(len(body), parse_cpu_s, vectors)


@dataclass(frozen=True)
class Pass:
    """The corpus once through one code's Envoy and server: wall time, what the answers held, and
    CPU seconds (json.loads apart; `idle_cpu_s` is the other code's server and Envoy, unloaded
    meanwhile, and `other_cpu_s` the rest of the machine)."""

    code: str
    round: int
    seconds: float
    texts: int
    floats: int
    body_bytes: int
    parse_cpu_s: float
    bench_cpu_s: float
    server_cpu_s: float
    envoy_cpu_s: float
    idle_cpu_s: float
    other_cpu_s: float

    def figures(self) -> dict[str, float]:
        """The pass's figures by name."""
        watched = self.bench_cpu_s + self.server_cpu_s + self.envoy_cpu_s
        per_text_ms = 1e3 / self.texts
        return {
            "bytes_per_float": self.body_bytes / self.floats,
            "texts_per_s": self.texts / self.seconds,
            "floats_per_s": self.floats / self.seconds,
            "parse_s_per_mb": self.parse_cpu_s / (self.body_bytes / 1e6),
            "parse_ns_per_float": self.parse_cpu_s * 1e9 / self.floats,
            "server_envoy_cpu_ms_per_text": (self.server_cpu_s + self.envoy_cpu_s) * per_text_ms,
            "server_cpu_ms_per_text": self.server_cpu_s * per_text_ms,
            "envoy_cpu_ms_per_text": self.envoy_cpu_s * per_text_ms,
            "bench_cpu_ms_per_text": self.bench_cpu_s * per_text_ms,
            "cores_used": watched / self.seconds,
            "idle_code_cores": self.idle_cpu_s / self.seconds,
            "other_cores": self.other_cpu_s / self.seconds,
        }


@dataclass(frozen=True)
class Target:
    """One code's running server and Envoy."""

    code: str
    commit: str
    server: ServerProcess
    envoy: Gateway


async def run_pass(
    target: Target, idle: Target, model: str, requests: Sequence[list[str]], clients: int, round_: int
) -> tuple[Pass, FloatArray]:
    """`requests` once through `target`'s Envoy by `clients` clients taking the next request from
    a shared queue, while `idle` waits; connecting is part of the pass. Returns what it measured
    and the vectors in corpus order."""
    headers = {"accept-encoding": "identity"}  # the JSON bytes themselves (Envoy compresses nothing anyway)
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=target.envoy.base_url, headers=headers, timeout=CALL_TIMEOUT_S)
            )
            for _ in range(clients)
        ]
        pids = (target.server.proc.pid, target.envoy.process.pid, idle.server.proc.pid, idle.envoy.process.pid)
        busy, clock = machine_busy_s(), Clock(*pids)
        answers, _ = await queue_load(sessions, requests, lambda session, texts: post_floats(session, model, texts))
        elapsed, busy = clock.read(), machine_busy_s() - busy
    server_cpu_s, envoy_cpu_s, *idle_cpu_s = elapsed.cpu_s
    vectors = np.concatenate([a.vectors for a in answers])
    other_cpu_s = busy - elapsed.own_cpu_s - server_cpu_s - envoy_cpu_s - sum(idle_cpu_s)
    measured = Pass(
        target.code,
        round_,
        elapsed.seconds,
        len(vectors),
        vectors.size,
        sum(a.body_bytes for a in answers),
        sum(a.parse_cpu_s for a in answers),
        elapsed.own_cpu_s,
        server_cpu_s,
        envoy_cpu_s,
        sum(idle_cpu_s),
        other_cpu_s,
    )
    return measured, vectors


# -- the rounds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """The new code's floats against the old code's for the same texts: how many were compared,
    how many of them, cast to float32, differ, and by how much at most."""

    floats: int = 0
    differing: int = 0
    max_abs_diff: float = 0.0

    def add(self, new: FloatArray, old: FloatArray) -> Check:
        """This check with one more round's vectors compared."""
        if new.shape != old.shape:
            return Check(self.floats + old.size, self.differing + old.size, float("inf"))
        differing = int(np.count_nonzero(new != old))
        return Check(self.floats + new.size, self.differing + differing, max(self.max_abs_diff, max_abs_diff(new, old)))


@dataclass
class JsonFloatsBench:
    """All that bench.json_floats measured: each code's commit, the texts' words and the vectors'
    length, every pass in the order run, and the new code's floats against the old code's."""

    commits: dict[str, str]  # by code; this checkout's with "+changes" when server/ or proto/ differ
    words: tuple[int, int]  # per text, least and most
    dimension: int
    passes: list[Pass]
    check: Check

    def of(self, code: str) -> list[Pass]:
        """One code's passes, in round order."""
        return sorted((p for p in self.passes if p.code == code), key=lambda p: p.round)

    def spread(self, name: str, code: str) -> Spread:
        """A figure of Pass.figures over one code's rounds."""
        return Spread.of([p.figures()[name] for p in self.of(code)])

    def ratio(self, name: str) -> Spread:
        """A figure of the new code over the old, round by round."""
        pairs = zip(self.of(NEW), self.of(OLD), strict=True)
        return Spread.of([quotient(new.figures()[name], old.figures()[name]) for new, old in pairs])

    @property
    def diffs(self) -> dict[str, float]:
        """Largest |new - old| of a float32 for the same text."""
        return {f"{NEW}_vs_{OLD}": self.check.max_abs_diff}


@dataclass(frozen=True)
class Plan:
    """What the run sends: the warm-up's requests, then each round's, on texts that no server has
    seen before (a server that caches vectors by text would answer repeats without the model)."""

    model: str
    warm_up: list[list[str]]
    rounds: list[list[list[str]]]
    clients: int

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        """One seeded corpus of --texts for the warm-up and for each round, cut into requests."""
        corpus = make_corpus(args.texts * (args.rounds + 1), args.seed, *WORDS)
        warm_up, *rounds = [chunks(texts, args.request_size) for texts in chunks(corpus, args.texts)]
        return cls(args.model, warm_up[: WARMUP_PER_CLIENT * args.clients], rounds, args.clients)


async def measure(plan: Plan, targets: dict[str, Target]) -> tuple[list[Pass], Check]:
    """The warm-up on each code, then every round on both, new first in odd rounds and old first
    in even ones. Returns the passes in the order run and the new code's floats against the old's."""
    other = {NEW: targets[OLD], OLD: targets[NEW]}
    for code in CODES:
        await run_pass(targets[code], other[code], plan.model, plan.warm_up, plan.clients, 0)
    passes: list[Pass] = []
    check = Check()
    for round_, requests in enumerate(plan.rounds, 1):
        vectors, rates = {}, []
        for code in CODES if round_ % 2 else CODES[::-1]:
            target = targets[code]
            measured, vectors[code] = await run_pass(target, other[code], plan.model, requests, plan.clients, round_)
            passes.append(measured)
            figures = measured.figures()
            rates.append(f"{code} {figures['texts_per_s']:.0f} texts/s, {figures['bytes_per_float']:.2f} B/float")
        check = check.add(vectors[NEW], vectors[OLD])
        step(f"round {round_}/{len(plan.rounds)}: {'; '.join(rates)}")
    return passes, check


def start(stack: contextlib.ExitStack, code: str, commit: str, flags: Sequence[str], args: argparse.Namespace,
          baseline: Baseline | None) -> Target:  # fmt: skip
    """One code's server and, in front of it, Envoy; both stopped when `stack` closes."""
    server = stack.enter_context(ServerProcess(flags, args.startup_timeout, baseline, queue_limit=False))
    envoy = stack.enter_context(Gateway(server.address))
    step(f"{code} ({commit}): server on {server.address}, Envoy on {envoy.address}")
    return Target(code, commit, server, envoy)


def run(args: argparse.Namespace) -> JsonFloatsBench:
    """Both codes behind Envoy for the whole run, then the rounds of the module docstring."""
    plan, flags = Plan.make(args), server_flags(args, args.model)
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(Baseline(args.baseline))
        targets = {
            NEW: start(stack, NEW, checkout_commit(), flags, args, None),
            OLD: start(stack, OLD, baseline.commit, flags, args, baseline),
        }
        passes, check = asyncio.run(measure(plan, targets))
    step("servers stopped (exit 0)")
    commits = {code: t.commit for code, t in targets.items()}
    return JsonFloatsBench(commits, WORDS, passes[0].floats // passes[0].texts, passes, check)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared options (--baseline-window is unused: no in-process side) and this bench's own."""
    quick = "smoke run: 256 texts, 1 round"
    p = bench_parser("bench.json_floats", __doc__, 4096, "corpus size", quick, "corpus seed")
    add_shared_args(p)
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians taken (default 3)")
    p.add_argument("--model", default=DEFAULT_DENSE_MODEL, help=f"model (default {DEFAULT_DENSE_MODEL})")
    p.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help=f"commit to measure against (default {DEFAULT_BASELINE})"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.rounds = min(args.texts, 256), 1
    check_positive(p, args, "texts", "batch_size", "request_size", "clients", "rounds")
    if not args.baseline:
        p.error("--baseline is needed: the bench compares two codes")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench, prints the report and the JSON line; 1 when a float differs from the baseline's."""
    args = parse_args(argv)
    bench = run(args)
    code = emit(json_floats_report(args, bench), json_floats_summary(args, bench), args.json_out, MISMATCH)
    if bench.check.differing:
        print(f"{MISMATCH}: {bench.check.differing:,} of {bench.check.floats:,} floats", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
