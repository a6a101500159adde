"""The benches' JSON summaries (the last stdout line, and --json-out), built from what was measured."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from bench.ceiling_phases import CODES, NEW, OLD, TARGET, CeilingBench
from bench.harness import TARGET_RATIO, Ceiling, InProcessRun, percentile
from bench.inprocess import DEFAULT_SPARSE_MODEL
from bench.load import Throughput
from bench.overload_phases import GOODPUT_RATIO, HEALTH_P99_MS, PATHS, REFUSAL_P99_MS, CodeRun, OverloadBench
from bench.phases import EmbedBench, RerankSparseBench
from bench.shared_phases import (
    BASELINE_RATIO,
    QUERY,
    QUERY_P50_MS,
    QUERY_P99_MS,
    TENANT_RATIO,
    WITH_QUERIES_RATIO,
    SharedBench,
)

if TYPE_CHECKING:
    # Only annotations need them. bench.json_floats imports this module (its phases and entry
    # point are one module). Rendering the other benches does not import the Python client
    # (bench.rest_phases does), whose generated messages may lag behind the server's.
    from bench.json_floats import JsonFloatsBench
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


# -- bench.shared --------------------------------------------------------------------------------


def shared_summary(args: argparse.Namespace, bench: SharedBench) -> dict[str, Any]:
    """bench.shared's summary: the run's shape, the targets, then each code's figures."""
    versus = {name: bench.versus(name) for name in bench.checkout[0].figures()}
    return {
        "bench": "shared_bench",
        "model": args.model,
        "texts": args.texts,
        "seed": args.seed,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "request_size": args.request_size,
        "clients": args.clients,
        "stream_in_flight": args.stream_in_flight,
        "query": QUERY,
        "query_rate_per_s": args.rate,
        "idle_seconds": args.idle_seconds,
        "max_seconds": args.max_seconds,
        "cores": os.cpu_count(),
        "commit": bench.commit,
        "baseline_commit": bench.baseline_commit,
        "targets": {
            "query_p50_ms": QUERY_P50_MS,
            "query_p99_ms": QUERY_P99_MS,
            "with_queries_ratio": WITH_QUERIES_RATIO,
            "baseline_ratio": BASELINE_RATIO,
            "tenant_ratio": TENANT_RATIO,
        },
        "checkout": shared_code_json(bench, baseline=False),
        "baseline": shared_code_json(bench, baseline=True) if bench.baseline else None,
        "checkout_over_baseline": {k: asdict(v) for k, v in versus.items() if v is not None} or None,
        "complete": all(r.complete for r in [*bench.checkout, *bench.baseline]),
        "max_abs_diff": bench.diffs,
    }


def shared_code_json(bench: SharedBench, baseline: bool) -> dict[str, Any]:
    """One code's figures: median, low and high over the rounds, and each round's."""
    rounds = bench.baseline if baseline else bench.checkout
    names = rounds[0].figures()
    return {
        "figures": {name: asdict(bench.spread(name, baseline)) for name in names},
        "rounds": [
            {**r.figures(), "complete": r.complete, "cores_used": [run.cores_used for run in r.runs]} for r in rounds
        ],
    }


# -- bench.ceiling -------------------------------------------------------------------------------


def ceiling_summary(args: argparse.Namespace, bench: CeilingBench) -> dict[str, Any]:
    """bench.ceiling's summary: the run's shape, the forward pass, then one section per phase."""
    return {
        "bench": "ceiling_bench",
        "model": str(bench.model),
        "hidden_size": args.hidden_size,
        "texts": bench.forward[NEW].texts,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "request_size": args.request_size,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "commit": bench.commit,
        "baseline_commit": bench.baseline_commit,
        "target_ratio": TARGET,
        "forward": {code: {**asdict(f), "cpu_ms_per_1000": f.cpu_ms_per_1000()} for code, f in bench.forward.items()},
        "phases": {phase.key: ceiling_phase_json(bench, phase.key) for phase in bench.phases},
        "idle_server_cpu_share": bench.idle_share(),
        "profiles": {code: asdict(p) for code, p in bench.profiles.items()},
        "max_abs_diff": bench.diffs,
    }


def ceiling_phase_json(bench: CeilingBench, phase: str) -> dict[str, Any]:
    """One phase: texts/s and CPU per code, new over old, and every sample."""
    codes = {}
    for code in CODES:
        server = bench.cpu_ms_per_1000(phase, code)
        codes[code] = {
            "texts_per_s": asdict(bench.rate(phase, code)),
            "server_cpu_ms_per_1000": server,
            "rest_cpu_ms_per_1000": server - bench.forward[code].cpu_ms_per_1000(),
            "bench_cpu_ms_per_1000": bench.cpu_ms_per_1000(phase, code, client=True),
            "samples": [{"round": s.round, **asdict(s.throughput)} for s in bench.of(phase, code)],
        }
    return {**codes, "ratio": asdict(bench.ratio(phase)), "label": f"{NEW}/{OLD}"}


# -- bench.overload ------------------------------------------------------------------------------


def overload_summary(args: argparse.Namespace, bench: OverloadBench) -> dict[str, Any]:
    """bench.overload's summary: the run's shape, the targets, then each code's figures."""
    return {
        "bench": "overload_bench",
        "model": args.model,
        "texts": args.texts,
        "seed": args.seed,
        "request_size": args.request_size,
        "clients": args.clients,
        "grpc_clients": args.grpc_clients,
        "rest_clients": args.rest_clients,
        "connections": args.connections,
        "factor": args.factor,
        "seconds": args.seconds,
        "capacity_seconds": args.capacity_seconds,
        "cores": os.cpu_count(),
        "targets": {"goodput_ratio": GOODPUT_RATIO, "refusal_p99_ms": REFUSAL_P99_MS, "health_p99_ms": HEALTH_P99_MS},
        **{name: overload_code_json(run) for name, run in bench.runs.items()},
        "max_abs_diff": bench.diffs,
    }


def overload_code_json(run: CodeRun) -> dict[str, Any]:
    """One code's capacity, then each overload phase's figures, requests per status and path,
    refusals with a retry hint, and health checks per status."""
    return {
        "commit": run.commit,
        "queue": run.queue,
        "problems": run.problems,
        "capacity_texts_per_s": run.capacity_per_s,
        "overloads": [
            {
                "shape": asdict(o.shape),
                "figures": run.figures(o),
                "statuses": {path: dict(o.statuses(path)) for path in PATHS},
                "hinted": {path: dict(zip(("hinted", "refused"), o.hinted(path), strict=True)) for path in PATHS},
                "health_statuses": o.health,
            }
            for o in run.overloads
        ],
    }


# -- bench.json_floats ---------------------------------------------------------------------------


def json_floats_summary(args: argparse.Namespace, bench: JsonFloatsBench) -> dict[str, Any]:
    """bench.json_floats' summary: the run's shape, each code's figures over the rounds, new/old,
    every pass, and the vector check."""
    names = list(bench.passes[0].figures())
    return {
        "bench": "json_floats_bench",
        "model": args.model,
        "dimension": bench.dimension,
        "texts": args.texts,
        "words": list(bench.words),
        "seed": args.seed,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "request_size": args.request_size,
        "clients": args.clients,
        "cores": os.cpu_count(),
        "commits": bench.commits,
        "figures": {code: {name: asdict(bench.spread(name, code)) for name in names} for code in CODES},
        "new_over_old": {name: asdict(bench.ratio(name)) for name in names},
        "passes": [{**asdict(p), **p.figures()} for p in bench.passes],
        "vectors_new_vs_old": asdict(bench.check),
        "max_abs_diff": bench.diffs,
    }
