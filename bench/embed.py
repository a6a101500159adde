"""Measures how close the gRPC server comes to the in-process ceiling, in one run on one corpus.

Phases, in this order so the baseline and the server phases see the same machine:

  (a1) in-process ONNX Runtime, built from the server's own pieces (no server running)
       start the server (`python -m embedserve`, the way users start it)
  (d)  idle latency of one short input through Embed
  (b)  Embed throughput, N concurrent clients
  (c)  EmbedStream throughput, one stream, a bounded number of requests in flight
  (d)  latency of one short input while (b)-style load runs
  (b') with --presorted: (b) with the corpus sent shortest first, which leaves batching almost
       nothing to pad, so (b')/(a) is the cost of the RPC path alone
       stop the server (SIGTERM: it drains and exits 0)
  (a2) in-process ONNX Runtime again; (a) = mean of a1 and a2, which cancels slow drift
  (e)  wire form: packed floats vs float32_le bytes for 2048 x 384 vectors (no server)

The bench process is both the baseline and the gRPC client, so on a small machine the client's
own CPU is part of what (b) and (c) pay; the table shows CPU seconds per process to make that
visible, and a CPU-seconds ratio beside the wall-time one, which a busy neighbour skews less.
Every server vector is compared with the in-process one. bench/README.md says how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from bench.harness import Ceiling, bench_main, length_order, make_corpus, max_abs_diff, padding_efficiency, step
from bench.inprocess import DEFAULT_DENSE_MODEL, Runner, measure_dense, measure_wire, server_defaults
from bench.options import add_shared_args, bench_parser, check_positive, server_flags
from bench.phases import EmbedBench, measure_embed_server
from bench.process import ServerProcess
from bench.report import embed_report
from bench.summary import embed_summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared options and this bench's own."""
    window = server_defaults().stream_window
    quick = "smoke run: 384 texts, fewer latency calls and wire repeats"
    p = bench_parser("bench.embed", __doc__, 3000, "corpus size", quick, "corpus and wire-vector seed")
    add_shared_args(p)
    p.add_argument(
        "--presorted",
        action="store_true",
        help="also run (b) with the corpus sent shortest first, so batches barely pad: (b')/(a) is the "
        "cost of the RPC path alone, (b)/(b') the cost of batching what arrives",
    )
    p.add_argument(
        "--stream-in-flight",
        type=int,
        default=2 * window,
        help=f"unanswered EmbedStream requests (default {2 * window}, twice the server's window)",
    )
    p.add_argument("--idle-calls", type=int, default=50, help="sequential calls for idle latency (default 50)")
    p.add_argument("--wire-vectors", type=int, default=2048, help="vectors in the wire test (default 2048)")
    p.add_argument("--wire-dimension", type=int, default=384, help="dimension in the wire test (default 384)")
    p.add_argument("--wire-repeats", type=int, default=9, help="repeats per wire step, median taken (default 9)")
    p.add_argument("--model", default=DEFAULT_DENSE_MODEL, help=f"model (default {DEFAULT_DENSE_MODEL})")
    args = p.parse_args(argv)
    if args.quick:
        args.texts = min(args.texts, 384)
        args.idle_calls = min(args.idle_calls, 20)
        args.wire_repeats = min(args.wire_repeats, 3)
    check_positive(
        p, args, "texts", "batch_size", "request_size", "clients", "stream_in_flight", "idle_calls", "wire_repeats"
    )
    return args


def run(args: argparse.Namespace) -> EmbedBench:
    """All phases, in the order of the module docstring."""
    corpus = make_corpus(args.texts, args.seed)
    runner = Runner.from_args(args)

    step(f"(a1) in-process baseline on {len(corpus)} texts")
    a_vectors, a1 = measure_dense(args.model, corpus, runner)
    step(f"(a1) {a1.texts_per_s(len(corpus)):.1f} texts/s; starting the server")

    with ServerProcess(server_flags(args, args.model), args.startup_timeout, queue_limit=False) as server:
        step(f"server on {server.address} ({' '.join(server.command[1:])})")
        by_length = length_order(a1.lengths, 0) if args.presorted else None
        results = asyncio.run(measure_embed_server(args, server, corpus, by_length))
    step(
        f"(b) {results.embed.texts_per_s:.1f} texts/s, (c) {results.stream.texts_per_s:.1f} texts/s; "
        f"server stopped (exit 0); (a2) in-process baseline"
    )

    _, a2 = measure_dense(args.model, corpus, runner)
    step(f"(a2) {a2.texts_per_s(len(corpus)):.1f} texts/s; (e) wire form")
    wire = measure_wire(args.wire_vectors, args.wire_dimension, args.seed, args.wire_repeats)

    diffs = {
        "embed": max_abs_diff(results.embed_vectors, a_vectors),
        "stream": max_abs_diff(results.stream_vectors, a_vectors),
    }
    if results.presorted_vectors is not None:
        diffs["presorted"] = max_abs_diff(results.presorted_vectors, a_vectors)
    best_padding = padding_efficiency(a1.lengths, args.batch_size, args.clients * args.request_size)
    return EmbedBench(Ceiling(a1, a2, len(corpus)), results, wire, diffs, best_padding)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench, prints the report and the JSON line; 1 when the vectors differ."""
    mismatch = "embed_bench: server vectors differ from in-process ones"
    return bench_main(argv, parse_args, run, embed_report, embed_summary, mismatch)


if __name__ == "__main__":
    sys.exit(main())
