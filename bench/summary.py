"""The benches' JSON summaries (the last stdout line, and --json-out), built from what was measured."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from bench.harness import TARGET_RATIO, Ceiling, InProcessRun, percentile
from bench.inprocess import DEFAULT_SPARSE_MODEL
from bench.load import Throughput
from bench.phases import EmbedBench, RerankSparseBench
from bench.rest_phases import RestBench


def run_json(run: InProcessRun, **extra: float) -> dict[str, Any]:
    """An in-process pass without its per-text lengths."""
    return {**{k: v for k, v in asdict(run).items() if k != "lengths"}, **extra}


def throughput_json(phase: Throughput, ceiling: Ceiling, rate_key: str) -> dict[str, Any]:
    """A gRPC phase with its rate (named `rate_key`), cores used and CPU ratio to the ceiling."""
    cpu_ratio = ceiling.cpu_ratio(phase.client_cpu_s + phase.server_cpu_s)
    return {**asdict(phase), rate_key: phase.texts_per_s, "cores_used": phase.cores_used, "cpu_ratio": cpu_ratio}


def latency_json(latencies: Sequence[float]) -> dict[str, Any]:
    """p50, p99 and count of latencies in ms."""
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "calls": len(latencies)}


# -- bench.embed ---------------------------------------------------------------------------------


def embed_summary(args: argparse.Namespace, bench: EmbedBench) -> dict[str, Any]:
    """bench.embed's summary: the run's shape, then embed_figures."""
    return {
        "bench": "embed_bench",
        "model": args.model,
        "texts": bench.ceiling.items,
        "tokens": bench.ceiling.before.tokens,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "request_size": args.request_size,
        "clients": args.clients,
        "stream_in_flight": args.stream_in_flight,
        "cores": os.cpu_count(),
        "baseline_window": args.baseline_window,
        "target_ratio": TARGET_RATIO,
        **embed_figures(bench),
    }


def embed_figures(bench: EmbedBench) -> dict[str, Any]:
    """bench.embed's measured figures."""
    ceiling, server, wire = bench.ceiling, bench.server, bench.wire
    values, raw = wire["values"], wire["float32_le"]
    presorted = server.presorted
    return {
        "in_process_before_texts_per_s": ceiling.before_per_s,
        "in_process_after_texts_per_s": ceiling.after_per_s,
        "in_process_texts_per_s": ceiling.per_s,
        "in_process_runs": [run_json(r, cores_used=r.cores_used) for r in (ceiling.before, ceiling.after)],
        "padding_efficiency_in_process": ceiling.before.padding_efficiency,
        "padding_efficiency_best_visible": bench.best_visible_padding,
        "embed": throughput_json(server.embed, ceiling, "texts_per_s"),
        "stream": throughput_json(server.stream, ceiling, "texts_per_s"),
        "presorted": throughput_json(presorted, ceiling, "texts_per_s") if presorted else None,
        "ratio_embed": ceiling.ratio(server.embed.texts_per_s),
        "ratio_stream": ceiling.ratio(server.stream.texts_per_s),
        "ratio_presorted": ceiling.ratio(presorted.texts_per_s) if presorted else None,
        "latency_idle_ms": latency_json(server.idle_ms),
        "latency_loaded_ms": {
            **latency_json(server.loaded_ms),
            "server_timing_ms": server.loaded_timing_ms,
            "load_texts_per_s": server.loaded_texts_per_s,
        },
        "wire": {name: {**asdict(w), "total_ms": w.total_ms} for name, w in wire.items()},
        "wire_time_ratio": values.total_ms / raw.total_ms,
        "wire_size_ratio": values.bytes / raw.bytes,
        "max_abs_diff": bench.diffs,
    }


# -- bench.rerank_sparse -------------------------------------------------------------------------


def rerank_sparse_summary(args: argparse.Namespace, bench: RerankSparseBench) -> dict[str, Any]:
    """bench.rerank_sparse's summary: the run's shape, then one section per RPC."""
    n = len(bench.workload.texts)
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
        "rerank": {"pairs": n, **rpc_json(bench, "rerank", "in_process_pairs_per_s")},
        "sparse": {
            "texts": n,
            **rpc_json(bench, "sparse", "in_process_texts_per_s"),
            "terms_per_text": bench.terms_per_text,
            "texts_with_different_terms": bench.differing_terms,
        },
        "target_ratio": TARGET_RATIO,
        "max_abs_diff": bench.diffs,
    }


def rpc_json(bench: RerankSparseBench, kind: str, ceiling_key: str) -> dict[str, Any]:
    """The figures of one RPC ("rerank" or "sparse"): in-process passes, server phase, ratio and padding."""
    ceiling = bench.rerank if kind == "rerank" else bench.sparse
    phase = bench.server.rerank if kind == "rerank" else bench.server.sparse
    runs = [run_json(r, items_per_s=r.texts_per_s(ceiling.items), cores_used=r.cores_used)
            for r in (ceiling.before, ceiling.after)]  # fmt: skip
    return {
        "tokens": ceiling.before.tokens,
        "in_process_runs": runs,
        ceiling_key: ceiling.per_s,
        "server": throughput_json(phase, ceiling, "items_per_s"),
        "ratio": ceiling.ratio(phase.texts_per_s),
        "padding_efficiency_in_process": ceiling.before.padding_efficiency,
        "padding_efficiency_best_visible": bench.best_visible_padding[kind],
    }


# -- bench.rest ----------------------------------------------------------------------------------


def rest_summary(args: argparse.Namespace, bench: RestBench) -> dict[str, Any]:
    """bench.rest's summary."""
    phases, bulk = bench.phases, bench.measured.bulk
    grpc_rate = phases["grpc"].texts_per_s
    latencies = bench.measured.latencies
    return {
        "texts": bench.ceiling.items,
        "clients": args.clients,
        "request_size": args.request_size,
        "ceiling_texts_per_s": bench.ceiling.per_s,
        "ceiling_spread": bench.ceiling.spread,
        "texts_per_s": {name: p.texts_per_s for name, p in {**phases, "bulk": bulk}.items()},
        "rest_over_grpc": phases["rest"].texts_per_s / grpc_rate,
        "grpc_envoy_over_grpc": phases["grpc_envoy"].texts_per_s / grpc_rate,
        "bulk_over_in_process": bench.ceiling.ratio(bulk.texts_per_s),
        "passes": {name: [asdict(p) for p in runs] for name, runs in bench.measured.passes.items()},
        "idle_latency_ms": {
            name: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for name, v in latencies.items()
        },
        "max_abs_diff": bench.diffs,
    }
