"""The phases that run against one server: Embed, EmbedStream and latency for bench.embed,
Rerank and SparseEmbed for bench.rerank_sparse. Each returns what it measured."""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bench.harness import Ceiling, FloatArray, InProcessRun, RerankSparsePass, Terms, Workload, chunks, step
from bench.inprocess import DEFAULT_SPARSE_MODEL, WireForm
from bench.load import (
    Clock,
    Connections,
    Throughput,
    embed_call,
    embed_load,
    mean_timing,
    probe_latency,
    rpc_load,
    stream_bulk,
    timed_load,
)
from bench.load import decode as decode_vectors
from bench.process import ServerProcess
from embedserve.v1 import embedding_service_pb2 as pb

if TYPE_CHECKING:
    from embedserve.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub


# -- bench.embed -------------------------------------------------------------------------------


@dataclass
class EmbedServerResults:
    """Everything bench.embed measured against the running server."""

    embed: Throughput
    stream: Throughput
    idle_ms: list[float]
    loaded_ms: list[float]
    # Means of the server's timing of the short calls made under load, in ms.
    loaded_timing_ms: dict[str, float]
    loaded_texts_per_s: float
    embed_vectors: FloatArray
    stream_vectors: FloatArray
    # (b) again with the corpus sent in length order, and its vectors in corpus order.
    presorted: Throughput | None = None
    presorted_vectors: FloatArray | None = None


@dataclass
class EmbedBench:
    """All that bench.embed measured, for the report."""

    ceiling: Ceiling  # (a1) and (a2)
    server: EmbedServerResults
    wire: dict[str, WireForm]
    # Largest |server - in-process| per server phase.
    diffs: dict[str, float]
    # The best padding efficiency of a server that sees at most clients x request size texts.
    best_visible_padding: float


async def timed_embed(
    server: ServerProcess, stubs: Sequence[Stub], texts: Sequence[str], request_size: int
) -> tuple[Throughput, FloatArray]:
    """Runs `texts` through Embed with one client per stub; returns the measurement and the
    vectors in the order of `texts`."""
    requests = [pb.EmbedRequest(inputs=g) for g in chunks(texts, request_size)]
    throughput, results = await timed_load(server.proc.pid, stubs, requests, len(texts), embed_call, decode_vectors)
    return throughput, np.concatenate(results)


async def timed_stream(
    server: ServerProcess, stub: Stub, requests: Sequence[pb.EmbedStreamRequest], texts: int, in_flight: int
) -> tuple[Throughput, FloatArray]:
    """All requests on one EmbedStream; returns the measurement and the vectors in request order."""
    clock = Clock(server.proc.pid)
    answered, timings = await stream_bulk(stub, requests, in_flight)
    elapsed = clock.read()
    (server_cpu_s,) = elapsed.cpu_s
    stream = Throughput(elapsed.seconds, texts, elapsed.own_cpu_s, server_cpu_s, mean_timing(timings))
    return stream, np.concatenate([answered[str(i)] for i in range(len(requests))])


async def latency_under_load(
    stubs: Sequence[Stub], probe: Stub, requests: Sequence[pb.EmbedRequest], texts: int
) -> tuple[list[float], dict[str, float], float]:
    """The prober's latencies and mean server timing while the clients consume the requests
    once more, and the texts/s the load ran at."""
    load = asyncio.create_task(embed_load(stubs, requests))
    await asyncio.sleep(0)  # let the clients send their first requests
    clock = Clock()
    loaded, loaded_timings = await probe_latency(probe, load.done, limit=1 << 30)
    await load
    return loaded, mean_timing(loaded_timings), texts / clock.read().seconds


async def warm_up(stubs: Sequence[Stub], probe: Stub, requests: Sequence[pb.EmbedRequest]) -> None:
    """Every connection with a short call, then two full batches of corpus texts through the
    clients (ORT's first runs allocate); small, so a --quick corpus is not mostly warm-up."""
    for stub in [*stubs, probe]:
        await probe_latency(stub, lambda: False, 3)
    await embed_load(stubs[:2], requests[:2])


async def measure_embed_server(
    args: argparse.Namespace, server: ServerProcess, corpus: list[str], by_length: list[int] | None
) -> EmbedServerResults:
    """Phases (d idle), (b), (c), (d under load) against one running server; with `by_length`
    (corpus positions, shortest first) also (b) on the corpus sent in that order."""
    embed_requests = [pb.EmbedRequest(inputs=g) for g in chunks(corpus, args.request_size)]
    stream_requests = [pb.EmbedStreamRequest(id=str(i), request=r) for i, r in enumerate(embed_requests)]
    async with Connections(server.address, args.clients) as clients, Connections(server.address, 1) as prober:
        await asyncio.gather(clients.ready(), prober.ready())
        stubs, probe = clients.stubs, prober.stubs[0]
        await warm_up(stubs, probe, embed_requests)

        step(f"(d) idle latency, {args.idle_calls} calls")
        idle, _ = await probe_latency(probe, lambda: False, args.idle_calls)
        step(f"(b) Embed, {args.clients} clients")
        embed, embed_vectors = await timed_embed(server, stubs, corpus, args.request_size)
        step(f"(c) EmbedStream, {args.stream_in_flight} requests in flight")
        stream, stream_vectors = await timed_stream(
            server, stubs[0], stream_requests, len(corpus), args.stream_in_flight
        )
        step(f"(d) latency under Embed load, {args.clients} clients")
        loaded = await latency_under_load(stubs, probe, embed_requests, len(corpus))
        results = EmbedServerResults(embed, stream, idle, *loaded, embed_vectors, stream_vectors)

        if by_length is not None:
            # Requests of similar lengths make every batch nearly padding-free, as in (a):
            # what is left between this and (a) is the RPC path, not batching.
            step(f"(b') Embed, {args.clients} clients, corpus sent shortest first")
            texts = [corpus[i] for i in by_length]
            results.presorted, vectors = await timed_embed(server, stubs, texts, args.request_size)
            results.presorted_vectors = np.empty_like(vectors)
            results.presorted_vectors[by_length] = vectors
    return results


# -- bench.rerank_sparse -------------------------------------------------------------------------


def decode_scores(response: pb.RerankResponse) -> FloatArray:
    """Scores back in document order (the server sends them best first)."""
    scores = np.full(len(response.results), np.nan, dtype=np.float32)
    for result in response.results:
        scores[result.index] = result.relevance_score
    return scores


def decode_terms(response: pb.SparseEmbedResponse) -> list[Terms]:
    """Each sparse vector as numpy ids and weights, in input order."""
    if any(e.index != i for i, e in enumerate(response.embeddings)):
        raise RuntimeError("SparseEmbed answered out of input order")
    return [(np.array(e.indices, dtype=np.int32), np.array(e.values, dtype=np.float32)) for e in response.embeddings]


def rerank_call(stub: Stub, request: pb.RerankRequest) -> Awaitable[pb.RerankResponse]:
    """One Rerank call."""
    return stub.Rerank(request)


def sparse_call(stub: Stub, request: pb.SparseEmbedRequest) -> Awaitable[pb.SparseEmbedResponse]:
    """One SparseEmbed call."""
    return stub.SparseEmbed(request)


@dataclass
class RerankSparseBench:
    """All that bench.rerank_sparse measured, for the report."""

    workload: Workload
    a1: RerankSparsePass[InProcessRun]
    a2: RerankSparsePass[InProcessRun]
    server: RerankSparsePass[Throughput]
    # Largest |server - in-process| per RPC, and how many texts got a different set of terms.
    diffs: dict[str, float]
    differing_terms: int
    # Per RPC, the best padding efficiency of a server that sees at most clients x request size items.
    best_visible_padding: dict[str, float]

    @property
    def rerank(self) -> Ceiling:
        """The rerank ceiling, in pairs."""
        return Ceiling(self.a1.rerank, self.a2.rerank, len(self.workload.texts))

    @property
    def sparse(self) -> Ceiling:
        """The sparse ceiling, in texts."""
        return Ceiling(self.a1.sparse, self.a2.sparse, len(self.workload.texts))

    @property
    def terms_per_text(self) -> float:
        """Mean positive terms of an in-process sparse vector."""
        return statistics.fmean(len(indices) for indices, _ in self.a1.terms)


async def measure_rerank_sparse_server(
    args: argparse.Namespace, server: ServerProcess, workload: Workload, rerank_model: str
) -> RerankSparsePass[Throughput]:
    """Phases (b) Rerank and (c) SparseEmbed against one running server."""
    # Raw logits, so they compare with the in-process ones directly (the sigmoid is one exp a pair).
    rerank_requests = [
        pb.RerankRequest(model=rerank_model, query=q, documents=g, raw_scores=True)
        for q, g in zip(workload.queries, workload.groups, strict=True)
    ]
    sparse_requests = [pb.SparseEmbedRequest(model=DEFAULT_SPARSE_MODEL, inputs=g) for g in workload.groups]
    async with Connections(server.address, args.clients) as clients:
        await clients.ready()
        stubs = clients.stubs
        # Every connection with a small call of each RPC, then the whole workload once, untimed,
        # through each RPC (WARM_UP in bench.rerank_sparse).
        small_rerank = pb.RerankRequest(model=rerank_model, query="hello", documents=["hello world"])
        small_sparse = pb.SparseEmbedRequest(model=DEFAULT_SPARSE_MODEL, inputs=["hello world"])
        for stub in stubs:
            await stub.Rerank(small_rerank)
            await stub.SparseEmbed(small_sparse)
        step("warm-up: the workload once through Rerank and SparseEmbed, untimed")
        await rpc_load(stubs, rerank_requests, rerank_call, decode_scores)
        await rpc_load(stubs, sparse_requests, sparse_call, decode_terms)

        items, pid = len(workload.texts), server.proc.pid
        step(f"(b) Rerank, {args.clients} clients, {len(rerank_requests)} requests of 1 query + documents")
        rerank, scores = await timed_load(pid, stubs, rerank_requests, items, rerank_call, decode_scores)
        step(f"(c) SparseEmbed, {args.clients} clients, {len(sparse_requests)} requests")
        sparse, terms = await timed_load(pid, stubs, sparse_requests, items, sparse_call, decode_terms)
    return RerankSparsePass(rerank, sparse, np.concatenate(scores), [t for group in terms for t in group])
