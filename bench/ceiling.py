"""The request-path ceiling (issue 9): what the server spends per text beyond the forward pass,
with a tiny model whose forward pass is cheap, for this checkout's server against a baseline
commit's in one run.

The model: a seeded random BertModel (2 layers, hidden --hidden-size, 2 heads, intermediate 4x
hidden) with all-MiniLM-L6-v2's tokenizer, mean pooling and Normalize, max 256 tokens, built once
under --cache-dir (bench/tiny.py). The corpus: seeded texts of 8-16 words.

  (f)  in-process: the corpus tokenized, sorted by length, cut into batches of --batch-size and
       run through ONNX Runtime with the server's own pieces; the CPU seconds of the forward
       passes alone, run as each code's server runs them (new: this checkout's intra-op threads
       per forward worker, no spinning; old: every core, spinning), are the forward share of
       each server's CPU (no server running)
       start both servers (`python -m embedserve`, this checkout's and --baseline's worktree)
  each round, each phase on one server and then the other (odd rounds this checkout first):
  (u)  Embed, --clients unary clients x --request-size texts, the corpus once (shared queue)
  (U)  the same with --many-clients clients
  (s)  one EmbedStream, --request-size texts a request, --stream-in-flight unanswered
  (p)  py-spy on each server for --profile-seconds under the (u) load
       stop both (SIGTERM, exit 0 checked)

It prints texts/s per phase and code (medians of --rounds, min-max), the ratio this checkout /
baseline round by round (target >= 2.0), server CPU ms per 1,000 texts split into the forward
pass (f) and the rest, and where the profiles' samples were. It fails when a vector differs
from the in-process one beyond the tolerance, or between the two codes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

from bench.ceiling_phases import NEW, OLD, CeilingBench, Plan, measure_servers, phases
from bench.harness import bench_main, make_corpus, step
from bench.inprocess import Runner, measure_forward, server_forward_setup, spinning_setup
from bench.options import add_shared_args, bench_parser, check_positive, server_flags
from bench.process import Baseline, ServerProcess
from bench.report import ceiling_report
from bench.shared import DEFAULT_BASELINE
from bench.shared_phases import checkout_commit
from bench.summary import ceiling_summary
from bench.tiny import cached_tiny_dense

# Words per text: short, so the forward pass is small next to what each text costs beside it.
WORDS = (8, 16)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared options and this bench's own."""
    quick = "smoke run: 2048 texts, 1 round, 3 s profiles"
    p = bench_parser("bench.ceiling", __doc__, 16384, "corpus size", quick, "corpus seed")
    add_shared_args(p)
    p.add_argument("--many-clients", type=int, default=64, help="clients of the second Embed phase (default 64)")
    p.add_argument("--stream-in-flight", type=int, default=32, help="unanswered EmbedStream requests (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians taken (default 3)")
    p.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help=f"commit to measure against (default {DEFAULT_BASELINE})"
    )
    p.add_argument(
        "--profile-seconds",
        type=float,
        default=10.0,
        help="py-spy each server this long under the first Embed load; 0 skips it (default 10)",
    )
    p.add_argument("--hidden-size", type=int, default=128, help="the tiny model's hidden size (default 128)")
    p.add_argument("--forward-repeats", type=int, default=3, help="in-process forward passes, least CPU taken")
    args = p.parse_args(argv)
    if args.quick:
        args.texts = min(args.texts, 2048)
        args.rounds = 1
        args.profile_seconds = min(args.profile_seconds, 3.0)
    check_positive(p, args, "texts", "batch_size", "request_size", "clients", "many_clients", "stream_in_flight")
    check_positive(p, args, "rounds", "hidden_size", "forward_repeats")
    return args


def run(args: argparse.Namespace) -> CeilingBench:
    """All phases, in the order of the module docstring."""
    model = cached_tiny_dense(args.cache_dir, args.hidden_size)
    corpus = make_corpus(args.texts, args.seed, *WORDS)
    step(f"(f) in-process forward passes over {len(corpus)} texts, {model.name}")
    setups = {NEW: server_forward_setup(args.intra_op_threads), OLD: spinning_setup(args.intra_op_threads)}
    reference, forward = measure_forward(model, corpus, Runner.from_args(args), args.forward_repeats, setups)
    costs = ", ".join(f"{code} {cost.cpu_ms_per_1000():.1f}" for code, cost in forward.items())
    step(f"(f) CPU ms per 1,000 texts: {costs}; starting both servers")
    plan = Plan(
        corpus,
        args.request_size,
        args.stream_in_flight,
        args.rounds,
        phases(args.clients, args.many_clients, args.request_size, args.stream_in_flight),
    )
    flags = server_flags(args, str(model))
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(Baseline(args.baseline))
        servers = {
            NEW: stack.enter_context(ServerProcess(flags, args.startup_timeout, queue_limit=False)),
            OLD: stack.enter_context(ServerProcess(flags, args.startup_timeout, baseline, queue_limit=False)),
        }
        step(f"servers: new on {servers[NEW].address}, old ({baseline.commit}) on {servers[OLD].address}")
        samples, profiles, diffs = asyncio.run(measure_servers(plan, servers, reference, args.profile_seconds))
    step("servers stopped (exit 0)")
    return CeilingBench(model, checkout_commit(), baseline.commit, plan.phases, forward, samples, profiles, diffs)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench, prints the report and the JSON line; 1 when the vectors differ."""
    mismatch = "ceiling_bench: server vectors differ from in-process ones or between the codes"
    return bench_main(argv, parse_args, run, ceiling_report, ceiling_summary, mismatch)


if __name__ == "__main__":
    sys.exit(main())
