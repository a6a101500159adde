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
import collections
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envoy"))  # gateway.py, as `make run` uses it
import gateway
from embed_bench import (
    LATENCY_INPUT,
    FloatArray,
    ServerProcess,
    add_shared_args,
    channel,
    check_positive,
    chunks,
    embed_load,
    emit_summary,
    make_corpus,
    max_abs_diff,
    measure_in_process,
    percentile,
    process_cpu_s,
    step,
    table,
)
from embedserve_client import AsyncClient

from embedserve.settings import DEFAULT_DENSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
REST_TARGET = 0.80


@dataclass
class Phase:
    """One throughput pass: wall time and the CPU seconds of bench, server and Envoy."""

    seconds: float
    texts: int
    bench_cpu_s: float
    server_cpu_s: float
    envoy_cpu_s: float

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds


class Clock:
    """Started on creation; phase() gives the wall time and the CPU seconds of this process,
    the server and Envoy since then."""

    def __init__(self, server_pid: int, envoy_pid: int) -> None:
        self._pids = (server_pid, envoy_pid)
        self._start = self._now()

    def _now(self) -> tuple[float, ...]:
        return (time.perf_counter(), time.process_time(), *(process_cpu_s(p) for p in self._pids))

    def phase(self, texts: int) -> Phase:
        """What the phase since the clock started cost, for `texts` texts."""
        wall, bench, server, envoy = (b - a for a, b in zip(self._start, self._now(), strict=True))
        return Phase(wall, texts, bench, server, envoy)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def grpc_pass(address: str, clients: int, corpus: list[str], request_size: int, server: ServerProcess,
                    envoy_pid: int) -> tuple[Phase, FloatArray]:  # fmt: skip
    channels = [channel(address) for _ in range(clients)]
    stubs = [pb_grpc.EmbeddingServiceStub(c) for c in channels]
    requests = [pb.EmbedRequest(inputs=texts) for texts in chunks(corpus, request_size)]
    clock = Clock(server.proc.pid, envoy_pid)
    results, _, _ = await embed_load(stubs, requests)
    phase = clock.phase(len(corpus))
    for c in channels:
        await c.close()
    return phase, np.concatenate(results)


async def rest_pass(base_url: str, model: str, clients: int, corpus: list[str], request_size: int,
                    server: ServerProcess, envoy_pid: int) -> tuple[Phase, FloatArray]:  # fmt: skip
    """The OpenAI SDK with its defaults (base64 on the wire, floats in Python)."""
    sdks = [openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0) for _ in range(clients)]
    queue = collections.deque(enumerate(chunks(corpus, request_size)))
    results: list[FloatArray] = [np.empty(0, np.float32)] * len(queue)

    async def client(sdk: openai.AsyncOpenAI) -> None:
        while queue:
            index, texts = queue.popleft()
            response = await sdk.embeddings.create(model=model, input=texts)
            results[index] = np.array([d.embedding for d in response.data], dtype=np.float32)

    clock = Clock(server.proc.pid, envoy_pid)
    await asyncio.gather(*(client(sdk) for sdk in sdks))
    phase = clock.phase(len(corpus))
    for sdk in sdks:
        await sdk.close()
    return phase, np.concatenate(results)


async def bulk_pass(address: str, corpus: list[str], request_size: int, server: ServerProcess,
                    envoy_pid: int) -> tuple[Phase, FloatArray]:  # fmt: skip
    """embedserve_client.AsyncClient.bulk_embed over the corpus, as a bulk job would run it."""
    async with AsyncClient(address) as client:
        clock = Clock(server.proc.pid, envoy_pid)
        vectors = [v async for v in client.bulk_embed(corpus, batch_size=request_size)]
        phase = clock.phase(len(corpus))
    return phase, np.stack(vectors)


async def idle_latency(server_address: str, envoy_address: str, model: str, calls: int) -> dict[str, list[float]]:
    """Milliseconds per call of Embed("hello world") on each path, one call at a time."""
    latencies: dict[str, list[float]] = {"grpc": [], "grpc_envoy": [], "rest": []}
    for name, address in (("grpc", server_address), ("grpc_envoy", envoy_address)):
        async with channel(address) as chan:
            stub = pb_grpc.EmbeddingServiceStub(chan)
            for _ in range(calls):
                start = time.perf_counter()
                await stub.Embed(pb.EmbedRequest(inputs=[LATENCY_INPUT], model=model))
                latencies[name].append((time.perf_counter() - start) * 1e3)
    async with openai.AsyncOpenAI(base_url=f"http://{envoy_address}/v1", api_key="bench", max_retries=0) as sdk:
        for _ in range(calls):
            start = time.perf_counter()
            await sdk.embeddings.create(model=model, input=LATENCY_INPUT)
            latencies["rest"].append((time.perf_counter() - start) * 1e3)
    return latencies


def mean_phase(a: Phase, b: Phase) -> Phase:
    """Two passes as one: summed work over summed time."""
    return Phase(*(x + y for x, y in zip(asdict(a).values(), asdict(b).values(), strict=True)))


async def measure(args: argparse.Namespace, server: ServerProcess, envoy_address: str, envoy_pid: int,
                  corpus: list[str]) -> dict[str, Any]:  # fmt: skip
    base_url = f"http://{envoy_address}"
    step("warm-up through every path")
    warm = corpus[: args.request_size]
    await grpc_pass(server.address, 1, warm, args.request_size, server, envoy_pid)
    await grpc_pass(envoy_address, 1, warm, args.request_size, server, envoy_pid)
    await rest_pass(base_url, args.model, 1, warm, args.request_size, server, envoy_pid)
    latencies = await idle_latency(server.address, envoy_address, args.model, args.idle_calls)
    step("idle latency p50 ms: " + ", ".join(f"{k} {percentile(v, 50):.1f}" for k, v in latencies.items()))
    passes: dict[str, list[Phase]] = {"grpc": [], "grpc_envoy": [], "rest": []}
    vectors: dict[str, FloatArray] = {}
    for round_ in (1, 2):
        for name, run in (
            ("grpc", grpc_pass(server.address, args.clients, corpus, args.request_size, server, envoy_pid)),
            ("grpc_envoy", grpc_pass(envoy_address, args.clients, corpus, args.request_size, server, envoy_pid)),
            ("rest", rest_pass(base_url, args.model, args.clients, corpus, args.request_size, server, envoy_pid)),
        ):
            phase, vectors[name] = await run
            passes[name].append(phase)
            step(f"round {round_}: {name} {phase.texts_per_s:.1f} texts/s")
    bulk, vectors["bulk"] = await bulk_pass(server.address, corpus, args.request_size, server, envoy_pid)
    step(f"bulk helper {bulk.texts_per_s:.1f} texts/s")
    return {"passes": passes, "bulk": bulk, "vectors": vectors, "latencies": latencies}


def report(args: argparse.Namespace, corpus: list[str], ceiling: float, spread: float,
           measured: dict[str, Any], diffs: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    passes: dict[str, list[Phase]] = measured["passes"]
    phases = {name: mean_phase(*runs) for name, runs in passes.items()}
    bulk: Phase = measured["bulk"]
    grpc_rate = phases["grpc"].texts_per_s
    rest_ratio = phases["rest"].texts_per_s / grpc_rate
    bulk_ratio = bulk.texts_per_s / ceiling
    rows = []
    for label, phase, base, target in (
        ("(g) gRPC Embed, direct", phases["grpc"], grpc_rate, None),
        ("(e) gRPC Embed via Envoy", phases["grpc_envoy"], grpc_rate, None),
        ("(r) REST, OpenAI SDK base64, via Envoy", phases["rest"], grpc_rate, REST_TARGET),
        ("(k) client bulk_embed (EmbedStream)", bulk, ceiling, None),
    ):
        ratio = phase.texts_per_s / base
        verdict = "" if target is None else (" ok" if ratio >= target else " LOW")
        rows.append((label, f"{phase.texts_per_s:.1f}", f"{ratio:.2f}{verdict}", f"{phase.bench_cpu_s:.1f}",
                     f"{phase.server_cpu_s:.1f}", f"{phase.envoy_cpu_s:.1f}"))  # fmt: skip
    print(f"embedserve REST/bulk bench: {len(corpus)} texts, {args.clients} clients x {args.request_size} texts, "
          f"model {args.model}, {platform.machine()} x {os.cpu_count()} cores")  # fmt: skip
    print(f"in-process ceiling (a): {ceiling:.1f} texts/s (a1/a2 spread {spread:.1%})")
    print("ratio: (g)/(e)/(r) to (g); (k) to (a)")
    for line in table(rows, ("phase", "texts/s", "ratio", "bench cpu s", "server cpu s", "envoy cpu s")):
        print(line)
    latencies: dict[str, list[float]] = measured["latencies"]
    print(f"idle latency of Embed({LATENCY_INPUT!r}), {args.idle_calls} calls each:")
    latency_rows = [(name, f"{percentile(v, 50):.1f}", f"{percentile(v, 99):.1f}") for name, v in latencies.items()]
    for line in table(latency_rows, ("path", "p50 ms", "p99 ms")):
        print(line)
    print(f"max |vector - in-process|: {', '.join(f'{k} {v:.1e}' for k, v in diffs.items())}")
    return {
        "texts": len(corpus),
        "clients": args.clients,
        "request_size": args.request_size,
        "ceiling_texts_per_s": ceiling,
        "ceiling_spread": spread,
        "texts_per_s": {name: p.texts_per_s for name, p in {**phases, "bulk": bulk}.items()},
        "rest_over_grpc": rest_ratio,
        "grpc_envoy_over_grpc": phases["grpc_envoy"].texts_per_s / grpc_rate,
        "bulk_over_in_process": bulk_ratio,
        "passes": {name: [asdict(p) for p in runs] for name, runs in passes.items()},
        "idle_latency_ms": {
            name: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for name, v in latencies.items()
        },
        "max_abs_diff": diffs,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=2000, help="corpus size (default 2000)")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 texts")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--model", default=DEFAULT_DENSE_MODEL, help=f"model (default {DEFAULT_DENSE_MODEL})")
    p.add_argument("--idle-calls", type=int, default=50, help="sequential calls per path for idle latency (default 50)")
    add_shared_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.texts = min(args.texts, 256)
        args.idle_calls = min(args.idle_calls, 10)
    check_positive(p, args, "texts", "batch_size", "request_size", "clients", "idle_calls")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    corpus = make_corpus(args.texts, args.seed)
    step(f"(a1) in-process baseline on {len(corpus)} texts")
    expected, a1 = measure_in_process(args, corpus)
    server = ServerProcess(args)
    workdir = tempfile.TemporaryDirectory(prefix="embedserve-bench-envoy-")
    envoy = None
    try:
        envoy_address = f"127.0.0.1:{free_port()}"
        envoy = gateway.start(gateway.write_config(Path(workdir.name), envoy_address, server.address), envoy_address)
        step(f"server on {server.address}, Envoy on {envoy_address}")
        measured = asyncio.run(measure(args, server, envoy_address, envoy.pid, corpus))
    finally:
        code = server.stop()
        if envoy is not None:
            envoy.terminate()
            envoy.wait(30)
        workdir.cleanup()
    if code != 0:
        raise RuntimeError(f"server exited {code} after SIGTERM:\n" + "".join(server.lines[-40:]))
    step("(a2) in-process baseline")
    _, a2 = measure_in_process(args, corpus)
    rates = [a1.texts_per_s(len(corpus)), a2.texts_per_s(len(corpus))]
    ceiling = statistics.fmean(rates)
    diffs = {name: max_abs_diff(v, expected) for name, v in measured["vectors"].items()}
    return report(args, corpus, ceiling, abs(rates[0] - rates[1]) / ceiling, measured, diffs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return emit_summary(run(args), args.json_out, "rest_bench: REST/gRPC vectors differ from in-process ones")


if __name__ == "__main__":
    sys.exit(main())
