"""The vector cache on a corpus of which half the texts repeat: `Embed` throughput of a server with
the cache (--cache-bytes, 64 MiB) over one without it (VECTOR_CACHE_BYTES=0), both started
once and measured in alternation, on a fresh corpus each round so that no round finds the last
one's vectors. Fails when the two servers' vectors differ.

Usage: python -m bench.cache [--texts N] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.harness import FloatArray, bench_main, chunks, make_corpus, max_abs_diff, step
from bench.inprocess import DEFAULT_DENSE_MODEL
from bench.load import Connections, Throughput, decode, embed_call, timed_load
from bench.options import add_shared_args, bench_parser, check_positive, server_flags
from bench.process import ServerProcess
from embedserve.v1 import embedding_service_pb2 as pb

SIDES = ("on", "off")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The corpus options, the rounds, the share of repeats, the cache's bytes and the shared options."""
    p = bench_parser(
        "bench.cache",
        __doc__,
        2048,
        "texts a round, half of them repeats of the other half",
        "smoke run: 256 texts a round, 2 rounds",
        "corpus seed; round r uses seed + r",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds, each measuring both servers (default 3)")
    p.add_argument(
        "--repeated", type=float, default=0.5, help="share of the texts that repeat another text (default 0.5)"
    )
    p.add_argument(
        "--cache-bytes", type=int, default=64 << 20, help="VECTOR_CACHE_BYTES of the cached server (default 64 MiB)"
    )
    add_shared_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.rounds = 256, 2
    check_positive(p, args, "texts", "rounds", "request_size", "clients", "cache_bytes")
    if not 0 <= args.repeated < 1:
        p.error("--repeated must be at least 0 and below 1")
    return args


def repeated_corpus(texts: int, repeated: float, seed: int) -> list[str]:
    """`texts` texts in seeded random order, `repeated` of them copies of the distinct others."""
    distinct = make_corpus(max(1, round(texts * (1 - repeated))), seed)
    rng = random.Random(seed)
    corpus = distinct + [rng.choice(distinct) for _ in range(texts - len(distinct))]
    rng.shuffle(corpus)
    return corpus


@dataclass
class CacheBench:
    """Each round's throughput of both servers, their vectors' largest difference, the share of
    inputs the cached server answered from its cache, and the servers' exit codes."""

    rounds: dict[str, list[Throughput]] = field(default_factory=lambda: {side: [] for side in SIDES})
    cached_share: list[float] = field(default_factory=list)
    max_abs_diff: float = 0.0
    exit_codes: dict[str, int] = field(default_factory=dict)

    def median_per_s(self, side: str) -> float:
        """The median over rounds of a side's texts/s."""
        return statistics.median(t.texts_per_s for t in self.rounds[side])

    @property
    def ratio(self) -> float:
        """Median texts/s with the cache over without."""
        return self.median_per_s("on") / self.median_per_s("off")


async def measure(server: ServerProcess, args: argparse.Namespace, corpus: list[str]) -> tuple[Throughput, Any]:
    """One pass of the corpus through `server`: `--clients` clients, `--request-size` texts a call."""
    requests = [pb.EmbedRequest(inputs=group) for group in chunks(corpus, args.request_size)]

    def keep(response: pb.EmbedResponse) -> tuple[FloatArray, int]:
        return decode(response), response.timing.cached_inputs

    async with Connections(server.address, args.clients) as connections:
        await connections.ready()
        return await timed_load(server.proc.pid, connections.stubs, requests, len(corpus), embed_call, keep)


def run(args: argparse.Namespace) -> CacheBench:
    """Starts both servers, then measures them in turn, round after round, on a new corpus each."""
    bench = CacheBench()
    flags = server_flags(args, DEFAULT_DENSE_MODEL)
    with (
        ServerProcess(
            [*flags, "--vector-cache-bytes", str(args.cache_bytes)], args.startup_timeout, queue_limit=False
        ) as on,
        ServerProcess([*flags, "--vector-cache-bytes", "0"], args.startup_timeout, queue_limit=False) as off,
    ):
        servers = {"on": on, "off": off}
        for r in range(args.rounds):
            corpus = repeated_corpus(args.texts, args.repeated, args.seed + r)
            vectors: dict[str, FloatArray] = {}
            for side in SIDES if r % 2 == 0 else reversed(SIDES):
                step(f"round {r + 1}/{args.rounds}: cache {side}, {len(corpus)} texts")
                throughput, answers = asyncio.run(measure(servers[side], args, corpus))
                bench.rounds[side].append(throughput)
                vectors[side] = np.concatenate([v for v, _ in answers])
                if side == "on":
                    bench.cached_share.append(sum(c for _, c in answers) / len(corpus))
            bench.max_abs_diff = max(bench.max_abs_diff, max_abs_diff(vectors["on"], vectors["off"]))
        for side, server in servers.items():
            bench.exit_codes[side] = server.stop()
    return bench


def report(args: argparse.Namespace, bench: CacheBench) -> list[str]:
    """Each round's texts/s with and without the cache, their ratio, and the medians."""
    lines = [
        f"vector cache: {args.texts} texts a round ({args.repeated:.0%} repeats), {args.clients} clients x "
        f"{args.request_size} texts, {args.rounds} rounds, servers alternating",
        "",
        "| round | cache on, texts/s | cache off, texts/s | on / off | inputs from the cache |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in range(args.rounds):
        on, off = bench.rounds["on"][r].texts_per_s, bench.rounds["off"][r].texts_per_s
        lines.append(f"| {r + 1} | {on:.1f} | {off:.1f} | {on / off:.2f}x | {bench.cached_share[r]:.1%} |")
    lines += [
        f"| median | {bench.median_per_s('on'):.1f} | {bench.median_per_s('off'):.1f} | **{bench.ratio:.2f}x** | |",
        "",
        f"largest difference between the servers' vectors: {bench.max_abs_diff:.1e}",
    ]
    return lines


def summary(args: argparse.Namespace, bench: CacheBench) -> dict[str, Any]:
    """The JSON line."""
    return {
        "bench": "cache",
        "texts": args.texts,
        "repeated": args.repeated,
        "rounds": args.rounds,
        "texts_per_s": {side: [round(t.texts_per_s, 2) for t in bench.rounds[side]] for side in SIDES},
        "ratio": round(bench.ratio, 3),
        "cached_share": [round(s, 4) for s in bench.cached_share],
        "max_abs_diff": {"on_vs_off": bench.max_abs_diff},
        "exit_codes": bench.exit_codes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench; 1 when the two servers' vectors differ."""
    return bench_main(argv, parse_args, run, report, summary, "the cached server's vectors differ from the uncached")


if __name__ == "__main__":
    raise SystemExit(main())
