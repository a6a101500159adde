"""Shared traffic (issue 9): how fast a short interactive query is answered while bulk jobs
saturate the server, what the queries cost the bulk jobs, and how two tenants' bulk streams
share the server; against this checkout's server and a baseline commit's, in one run.

Each round, for this checkout's server and then the baseline's (the other way round in even
rounds, which cancels slow drift):

       start the server (`python -m embedserve`, the way users start it)
  (u)  --clients unary clients x --request-size texts run the corpus once (closed loop, shared
       queue), alone
  (s)  one EmbedStream runs the corpus once, --stream-in-flight unanswered, alone
       ((u) and (s) come before any short query: a scheduler may keep bulk batches short for
       a while after one, and "alone" would not be alone)
  (q)  idle: "a short query about embeddings" through Embed, open loop at --rate per second
       (each call sent on its schedule, answered or not, and timed on its own), --idle-seconds
  (u+q) (u) again, with the queries running from one period after its start until its end
  (s+q) (s) again, with the queries running
       stop it (SIGTERM, exit 0 checked); start it again with --api-keys "k1;k2"
  (t)  two EmbedStream jobs, one per API key and connection, started together, the corpus each;
       each tenant's texts/s over the time both run
       stop it

Every bulk job stops sending after --max-seconds. The figures are medians of --rounds rounds
(min-max); ratios (with / without queries, this checkout / baseline) are taken round by round.
It is a benchmark, not a test: it asserts nothing about speed. It fails when something is wrong:
a failed RPC, a stream id unanswered or answered twice, a server that does not exit 0, or an
input answered with other vectors than the first time (any condition, either code).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from bench.harness import bench_main, chunks, make_corpus, step
from bench.inprocess import DEFAULT_DENSE_MODEL, server_defaults
from bench.options import add_baseline_arg, add_shared_args, bench_parser, check_positive, server_flags
from bench.process import Baseline
from bench.report import shared_report
from bench.shared_phases import Plan, Reference, Round, SharedBench, checkout_commit, measure_round
from bench.summary import shared_summary
from embedserve.v1 import embedding_service_pb2 as pb

# The commit before issue 9's scheduler: "today's code" of the issue.
DEFAULT_BASELINE = "5d22d87"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared options (no in-process side here: --baseline-window is unused) and this bench's own."""
    window = server_defaults().stream_window
    quick = "smoke run: 256 texts, 1 round, 3 idle seconds, bulk jobs cut at 60 s"
    p = bench_parser("bench.shared", __doc__, 2048, "corpus size", quick, "corpus seed")
    add_shared_args(p)
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians taken (default 3)")
    p.add_argument("--rate", type=float, default=10.0, help="short queries per second, open loop (default 10)")
    p.add_argument(
        "--idle-seconds", type=float, default=10.0, help="seconds of queries on the idle server (default 10)"
    )
    p.add_argument("--max-seconds", type=float, default=120.0, help="a bulk job sends nothing after this (default 120)")
    p.add_argument(
        "--stream-in-flight",
        type=int,
        default=2 * window,
        help=f"unanswered EmbedStream requests per job (default {2 * window}, twice the server's window)",
    )
    p.add_argument("--model", default=DEFAULT_DENSE_MODEL, help=f"model (default {DEFAULT_DENSE_MODEL})")
    add_baseline_arg(p, DEFAULT_BASELINE)
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.rounds = min(args.texts, 256), 1
        args.idle_seconds, args.max_seconds = min(args.idle_seconds, 3.0), min(args.max_seconds, 60.0)
    check_positive(p, args, "texts", "batch_size", "request_size", "clients", "stream_in_flight", "rounds")
    if not (args.rate > 0 and args.idle_seconds > 0 and args.max_seconds > 0):
        p.error("--rate, --idle-seconds and --max-seconds must be positive")
    return args


def run(args: argparse.Namespace) -> SharedBench:
    """--rounds rounds against this checkout's server and the baseline's, alternating which goes first."""
    corpus = make_corpus(args.texts, args.seed)
    requests = [pb.EmbedRequest(inputs=texts) for texts in chunks(corpus, args.request_size)]
    plan = Plan(requests, args.clients, args.stream_in_flight, args.rate, args.idle_seconds, args.max_seconds)
    flags, reference = server_flags(args, args.model), Reference()
    rounds: dict[str, list[Round]] = {"checkout": [], "baseline": []}
    with Baseline(args.baseline) if args.baseline else contextlib.nullcontext() as baseline:
        codes = [("checkout", None), *([("baseline", baseline)] if baseline else [])]
        for number in range(args.rounds):
            for name, code in codes if number % 2 == 0 else codes[::-1]:
                step(f"round {number + 1} of {args.rounds}: {name} ({code.commit if code else checkout_commit()})")
                rounds[name].append(measure_round(flags, args.startup_timeout, code, plan, reference))
        baseline_commit = baseline.commit if baseline else None
    return SharedBench(checkout_commit(), baseline_commit, rounds["checkout"], rounds["baseline"], reference.worst)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench, prints the report and the JSON line; 1 when an input got other vectors."""
    mismatch = "shared_bench: an input was answered with other vectors than the first time"
    return bench_main(argv, parse_args, run, shared_report, shared_summary, mismatch)


if __name__ == "__main__":
    sys.exit(main())
