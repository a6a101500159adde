"""Overload (issue 10): does the server shed a load several times its capacity, fast, while it
keeps answering what it admits at its capacity and health stays fast? Against this checkout's
server and, in the same run, a baseline commit's (by default the one before admission by cost,
whose queue held 16,384 inputs and refused only after tokenizing).

For this checkout's server and then the baseline's, each with Envoy (envoy/gateway.py) in front:

       start the server (`python -m embedserve`, the way users start it) and Envoy
       warm-up: the capacity phase's clients for --warmup-seconds, untimed
  (c)  capacity: --clients unary Embed clients, closed loop, for --capacity-seconds; texts/s answered
  (k)  overload, closed loop: --grpc-clients unary Embed clients (over --connections connections)
       and --rest-clients POST /v1/embeddings clients through Envoy (httpx, one connection each),
       each sending one request per period, the periods set so that together they would offer
       --factor x the capacity (c), for --seconds; each client waits for its last request to end
       before it sends the next, so a server that answers slowly is offered less
  (o)  overload, open loop: the same clients and periods, but every request goes out when due,
       answered or not: the offered load is --factor x (c) whatever the server does
       during (k) and (o), a process of its own (bench.probe) times grpc.health.v1 Check every 50 ms
       stop both (SIGTERM, exit 0 checked)

Requests hold --request-size / 2 .. --request-size seeded texts of 8-16 words. A refused client
does not back off (it keeps its pace). Each phase waits for every request it sent to end (at most
60 s each) before the next starts. It is a benchmark, not a test: it asserts nothing about speed.
It fails when something is wrong: a server that does not exit 0, a request failing while the
capacity is measured, or a request answered with other vectors than the first time it was
answered (either path, either code).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Sequence

from bench.harness import bench_main, step
from bench.inprocess import DEFAULT_DENSE_MODEL
from bench.options import add_baseline_arg, add_shared_args, bench_parser, check_positive, server_flags
from bench.overload_phases import PATHS, CodeRun, OverloadBench, Plan, Shape, make_requests, measure_code
from bench.process import Baseline
from bench.report import overload_report
from bench.shared_phases import Reference, checkout_commit
from bench.summary import overload_summary

# The commit before admission by cost: its queue held 16,384 inputs and refused after tokenizing.
DEFAULT_BASELINE = "400001f"
# Words per text: short texts, so that the request path, not the model alone, is loaded.
WORDS = (8, 16)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared options (--baseline-window is unused: no in-process side) and this bench's own."""
    quick = "smoke run: 1 s warm-up, 4 s capacity, 8 s per overload"
    p = bench_parser("bench.overload", __doc__, 4096, "distinct texts, cut into requests", quick, "seed")
    add_shared_args(p)
    p.set_defaults(request_size=16)
    p.add_argument("--grpc-clients", type=int, default=256, help="overload: unary Embed clients (default 256)")
    p.add_argument("--rest-clients", type=int, default=64, help="overload: REST clients through Envoy (default 64)")
    p.add_argument("--connections", type=int, default=32, help="gRPC connections the clients share (default 32)")
    p.add_argument("--factor", type=float, default=8.0, help="offered load / capacity (default 8)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of each overload, (k) and (o) (default 20)")
    p.add_argument("--capacity-seconds", type=float, default=10.0, help="seconds of (c) (default 10)")
    p.add_argument("--warmup-seconds", type=float, default=3.0, help="seconds of warm-up (default 3)")
    p.add_argument("--model", default=DEFAULT_DENSE_MODEL, help=f"model (default {DEFAULT_DENSE_MODEL})")
    add_baseline_arg(p, DEFAULT_BASELINE)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup_seconds, args.capacity_seconds = min(args.warmup_seconds, 1.0), min(args.capacity_seconds, 4.0)
        args.seconds = min(args.seconds, 8.0)
    check_positive(p, args, "texts", "batch_size", "request_size", "clients", "grpc_clients", "connections")
    if args.rest_clients < 0 or not (args.factor > 0 and args.seconds > 0 and args.capacity_seconds > 0):
        p.error("--rest-clients must be >= 0 and --factor, --seconds, --capacity-seconds positive")
    return args


def run(args: argparse.Namespace) -> OverloadBench:
    """Each code's server under the same plan, this checkout's first."""
    sizes = (max(1, args.request_size // 2), args.request_size)
    requests = make_requests(args.texts, sizes, WORDS, args.seed)
    capacity = Shape(args.clients, 0, args.capacity_seconds)
    closed = Shape(args.grpc_clients, args.rest_clients, args.seconds)
    overloads = (closed, dataclasses.replace(closed, closed=False))
    plan = Plan(args.model, requests, args.warmup_seconds, capacity, overloads, args.factor, args.connections)
    flags, reference = server_flags(args, args.model), Reference(*PATHS)
    runs: dict[str, CodeRun] = {}
    with Baseline(args.baseline) if args.baseline else contextlib.nullcontext() as baseline:
        codes: list[tuple[str, Baseline | None, str]] = [("checkout", None, checkout_commit())]
        if baseline is not None:
            codes.append(("baseline", baseline, baseline.commit))
        for name, code, commit in codes:
            step(f"{name} ({commit})")
            runs[name] = measure_code(flags, args.startup_timeout, code, plan, reference, commit)
    return OverloadBench(runs, reference.worst)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench, prints the report and the JSON line; 1 when a request got other vectors."""
    mismatch = "overload_bench: a request was answered with other vectors than the first time"
    return bench_main(argv, parse_args, run, overload_report, overload_summary, mismatch)


if __name__ == "__main__":
    sys.exit(main())
