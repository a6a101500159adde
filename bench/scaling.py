"""Replicas behind Envoy (issue 13): `Embed` throughput with 1, 2 and 3 replicas, one replica of
N threads against N replicas of one, what the Envoy hop costs, and how long a call or a bulk
stream takes to recover when a replica is killed.

Every setup is started first and all stay up (idle, they cost nothing); each round then measures
each in turn on a fresh corpus, so that the machine's drift touches all alike and only ratios
within the run compare. The setups, on a machine of C cores:

- `direct`: one server on every core with its default threads, called on its own port;
- `1 replica`: the same server through its own Envoy (`direct` / this is the Envoy hop);
- `1 x C threads`: one server, FORWARD_WORKERS=1 and INTRA_OP_THREADS=C, through Envoy;
- `N replicas` (N in --replicas, N > 1): N servers through one Envoy, each pinned to its own
  share of the cores with its default threads, as `make run REPLICAS=N` runs them; with more
  replicas than cores they share every core with one thread each;
- `1 core`: one server pinned to one core, through Envoy: texts/s per core.

Recovery, last, on the setup with the most replicas: a `bulk_embed` stream through Envoy whose
replica is SIGKILLed (the longest wait for a vector after the kill against the longest before
it, and every vector once, in order), then `--clients` loops of one-text `Embed` while another
replica is SIGKILLed (failed calls, and how long after the kill the calls then in flight got
their answers).

Fails when a setup's vectors differ from `direct`'s, when a call fails or a vector is lost or
repeated during recovery, or when a server does not exit 0 after SIGTERM.

Usage: python -m bench.scaling [--texts N] [--rounds 3] [--replicas 2,3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from embedserve_client import AsyncClient

from bench.harness import FloatArray, bench_main, chunks, make_corpus, max_abs_diff, percentile, step
from bench.inprocess import DEFAULT_DENSE_MODEL
from bench.load import Connections, Throughput, decode, embed_call, timed_load
from bench.options import add_shared_args, bench_parser, check_positive
from bench.process import Gateway, ServerProcess, load_gateway, process_cpu_s
from embedserve.v1 import embedding_service_pb2 as pb

# Before the kill, loops of one-text calls run this long; after it, this long again.
RECOVERY_BEFORE_S = 2.0
RECOVERY_AFTER_S = 4.0
# Bulk recovery: the kill comes once this share of the corpus has been yielded.
BULK_KILL_AT = 1 / 3


@dataclass
class Setup:
    """Servers and the address the bench calls them at (an Envoy, or one server's own port)."""

    name: str
    servers: list[ServerProcess]
    address: str
    note: str

    @property
    def replicas(self) -> int:
        return len(self.servers)


@dataclass
class Recovery:
    """What the kills cost: the bulk stream's longest wait for a vector after the kill and before
    it, whether the bulk run yielded every vector once in
    order, equal to `direct`'s; the unary calls' failures, their p50 before the kill and how long
    after the kill the calls then in flight had their answers."""

    replicas: int = 0
    bulk_gap_s: float = float("nan")  # the longest wait for a vector after the kill
    bulk_usual_gap_s: float = float("nan")  # the longest before it
    bulk_vectors_ok: bool = False
    unary_calls: int = 0
    unary_failed: list[str] = field(default_factory=list)
    unary_p50_before_ms: float = float("nan")
    unary_in_flight_at_kill: int = 0
    unary_recovered_s: float = float("nan")
    unary_max_ms_after: float = float("nan")


@dataclass
class ScalingBench:
    """Each setup's rounds, its vectors' largest difference from `direct`'s, the recovery, and
    the servers' exit codes."""

    cores: int
    notes: dict[str, str] = field(default_factory=dict)
    rounds: dict[str, list[Throughput]] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    recovery: Recovery = field(default_factory=Recovery)
    exit_codes: dict[str, int] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """The setup's median texts/s over the rounds."""
        return statistics.median(r.texts_per_s for r in self.rounds[name])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The corpus options, the rounds, the replica counts and the shared options."""
    p = bench_parser(
        "bench.scaling",
        __doc__,
        1024,
        "texts a round, for each setup",
        "smoke run: 128 texts, 1 round, replicas 2",
        "corpus seed; round r uses seed + r",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every setup (default 3)")
    p.add_argument(
        "--replicas", default="2,3", help="replica counts beyond 1 to measure, comma-separated (default 2,3)"
    )
    add_shared_args(p)
    p.set_defaults(request_size=16)
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.rounds, args.replicas = 128, 1, "2"
    try:
        args.replica_counts = sorted({int(n) for n in args.replicas.split(",") if n.strip()})
    except ValueError:
        p.error(f"--replicas must be whole numbers separated by commas, got {args.replicas!r}")
    if not args.replica_counts or min(args.replica_counts) < 2:
        p.error("--replicas must name counts of 2 or more (1 replica is always measured)")
    check_positive(p, args, "texts", "rounds", "request_size", "clients")
    return args


def start_setups(args: argparse.Namespace, stack: ExitStack, cores: list[int]) -> list[Setup]:
    """Starts every setup's servers and Envoys; each is stopped when `stack` closes."""
    gateway = load_gateway()
    base = ["--cache-dir", str(args.cache_dir), "--model-names", DEFAULT_DENSE_MODEL]
    base += args.server_arg

    def server(flags: Sequence[str] = (), on: set[int] | None = None) -> ServerProcess:
        return stack.enter_context(ServerProcess([*base, *flags], args.startup_timeout, cores=on, queue_limit=False))

    def behind_envoy(name: str, servers: list[ServerProcess], note: str) -> Setup:
        envoy = stack.enter_context(Gateway([s.address for s in servers]))
        return Setup(name, servers, envoy.address, note)

    step(f"starting the setups on {len(cores)} cores")
    alone = server()
    setups = [
        Setup("direct", [alone], alone.address, "1 server, default threads, its own port"),
        behind_envoy("1 replica", [alone], "the same server, through Envoy"),
    ]
    threads = ["--forward-workers", "1", "--intra-op-threads", str(len(cores))]
    setups.append(behind_envoy(f"1 x {len(cores)} threads", [server(threads)], "FORWARD_WORKERS=1"))
    for count in args.replica_counts:
        shares = gateway.core_shares(cores, count)
        if shares is None:  # more replicas than cores: one thread each, all cores shared
            one = ["--forward-workers", "1", "--intra-op-threads", "1"]
            servers = [server(one) for _ in range(count)]
            note = f"sharing {len(cores)} cores, 1 thread each"
        else:
            servers = [server(on=share) for share in shares]
            note = f"{len(shares[0])} core{'s' if len(shares[0]) > 1 else ''} each, default threads"
        setups.append(behind_envoy(f"{count} replicas", servers, note))
    if len(cores) > 1:
        setups.append(behind_envoy("1 core", [server(on={cores[0]})], "1 server pinned to 1 core"))
    return setups


async def measure(setup: Setup, args: argparse.Namespace, corpus: list[str]) -> tuple[Throughput, FloatArray]:
    """One pass of the corpus through the setup: `--clients` clients, `--request-size` texts a
    call (the server CPU it counts is the first server's only; the report shows none)."""
    requests = [pb.EmbedRequest(inputs=group) for group in chunks(corpus, args.request_size)]
    async with Connections(setup.address, args.clients) as connections:
        await connections.ready()
        pid = setup.servers[0].proc.pid
        measured, answers = await timed_load(pid, connections.stubs, requests, len(corpus), embed_call, decode)
    return measured, np.concatenate(answers)


async def bulk_recovery(setup: Setup, corpus: list[str], reference: FloatArray, recovery: Recovery) -> None:
    """A bulk_embed stream through the setup's Envoy; its replica (the one burning CPU, found
    while the run goes on) is SIGKILLed a third of the way in."""
    arrived: list[float] = []
    vectors: list[FloatArray] = []
    killed_at = 0.0
    victim: asyncio.Task[ServerProcess] | None = None
    async with AsyncClient(setup.address) as client:
        async for vector in client.bulk_embed(corpus, batch_size=8, window=2):
            arrived.append(time.perf_counter())
            vectors.append(vector)
            if victim is None and len(vectors) >= int(len(corpus) * BULK_KILL_AT):
                victim = asyncio.create_task(busiest(setup.servers))
            elif victim is not None and victim.done() and not killed_at:
                killed_at = time.perf_counter()
                victim.result().kill()
    # The longest wait for a vector after the kill (from the kill on), against the longest
    # before it: what the retry cost, beyond the usual wait.
    before = [b - a for a, b in itertools.pairwise(arrived) if b <= killed_at]
    after = [b - a for a, b in itertools.pairwise([killed_at, *(t for t in arrived if t > killed_at)])]
    recovery.bulk_gap_s = max(after) if after else float("inf")
    recovery.bulk_usual_gap_s = max(before) if before else float("nan")
    recovery.bulk_vectors_ok = len(vectors) == len(reference) and max_abs_diff(np.stack(vectors), reference) < 1e-4


async def busiest(servers: Sequence[ServerProcess]) -> ServerProcess:
    """The live server that used the most CPU over the next half second."""
    live = [s for s in servers if s.proc.poll() is None]
    before = [process_cpu_s(s.proc.pid) for s in live]
    await asyncio.sleep(0.5)
    used = [process_cpu_s(s.proc.pid) - b for s, b in zip(live, before, strict=True)]
    return live[used.index(max(used))]


async def unary_recovery(setup: Setup, args: argparse.Namespace, recovery: Recovery) -> None:
    """`--clients` loops of one-text Embed calls through Envoy; a live replica is SIGKILLed
    RECOVERY_BEFORE_S in, and the loops go on RECOVERY_AFTER_S after."""
    calls: list[tuple[float, float]] = []
    texts = iter(make_corpus(100_000, seed=99, max_words=12))
    stop_at = float("inf")

    async def loop(stub: Any) -> None:
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            try:
                await stub.Embed(pb.EmbedRequest(inputs=[next(texts)]), timeout=30)
            except grpc.aio.AioRpcError as error:
                recovery.unary_failed.append(f"{error.code().name}: {error.details()}")
            calls.append((sent, time.perf_counter()))

    async with Connections(setup.address, args.clients) as connections:
        await connections.ready()
        loops = [asyncio.create_task(loop(stub)) for stub in connections.stubs]
        await asyncio.sleep(RECOVERY_BEFORE_S)
        victim = next(s for s in setup.servers if s.proc.poll() is None)
        killed_at = time.perf_counter()
        victim.kill()
        stop_at = killed_at + RECOVERY_AFTER_S
        await asyncio.gather(*loops)
    spanning = [end for sent, end in calls if sent <= killed_at < end]
    recovery.unary_calls = len(calls)
    recovery.unary_p50_before_ms = percentile([(e - s) * 1e3 for s, e in calls if e <= killed_at], 50)
    recovery.unary_in_flight_at_kill = len(spanning)
    recovery.unary_recovered_s = max(spanning) - killed_at if spanning else 0.0
    recovery.unary_max_ms_after = max((e - s) * 1e3 for s, e in calls if s > killed_at)


def run(args: argparse.Namespace) -> ScalingBench:
    """Starts every setup, measures them round after round, then the recovery; stops them all."""
    cores = sorted(os.sched_getaffinity(0))
    bench = ScalingBench(len(cores))
    with ExitStack() as stack:
        setups = start_setups(args, stack, cores)
        for setup in setups:
            bench.notes[setup.name] = setup.note
            bench.rounds[setup.name] = []
        for setup in setups:  # a first pass warms each server's threads and Envoy's connections
            step(f"warm-up: {setup.name}")
            asyncio.run(measure(setup, args, make_corpus(4 * args.request_size, args.seed - 1)))
        first: FloatArray | None = None  # round 1's vectors from `direct`, for the recovery
        for r in range(args.rounds):
            corpus = make_corpus(args.texts, args.seed + r)
            order = setups if r % 2 == 0 else list(reversed(setups))
            vectors: dict[str, FloatArray] = {}
            for setup in order:
                step(f"round {r + 1}/{args.rounds}: {setup.name}, {len(corpus)} texts")
                measured, vectors[setup.name] = asyncio.run(measure(setup, args, corpus))
                bench.rounds[setup.name].append(measured)
            reference = vectors["direct"]
            first = reference if first is None else first
            for name, got in vectors.items():
                bench.max_abs_diff[name] = max(bench.max_abs_diff.get(name, 0.0), max_abs_diff(got, reference))
        most = max(setups, key=lambda s: s.replicas)
        bench.recovery.replicas = most.replicas
        corpus = make_corpus(args.texts, args.seed)  # round 1's
        step(f"recovery: {most.name}, bulk_embed of {len(corpus)} texts, its replica killed a third of the way in")
        assert first is not None
        asyncio.run(bulk_recovery(most, corpus, first, bench.recovery))
        if sum(s.proc.poll() is None for s in most.servers) >= 2:
            step(f"recovery: {most.name}, {args.clients} loops of one-text Embed, another replica killed")
            time.sleep(3.0)  # Envoy's health checks take the dead replica out first
            asyncio.run(unary_recovery(most, args, bench.recovery))
        bench.max_abs_diff["recovery bulk"] = 0.0 if bench.recovery.bulk_vectors_ok else float("inf")
        for setup in setups:
            for i, server in enumerate(setup.servers):
                if server.proc.poll() is None:
                    bench.exit_codes[f"{setup.name} #{i}"] = server.stop()
    return bench


def rows(bench: ScalingBench) -> Iterator[str]:
    """The table's rows: each setup's texts/s each round, the median, against 1 replica, latency."""
    one = bench.median("1 replica")
    for name, rounds in bench.rounds.items():
        per_s = bench.median(name)
        p50 = statistics.median(r.request_ms_p50 for r in rounds)
        p99 = statistics.median(r.request_ms_p99 for r in rounds)
        each = " / ".join(f"{r.texts_per_s:.1f}" for r in rounds)
        ratio = per_s / one
        yield f"| {name} | {bench.notes[name]} | {each} | **{per_s:.1f}** | {ratio:.2f}x | {p50:.0f} / {p99:.0f} |"


def report(args: argparse.Namespace, bench: ScalingBench) -> list[str]:
    """The setups' texts/s against one replica through Envoy, then the recovery."""
    rec = bench.recovery
    lines = [
        f"replicas: {args.texts} texts a round, {args.clients} clients x {args.request_size} texts a call, "
        f"{args.rounds} rounds, setups in alternating order, {bench.cores} cores",
        "",
        "| setup | what | texts/s each round | median | vs 1 replica | call p50 / p99 ms |",
        "|---|---|---:|---:|---:|---:|",
        *rows(bench),
        "",
        f"Envoy hop: direct / 1 replica through Envoy = {bench.median('direct') / bench.median('1 replica'):.3f}",
    ]
    if "1 core" in bench.rounds:
        lines.append(f"one core: {bench.median('1 core'):.1f} texts/s")
    lines += [
        "",
        f"recovery ({rec.replicas} replicas):",
        f"- bulk_embed (batches of 8, window 2), its stream's replica SIGKILLed: longest wait for a vector "
        f"after the kill {rec.bulk_gap_s:.2f} s, before it {rec.bulk_usual_gap_s:.2f} s; every vector once, "
        f"in order, equal to direct's: {'yes' if rec.bulk_vectors_ok else 'NO'}",
    ]
    if rec.unary_calls:
        lines.append(
            f"- {args.clients} loops of one-text Embed, a replica SIGKILLed: {rec.unary_calls} calls, "
            f"{len(rec.unary_failed)} failed; p50 before {rec.unary_p50_before_ms:.1f} ms; the "
            f"{rec.unary_in_flight_at_kill} calls in flight at the kill answered within "
            f"{rec.unary_recovered_s:.3f} s of it; slowest call started after it {rec.unary_max_ms_after:.0f} ms"
        )
        lines += [f"  - failed: {message}" for message in rec.unary_failed[:5]]
    return lines


def summary(args: argparse.Namespace, bench: ScalingBench) -> dict[str, Any]:
    """The JSON line."""
    rec = bench.recovery
    return {
        "bench": "scaling",
        "cores": bench.cores,
        "texts": args.texts,
        "rounds": args.rounds,
        "texts_per_s": {name: [round(r.texts_per_s, 2) for r in rounds] for name, rounds in bench.rounds.items()},
        "median_texts_per_s": {name: round(bench.median(name), 2) for name in bench.rounds},
        "recovery": {
            "replicas": rec.replicas,
            "bulk_gap_s": round(rec.bulk_gap_s, 3),
            "bulk_vectors_ok": rec.bulk_vectors_ok,
            "unary_calls": rec.unary_calls,
            "unary_failed": len(rec.unary_failed),
            "unary_recovered_s": round(rec.unary_recovered_s, 3),
        },
        # A failed call during recovery, or a server that did not exit 0, fails the run as a
        # vector that differs does.
        "max_abs_diff": {
            **bench.max_abs_diff,
            "recovery unary": float("inf") if rec.unary_failed else 0.0,
            "exit codes": 0.0 if all(c == 0 for c in bench.exit_codes.values()) else float("inf"),
        },
        "exit_codes": bench.exit_codes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench; 1 when vectors differ, a call fails during recovery or a server exits non-0."""
    return bench_main(
        argv, parse_args, run, report, summary, "vectors differ, a recovery call failed or a server exited non-0"
    )


if __name__ == "__main__":
    raise SystemExit(main())
