"""A lean serving process (issue 12): start to first answer, idle RSS and peak RSS under load, for
the server on the default models with their ONNX exports already cached.

Each of --starts starts in turn runs `python -m embedserve` (the way users start it) and times,
from just before the process starts, until the first `Embed` answer. It then reads VmRSS after
--idle-seconds of rest. On the last start it sends --texts seeded texts from --clients clients in
requests of --request-size, and reads VmRSS and VmHWM (the peak) after them. The first start
finds no kept forward-pass timings in the cache folder (they are removed before it), so it shows
a first start on a machine and the later ones a restart. It is a benchmark, not a test: it fails
only when a server does not start, answer or exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.harness import chunks, make_corpus, print_summary, step
from bench.inprocess import server_defaults
from bench.load import Connections
from bench.options import bench_parser, check_positive
from bench.process import ServerProcess, process_status
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

# Issue 12's targets with the export cached.
TARGETS = {"first_answer_s": 2.0, "idle_rss_mb": 350.0, "peak_rss_mb": 500.0}


@dataclasses.dataclass
class Start:
    """One start of the server."""

    first_answer_s: float
    idle_rss_mb: float
    kept_timings: bool  # the forward-pass timings came from the cache folder
    loaded_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    texts_per_s: float | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This bench's options."""
    p = bench_parser(
        "bench.startup", __doc__, 3000, "texts sent on the last start", "smoke run: 2 starts, 256 texts", "seed"
    )
    p.add_argument("--starts", type=int, default=3, help="starts, one after the other (default 3)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the load (default 8)")
    p.add_argument("--request-size", type=int, default=32, help="texts per request of the load (default 32)")
    p.add_argument("--idle-seconds", type=float, default=1.0, help="rest before idle RSS is read (default 1)")
    default_cache = server_defaults().cache_dir
    p.add_argument("--cache-dir", type=Path, default=default_cache, help=f"export cache (default {default_cache})")
    p.add_argument("--json-out", type=Path, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.starts, args.texts = 2, min(args.texts, 256)
    check_positive(p, args, "starts", "clients", "request_size", "texts")
    return args


def megabytes(kilobytes: int) -> float:
    return kilobytes / 1024


async def send(address: str, requests: list[pb.EmbedRequest], clients: int) -> None:
    """Every request, from `clients` clients (one connection each) taking them from one queue."""
    async with Connections(address, clients) as connections:
        await connections.ready()
        queue = list(reversed(requests))

        async def client(stub: Any) -> None:  # an aio stub (the generated type is the sync one)
            while queue:
                await stub.Embed(queue.pop(), timeout=300)

        await asyncio.gather(*(client(stub) for stub in connections.stubs))


def start(args: argparse.Namespace, requests: list[pb.EmbedRequest] | None) -> Start:
    """One start: first answer, idle RSS, and with `requests` the load and the RSS after it."""
    started = time.monotonic()
    with ServerProcess(["--cache-dir", str(args.cache_dir)], startup_timeout=600) as server:
        channel = grpc.insecure_channel(server.address)
        pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(inputs=["hello world"]), timeout=60)
        channel.close()
        measured = Start(
            first_answer_s=time.monotonic() - started,
            idle_rss_mb=0.0,
            kept_timings="measured at an earlier start" in server.log,
        )
        time.sleep(args.idle_seconds)
        measured.idle_rss_mb = megabytes(process_status(server.proc.pid)["VmRSS"])
        if requests:
            loading = time.monotonic()
            asyncio.run(send(server.address, requests, args.clients))
            measured.texts_per_s = sum(len(r.inputs) for r in requests) / (time.monotonic() - loading)
            status = process_status(server.proc.pid)
            measured.loaded_rss_mb, measured.peak_rss_mb = megabytes(status["VmRSS"]), megabytes(status["VmHWM"])
    return measured


def report(starts: list[Start]) -> list[str]:
    """The table, with the targets."""
    lines = [
        f"{'start':<8}{'kept timings':>14}{'first answer s':>16}{'idle RSS MB':>13}{'peak RSS MB':>13}{'texts/s':>9}",
    ]
    for number, s in enumerate(starts, 1):
        peak = f"{s.peak_rss_mb:.0f}" if s.peak_rss_mb is not None else "-"
        rate = f"{s.texts_per_s:.0f}" if s.texts_per_s is not None else "-"
        kept = "yes" if s.kept_timings else "no"
        lines.append(f"{number:<8}{kept:>14}{s.first_answer_s:>16.2f}{s.idle_rss_mb:>13.0f}{peak:>13}{rate:>9}")
    lines.append(
        f"targets (export cached): first answer <= {TARGETS['first_answer_s']:g} s, idle RSS <= "
        f"{TARGETS['idle_rss_mb']:g} MB, peak RSS under load <= {TARGETS['peak_rss_mb']:g} MB"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the starts, prints the table and one JSON line."""
    args = parse_args(argv)
    shutil.rmtree(args.cache_dir / "calibration", ignore_errors=True)  # the first start measures
    corpus = make_corpus(args.texts, args.seed)
    requests = [pb.EmbedRequest(inputs=texts) for texts in chunks(corpus, args.request_size)]
    starts = []
    for number in range(args.starts):
        step(f"start {number + 1} of {args.starts}")
        starts.append(start(args, requests if number == args.starts - 1 else None))
    summary = {"bench": "startup", "starts": [dataclasses.asdict(s) for s in starts], "targets": TARGETS}
    print_summary(report(starts), summary, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
