"""REST through Envoy vs native gRPC, and the Python client's bulk helper vs in-process ONNX
Runtime, measured in one run on one seeded corpus.

Phases, in this order:

  (a1) in-process ONNX Runtime, built from the server's own pieces (no server running)
       start the server (`python -m embedserve`) and Envoy (envoy/gateway.py's config)
  (l)  idle latency of one short input, one call at a time: gRPC direct, gRPC via Envoy, REST
       via Envoy (OpenAI SDK): what each path adds when the model is not the bottleneck
  (g)  Embed straight to the server: --clients concurrent clients, one connection each
  (e)  the same through Envoy's port (gRPC passthrough): what the proxy hop costs
  (r)  POST /v1/embeddings through Envoy with the official OpenAI SDK as users run it
       (AsyncOpenAI, default encoding_format=base64, decoded by the SDK into lists of floats),
       one client (connection) per concurrent caller
  (g), (e), (r) again; each figure is the mean of its two passes, which cancels slow drift
  (k)  embedserve_client's bulk_embed over the whole corpus (one EmbedStream, bounded window,
       input order), straight to the server
       stop the server (SIGTERM) and Envoy
  (a2) in-process again; the ceiling (a) is the mean of (a1) and (a2)

Ratios: (r)/(g), target >= 0.80 (issue 4); (k)/(a). Every vector is checked: REST and gRPC
answers must equal the in-process ones within the tolerance. It is a benchmark, not a test: it
fails only on wrong vectors or a server that does not exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from bench.harness import Ceiling, bench_main, make_corpus, max_abs_diff, step
from bench.inprocess import DEFAULT_DENSE_MODEL, Runner, measure_dense
from bench.options import add_shared_args, bench_parser, check_positive, server_flags
from bench.process import Gateway, ServerProcess
from bench.report import rest_report
from bench.rest_phases import RestBench, measure_rest
from bench.summary import rest_summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared options and this bench's own."""
    p = bench_parser("bench.rest", __doc__, 2000, "corpus size", "smoke run: 256 texts", "corpus seed")
    p.add_argument("--model", default=DEFAULT_DENSE_MODEL, help=f"model (default {DEFAULT_DENSE_MODEL})")
    p.add_argument("--idle-calls", type=int, default=50, help="sequential calls per path for idle latency (default 50)")
    add_shared_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.texts = min(args.texts, 256)
        args.idle_calls = min(args.idle_calls, 10)
    check_positive(p, args, "texts", "batch_size", "request_size", "clients", "idle_calls")
    return args


def run(args: argparse.Namespace) -> RestBench:
    """All phases, in the order of the module docstring."""
    corpus = make_corpus(args.texts, args.seed)
    runner = Runner.from_args(args)
    step(f"(a1) in-process baseline on {len(corpus)} texts")
    expected, a1 = measure_dense(args.model, corpus, runner)
    with (
        ServerProcess(server_flags(args, args.model), args.startup_timeout, queue_limit=False) as server,
        Gateway(server.address) as envoy,
    ):
        step(f"server on {server.address}, Envoy on {envoy.address}")
        pids = (server.proc.pid, envoy.process.pid)
        measured = asyncio.run(measure_rest(args, server.address, envoy.address, pids, corpus))
    step("(a2) in-process baseline")
    _, a2 = measure_dense(args.model, corpus, runner)
    diffs = {name: max_abs_diff(v, expected) for name, v in measured.vectors.items()}
    return RestBench(Ceiling(a1, a2, len(corpus)), measured, diffs)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench, prints the report and the JSON line; 1 when the vectors differ."""
    mismatch = "rest_bench: REST/gRPC vectors differ from in-process ones"
    return bench_main(argv, parse_args, run, rest_report, rest_summary, mismatch)


if __name__ == "__main__":
    sys.exit(main())
