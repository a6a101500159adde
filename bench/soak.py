"""Soak (issue 10): does the server hold its resources under a long mixed load? A real server
with both default models, and Envoy in front, take --minutes of mixed traffic at --load (0.7) of
the capacity measured first, while the server's resident memory, open file descriptors and
threads are read every --every seconds.

       start the server (`python -m embedserve`, the way users start it) and Envoy
  (c)  capacity: --clients unary clients x 16 texts, closed loop, for --capacity-seconds
  (m)  mixed load, open loop (each request sent on its schedule, answered or not), for --minutes:
         55% of the target texts/s as unary Embed of 8 texts from --clients clients, 25% as
         one EmbedStream of 32-text requests, 10% as REST /v1/embeddings through Envoy, 10% as
         SparseEmbed of 8 texts; and a Rerank of 16 documents twice a second
       a sample of VmRSS, open fds and threads every --every seconds
       stop both (SIGTERM, exit 0 checked)

Flat means: after --warmup samples, the largest sample is within 5% of the smallest, for memory
and fds. It is a benchmark, not a test: it prints the samples and the verdict, and fails (exit 1)
only when something is wrong: a failed request, a stream id unanswered, a server that does not
exit 0. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx

from bench.harness import make_corpus, percentile, step
from bench.load import Connections
from bench.process import Gateway, ServerProcess, process_status
from embedserve.v1 import embedding_service_pb2 as pb

if TYPE_CHECKING:
    from embedserve.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

FLAT = 1.05  # largest / smallest sample after the warm-up


@dataclass(frozen=True)
class Sample:
    """What the server held at one moment."""

    at_s: float
    rss_mb: float
    fds: int
    threads: int


@dataclass
class Tally:
    """Requests of one kind: how many were answered, failed, and how long the answers took."""

    answered: int = 0
    texts: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)

    def fail(self, what: str) -> None:
        """Counts a failure by its code."""
        self.failed[what] = self.failed.get(what, 0) + 1


@dataclass
class Soak:
    """Everything the soak measured."""

    capacity_texts_per_s: float
    target_texts_per_s: float
    seconds: float
    samples: list[Sample]
    tallies: dict[str, Tally]
    exit_code: int = 0

    def spread(self, warmup: int, value: Callable[[Sample], float]) -> float:
        """Largest / smallest of the samples after the warm-up (1.0: perfectly flat)."""
        values = [value(s) for s in self.samples[warmup:]]
        return max(values) / max(min(values), 1e-9) if values else float("nan")


def sample(pid: int, started: float) -> Sample:
    """The server's resident memory, open fds and threads now (Linux /proc)."""
    status = process_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Sample(time.monotonic() - started, status["VmRSS"] / 1024, fds, status["Threads"])


async def capacity(address: str, texts: Sequence[str], clients: int, seconds: float) -> float:
    """Texts/s the server answers to `clients` closed-loop unary clients of 16 texts."""
    answered = 0
    until = time.monotonic() + seconds

    async def client(stub: Stub, offset: int) -> None:
        nonlocal answered
        i = offset
        while time.monotonic() < until:
            batch = [texts[(i + k) % len(texts)] for k in range(16)]
            await stub.Embed(pb.EmbedRequest(inputs=batch), timeout=60)
            answered += len(batch)
            i += 16 * clients

    async with Connections(address, clients) as connections:
        await connections.ready()
        started = time.monotonic()
        await asyncio.gather(*(client(stub, 16 * k) for k, stub in enumerate(connections.stubs)))
        return answered / (time.monotonic() - started)


async def paced(rate_per_s: float, until: float, send: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """Calls send(i) at `rate_per_s`, open loop: each call on its schedule, not after the last answer."""
    if rate_per_s <= 0:
        return
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    i = 0
    while (due := start + i / rate_per_s) < until:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        task = asyncio.create_task(send(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.gather(*tasks)


async def timed(tally: Tally, texts: int, call: Callable[[], Awaitable[object]]) -> None:
    """Runs one request, counting its outcome in `tally`."""
    started = time.monotonic()
    try:
        await call()
    except grpc.aio.AioRpcError as exc:
        tally.fail(exc.code().name)
        return
    except httpx.HTTPError as exc:
        tally.fail(type(exc).__name__)
        return
    tally.answered += 1
    tally.texts += texts
    tally.latencies_s.append(time.monotonic() - started)


async def stream(stub: Stub, texts: Sequence[str], rate: float, until: float, tally: Tally) -> None:
    """One EmbedStream of 32-text requests, sent at `rate` requests/s; every id answered once."""
    sent: dict[str, float] = {}
    queue: asyncio.Queue[pb.EmbedStreamRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        while (request := await queue.get()) is not None:
            yield request

    async def feed(i: int) -> None:
        batch = [texts[(i * 32 + k) % len(texts)] for k in range(32)]
        sent[str(i)] = time.monotonic()
        await queue.put(pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(inputs=batch)))

    async def pace() -> None:
        await paced(rate, until, feed)
        await queue.put(None)

    pacer = asyncio.create_task(pace())
    async for response in stub.EmbedStream(requests()):
        started = sent.pop(response.id, None)
        if started is None or response.HasField("error"):
            tally.fail("stream: " + ("answered twice" if started is None else response.error.status))
            continue
        tally.answered += 1
        tally.texts += 32
        tally.latencies_s.append(time.monotonic() - started)
    await pacer
    for _ in sent:
        tally.fail("stream: unanswered")


async def mixed_load(
    server: ServerProcess, gateway: Gateway, texts: Sequence[str], target: float, args: argparse.Namespace
) -> Soak:
    """The mixed load for --minutes, sampling the server every --every seconds."""
    tallies = {kind: Tally() for kind in ("embed", "stream", "rest", "sparse", "rerank")}
    started = time.monotonic()
    until = started + args.minutes * 60
    samples = [sample(server.proc.pid, started)]

    async def sampler() -> None:
        while time.monotonic() < until:
            await asyncio.sleep(min(args.every, max(0.0, until - time.monotonic())))
            samples.append(sample(server.proc.pid, started))
            latest = samples[-1]
            step(f"{latest.at_s:5.0f} s: {latest.rss_mb:.0f} MB, {latest.fds} fds, {latest.threads} threads")

    async with (
        Connections(server.address, args.clients + 1) as connections,
        httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http,
    ):
        await connections.ready()
        stubs = connections.stubs

        async def embed(i: int) -> None:
            batch = [texts[(i * 8 + k) % len(texts)] for k in range(8)]
            stub = stubs[i % args.clients]
            await timed(tallies["embed"], 8, lambda: stub.Embed(pb.EmbedRequest(inputs=batch), timeout=60))

        async def rest(i: int) -> None:
            batch = [texts[(i * 8 + k + 7) % len(texts)] for k in range(8)]

            async def post() -> None:
                response = await http.post("/v1/embeddings", json={"input": batch})
                if response.status_code != 200:
                    raise httpx.HTTPStatusError(str(response.status_code), request=response.request, response=response)

            await timed(tallies["rest"], 8, post)

        async def sparse(i: int) -> None:
            batch = [texts[(i * 8 + k + 3) % len(texts)] for k in range(8)]
            stub = stubs[i % args.clients]
            await timed(tallies["sparse"], 8, lambda: stub.SparseEmbed(pb.SparseEmbedRequest(inputs=batch), timeout=60))

        async def rerank(i: int) -> None:
            documents = [texts[(i * 16 + k) % len(texts)] for k in range(16)]
            request = pb.RerankRequest(query=texts[i % len(texts)], documents=documents)
            stub = stubs[i % args.clients]
            await timed(tallies["rerank"], 17, lambda: stub.Rerank(request, timeout=60))

        await asyncio.gather(
            sampler(),
            paced(0.55 * target / 8, until, embed),
            stream(stubs[-1], texts, 0.25 * target / 32, until, tallies["stream"]),
            paced(0.10 * target / 8, until, rest),
            paced(0.10 * target / 8, until, sparse),
            paced(2.0, until, rerank),
        )
    return Soak(0.0, target, time.monotonic() - started, samples, tallies)


def run(args: argparse.Namespace) -> Soak:
    """Starts the server and Envoy, measures capacity, then soaks."""
    texts = make_corpus(args.texts, args.seed, max_words=40)
    flags = ["--cache-dir", str(args.cache_dir), *args.server_arg]
    step("starting the server (both default models) and Envoy")
    with ServerProcess(flags) as server, Gateway(server.address) as gateway:
        step(f"capacity: {args.clients} clients x 16 texts, {args.capacity_seconds:g} s")
        measured = asyncio.run(capacity(server.address, texts, args.clients, args.capacity_seconds))
        target = measured * args.load
        step(f"capacity {measured:.0f} texts/s; soaking at {target:.0f} texts/s for {args.minutes:g} min")
        soak = asyncio.run(mixed_load(server, gateway, texts, target, args))
        soak.capacity_texts_per_s = measured
    soak.exit_code = server.proc.returncode
    return soak


def report(args: argparse.Namespace, soak: Soak) -> list[str]:
    """The samples, each kind's outcome, and the verdict."""
    lines = [
        f"soak: {soak.seconds / 60:.1f} min at {soak.target_texts_per_s:.0f} texts/s "
        f"({args.load:.0%} of the {soak.capacity_texts_per_s:.0f} texts/s measured)",
        "",
        "| at | RSS MB | open fds | threads |",
        "|---|---|---|---|",
    ]
    for i, s in enumerate(soak.samples):
        mark = " (warm-up)" if i < args.warmup else ""
        lines.append(f"| {s.at_s:.0f} s{mark} | {s.rss_mb:.0f} | {s.fds} | {s.threads} |")
    lines += ["", "| kind | answered | texts/s | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|"]
    for kind, t in soak.tallies.items():
        failed = ", ".join(f"{k} {v}" for k, v in t.failed.items()) or "0"
        p50, p99 = percentile(t.latencies_s, 50) * 1e3, percentile(t.latencies_s, 99) * 1e3
        lines.append(f"| {kind} | {t.answered} | {t.texts / soak.seconds:.0f} | {p50:.0f} | {p99:.0f} | {failed} |")
    rss, fds = soak.spread(args.warmup, lambda s: s.rss_mb), soak.spread(args.warmup, lambda s: s.fds)
    lines += [
        "",
        f"after {args.warmup} warm-up samples: RSS max/min {rss:.3f}, open fds max/min {fds:.3f} "
        f"(flat: <= {FLAT}) -> {'flat' if max(rss, fds) <= FLAT else 'NOT flat'}",
    ]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The soak's options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of mixed load (default 10)")
    p.add_argument("--load", type=float, default=0.7, help="share of the measured capacity (default 0.7)")
    p.add_argument("--every", type=float, default=30.0, help="seconds between samples (default 30)")
    p.add_argument("--warmup", type=int, default=2, help="samples before the flatness counts (default 2)")
    p.add_argument("--clients", type=int, default=8, help="unary clients (default 8)")
    p.add_argument("--capacity-seconds", type=float, default=15.0, help="seconds of the capacity phase (default 15)")
    p.add_argument("--texts", type=int, default=4096, help="corpus size (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "embedserve", help="ONNX export cache")
    p.add_argument("--server-arg", action="append", default=[], help="one more flag for the server (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 minute, a sample every 10 s")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.every, args.capacity_seconds = 1.0, 10.0, 5.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the soak and prints its report; 1 when a request failed or the server did not exit 0."""
    args = parse_args(argv)
    soak = run(args)
    print("\n".join(report(args, soak)))
    failures = sum(sum(t.failed.values()) for t in soak.tallies.values())
    if failures or soak.exit_code != 0:
        print(f"{failures} request(s) failed; server exit code {soak.exit_code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
