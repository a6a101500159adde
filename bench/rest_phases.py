"""The phases of bench.rest: Embed straight to the server and through Envoy, REST through Envoy
with the OpenAI SDK, the Python client's bulk helper, and idle latency on each path."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import openai
from embedserve_client import AsyncClient

from bench.harness import LATENCY_INPUT, Ceiling, FloatArray, chunks, percentile, step
from bench.load import Clock, Connections, Elapsed, channel, embed_load, queue_load
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

# The paths the throughput passes take, in the order they run.
PATHS = ("grpc", "grpc_envoy", "rest")


@dataclass
class Phase:
    """One throughput pass: wall time and the CPU seconds of bench, server and Envoy."""

    seconds: float
    texts: int
    bench_cpu_s: float
    server_cpu_s: float
    envoy_cpu_s: float

    @classmethod
    def measured(cls, elapsed: Elapsed, texts: int) -> Phase:
        """From a Clock that watched the server and Envoy, in that order."""
        server_cpu_s, envoy_cpu_s = elapsed.cpu_s
        return cls(elapsed.seconds, texts, elapsed.own_cpu_s, server_cpu_s, envoy_cpu_s)

    @property
    def texts_per_s(self) -> float:
        """Texts answered per second of wall time."""
        return self.texts / self.seconds


def mean_phase(a: Phase, b: Phase) -> Phase:
    """Two passes as one: summed work over summed time."""
    return Phase(*(x + y for x, y in zip(asdict(a).values(), asdict(b).values(), strict=True)))


async def grpc_pass(
    address: str, clients: int, corpus: list[str], request_size: int, pids: Sequence[int]
) -> tuple[Phase, FloatArray]:
    """Embed over `clients` connections to `address`; connecting is part of the pass."""
    requests = [pb.EmbedRequest(inputs=texts) for texts in chunks(corpus, request_size)]
    async with Connections(address, clients) as connections:
        clock = Clock(*pids)
        results, _, _ = await embed_load(connections.stubs, requests)
        phase = Phase.measured(clock.read(), len(corpus))
    return phase, np.concatenate(results)


async def rest_call(sdk: openai.AsyncOpenAI, model: str, texts: list[str]) -> FloatArray:
    """POST /v1/embeddings with the SDK's defaults (base64 on the wire, floats in Python)."""
    response = await sdk.embeddings.create(model=model, input=texts)
    return np.array([d.embedding for d in response.data], dtype=np.float32)


async def rest_pass(
    base_url: str, model: str, clients: int, corpus: list[str], request_size: int, pids: Sequence[int]
) -> tuple[Phase, FloatArray]:
    """The OpenAI SDK as users run it, one SDK client (connection) per concurrent caller."""
    sdks = [openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0) for _ in range(clients)]
    clock = Clock(*pids)
    results, _ = await queue_load(sdks, chunks(corpus, request_size), lambda sdk, texts: rest_call(sdk, model, texts))
    phase = Phase.measured(clock.read(), len(corpus))
    for sdk in sdks:
        await sdk.close()
    return phase, np.concatenate(results)


async def bulk_pass(
    address: str, corpus: list[str], request_size: int, pids: Sequence[int]
) -> tuple[Phase, FloatArray]:
    """embedserve_client.AsyncClient.bulk_embed over the corpus, as a bulk job would run it."""
    async with AsyncClient(address) as client:
        clock = Clock(*pids)
        vectors = [v async for v in client.bulk_embed(corpus, batch_size=request_size)]
        phase = Phase.measured(clock.read(), len(corpus))
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


@dataclass
class RestResults:
    """Everything bench.rest measured against the server and Envoy."""

    passes: dict[str, list[Phase]]  # two per path of PATHS
    bulk: Phase
    vectors: dict[str, FloatArray]  # of the last pass of each path, and of the bulk helper
    latencies: dict[str, list[float]]  # idle, per path


@dataclass
class RestBench:
    """All that bench.rest measured, for the report."""

    ceiling: Ceiling  # (a1) and (a2)
    measured: RestResults
    # Largest |vector - in-process| per path and for the bulk helper.
    diffs: dict[str, float]

    @property
    def phases(self) -> dict[str, Phase]:
        """Each path's two passes as one."""
        return {name: mean_phase(*runs) for name, runs in self.measured.passes.items()}


async def measure_rest(
    args: argparse.Namespace, server_address: str, envoy_address: str, pids: Sequence[int], corpus: list[str]
) -> RestResults:
    """Warm-up, idle latency, two interleaved rounds of (g), (e), (r), then (k)."""
    base_url = f"http://{envoy_address}"
    addresses = {"grpc": server_address, "grpc_envoy": envoy_address}
    step("warm-up through every path")
    warm = corpus[: args.request_size]
    await grpc_pass(server_address, 1, warm, args.request_size, pids)
    await grpc_pass(envoy_address, 1, warm, args.request_size, pids)
    await rest_pass(base_url, args.model, 1, warm, args.request_size, pids)
    latencies = await idle_latency(server_address, envoy_address, args.model, args.idle_calls)
    step("idle latency p50 ms: " + ", ".join(f"{k} {percentile(v, 50):.1f}" for k, v in latencies.items()))
    passes: dict[str, list[Phase]] = {name: [] for name in PATHS}
    vectors: dict[str, FloatArray] = {}
    for round_ in (1, 2):
        for name in PATHS:
            if name == "rest":
                run = rest_pass(base_url, args.model, args.clients, corpus, args.request_size, pids)
            else:
                run = grpc_pass(addresses[name], args.clients, corpus, args.request_size, pids)
            phase, vectors[name] = await run
            passes[name].append(phase)
            step(f"round {round_}: {name} {phase.texts_per_s:.1f} texts/s")
    bulk, vectors["bulk"] = await bulk_pass(server_address, corpus, args.request_size, pids)
    step(f"bulk helper {bulk.texts_per_s:.1f} texts/s")
    return RestResults(passes, bulk, vectors, latencies)
