"""The benches' reports: tables and lines rendered from what was measured. Nothing here measures."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Mapping, Sequence

from bench.harness import LATENCY_INPUT, TARGET_RATIO, VECTOR_TOLERANCE, Ceiling, InProcessRun, percentile
from bench.inprocess import DEFAULT_SPARSE_MODEL, WireForm
from bench.load import Throughput
from bench.phases import EmbedBench, RerankSparseBench
from bench.rest_phases import RestBench

Row = tuple[str, ...]
# What (r)/(g) should reach in bench.rest (issue 4).
REST_TARGET = 0.80
CPU_VS_A = "  cpu vs (a): in-process CPU seconds / (bench + server) CPU seconds for the same {}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


# -- rows and lines shared by the server-vs-in-process reports -----------------------------------


def throughput_header(title: str, unit: str) -> Row:
    """The columns of a throughput table."""
    return (title, f"{unit}/s", "vs (a)", "cpu s bench", "cpu s server", "cores used", "cpu vs (a)", "notes")


def in_process_row(label: str, run: InProcessRun, texts: int) -> Row:
    """One table row for an in-process pass."""
    notes = (
        f"forward {run.forward_s / run.seconds:.0%} of wall, tokenize {run.tokenize_s / run.seconds:.0%}, "
        f"padding efficiency {run.padding_efficiency:.0%}"
    )
    return (label, f"{run.texts_per_s(texts):.1f}", "", f"{run.cpu_s:.1f}", "", f"{run.cores_used:.2f}", "", notes)


def ceiling_rows(ceiling: Ceiling) -> list[Row]:
    """The two in-process passes and their mean, which the ratios divide by."""
    return [
        in_process_row("(a) in-process ORT, before server", ceiling.before, ceiling.items),
        in_process_row("(a) in-process ORT, after server", ceiling.after, ceiling.items),
        ("(a) ceiling: mean of the two", f"{ceiling.per_s:.1f}", "1.00", f"{ceiling.cpu_s:.1f}", "", "", "1.00",
         f"before/after differ by {ceiling.spread:.1%}"),
    ]  # fmt: skip


def grpc_row(label: str, phase: Throughput, ceiling: Ceiling) -> Row:
    """One table row for a gRPC throughput phase: ratios to the ceiling in wall time and in CPU
    seconds (steadier on a shared machine), and the server's mean timing per request."""
    ratio = ceiling.ratio(phase.texts_per_s)
    cpu_ratio = ceiling.cpu_ratio(phase.client_cpu_s + phase.server_cpu_s)
    t = phase.server_timing_ms
    notes = (
        f"server ms/request: queue {t.get('queue_ms', 0):.0f}, tokenize {t.get('tokenize_ms', 0):.1f}, "
        f"inference {t.get('inference_ms', 0):.0f}, total {t.get('total_ms', 0):.0f}"
    )
    verdict = "ok" if ratio >= TARGET_RATIO else "LOW"
    return (label, f"{phase.texts_per_s:.1f}", f"{ratio:.2f} {verdict}", f"{phase.client_cpu_s:.1f}",
            f"{phase.server_cpu_s:.1f}", f"{phase.cores_used:.2f}", f"{cpu_ratio:.2f}", notes)  # fmt: skip


def cores_warning(cores: Sequence[float], cpu_column_note: bool) -> list[str]:
    """A warning when the phases got shares of the machine more than 15% apart; with
    `cpu_column_note`, what that means for the 'cpu vs (a)' column."""
    low, high = min(cores), max(cores)
    if not high > 1.15 * low:
        return []
    off = f"the wall-time ratios are off by up to {high / low - 1:.0%}"
    if cpu_column_note:
        off = (f", so {off}; 'cpu vs (a)' is less affected, but not immune (threads that wait on a busy core "
               f"burn CPU)")  # fmt: skip
    else:
        off = f"; {off}"
    return [
        f"  WARNING: the phases got between {low:.2f} and {high:.2f} cores: something else used the CPU during "
        f"some of them{off}: rerun on a quiet machine"
    ]


def latency_row(label: str, latencies: Sequence[float], notes: str = "") -> Row:
    """p50 / p99 / count of a list of latencies in ms."""
    return (label, f"{percentile(latencies, 50):.1f}", f"{percentile(latencies, 99):.1f}", str(len(latencies)), notes)


def wire_row(label: str, w: WireForm) -> Row:
    """Per-step milliseconds and size of one encoding."""
    steps = (w.build_ms, w.serialize_ms, w.parse_ms, w.decode_ms, w.total_ms)
    return (label, *(f"{ms:.2f}" for ms in steps), f"{w.bytes:,}")


# -- bench.embed ---------------------------------------------------------------------------------


def embed_report(args: argparse.Namespace, bench: EmbedBench) -> list[str]:
    """The report of bench.embed, line by line."""
    a1, n = bench.ceiling.before, bench.ceiling.items
    heading = (
        f"embedserve bench: {n} texts (seed {args.seed}, 8-120 words, {a1.tokens} tokens, "
        f"{a1.tokens / n:.0f} per text), {args.model}, batch {args.batch_size}, "
        f"requests of {args.request_size}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    return [
        "",
        heading,
        "",
        *embed_throughput(args, bench),
        "",
        *embed_latency(args, bench),
        "",
        *embed_wire(args, bench.wire),
        "",
        *embed_verdict(bench),
    ]


def embed_throughput(args: argparse.Namespace, bench: EmbedBench) -> list[str]:
    """The throughput table of (a), (b), (c) and (b'), and what to read beside it."""
    ceiling, server = bench.ceiling, bench.server
    rows = [
        *ceiling_rows(ceiling),
        grpc_row(f"(b) Embed, {args.clients} clients", server.embed, ceiling),
        grpc_row(f"(c) EmbedStream, {args.stream_in_flight} in flight", server.stream, ceiling),
    ]
    if server.presorted is not None:
        rows.append(grpc_row("(b') as (b), corpus sent shortest first", server.presorted, ceiling))
    grpc_phases = [server.embed, server.stream, *([server.presorted] if server.presorted else [])]
    cores = [ceiling.before.cores_used, ceiling.after.cores_used, *(phase.cores_used for phase in grpc_phases)]
    sorted_by = f"windows of {args.baseline_window} texts" if args.baseline_window else "the whole corpus"
    visible = args.clients * args.request_size
    return [
        *table(rows, throughput_header("throughput", "texts")),
        CPU_VS_A.format("texts"),
        *cores_warning(cores, cpu_column_note=True),
        f"  (b) request latency seen by the clients: p50 {server.embed.request_ms_p50:.0f} ms, "
        f"p99 {server.embed.request_ms_p99:.0f} ms",
        f"  padding (real / padded tokens): (a) sorts {sorted_by} by length: {ceiling.before.padding_efficiency:.1%}; "
        f"a server that sees at most {visible} texts at once ({args.clients} clients x {args.request_size}) "
        f"gets at best {bench.best_visible_padding:.1%} with fixed batches of {args.batch_size}",
    ]


def embed_latency(args: argparse.Namespace, bench: EmbedBench) -> list[str]:
    """The latency table of (d), idle and under load."""
    server = bench.server
    t = server.loaded_timing_ms
    rows = [
        latency_row("(d) idle", server.idle_ms),
        latency_row(f"(d) under Embed load, {args.clients} clients", server.loaded_ms,
                    f"load ran at {server.loaded_texts_per_s:.1f} texts/s; server mean ms: "
                    f"queue {t.get('queue_ms', 0):.0f}, inference {t.get('inference_ms', 0):.0f}"),
    ]  # fmt: skip
    return table(rows, (f'latency of "{LATENCY_INPUT}"', "p50 ms", "p99 ms", "calls", "notes"))


def embed_wire(args: argparse.Namespace, wire: Mapping[str, WireForm]) -> list[str]:
    """The wire-form table of (e)."""
    values, raw = wire["values"], wire["float32_le"]
    rows = [wire_row(name, w) for name, w in wire.items()]
    rows.append(("values / float32_le", "", "", "", "", f"{values.total_ms / raw.total_ms:.1f}x",
                 f"{values.bytes / raw.bytes:.3f}x"))  # fmt: skip
    header = (f"(e) wire, {args.wire_vectors} x {args.wire_dimension}", "build ms", "serialize ms", "parse ms",
              "decode ms", "total ms", "bytes")  # fmt: skip
    return table(rows, header)


def embed_verdict(bench: EmbedBench) -> list[str]:
    """Whether the vectors match, and the ratios against the target."""
    worst = max(bench.diffs.values())
    each = ", ".join(f"{k} {v:.1e}" for k, v in bench.diffs.items())
    verdict = "ok" if worst < VECTOR_TOLERANCE else "MISMATCH"
    ratio_b = bench.ceiling.ratio(bench.server.embed.texts_per_s)
    ratio_c = bench.ceiling.ratio(bench.server.stream.texts_per_s)
    return [
        f"vectors: server vs in-process max |diff| {worst:.1e} ({verdict}: {each})",
        f"ratios: (b)/(a) = {ratio_b:.3f}  (c)/(a) = {ratio_c:.3f}  (target >= {TARGET_RATIO:.2f})",
    ]


# -- bench.rerank_sparse -------------------------------------------------------------------------


def rerank_sparse_report(args: argparse.Namespace, bench: RerankSparseBench) -> list[str]:
    """The report of bench.rerank_sparse, line by line."""
    n = len(bench.workload.texts)
    rerank_label = f"(b) Rerank, {args.clients} clients"
    sparse_label = f"(c) SparseEmbed, {args.clients} clients"
    return [
        "",
        f"rerank/sparse bench: {n} texts (seed {args.seed}, 8-120 words), {len(bench.workload.groups)} requests of "
        f"{args.request_size}, {args.clients} clients, batch {args.batch_size}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        f"  rerank: {args.cross_encoder.name} (MiniLM-L6 cross-encoder), "
        f"{bench.a1.rerank.tokens / n:.0f} tokens per pair",
        f"  sparse: {DEFAULT_SPARSE_MODEL}, {bench.a1.sparse.tokens / n:.0f} tokens per text",
        "",
        *phase_table("rerank: pairs", "pairs", bench.rerank, bench.server.rerank, rerank_label),
        "",
        *phase_table("sparse: texts", "texts", bench.sparse, bench.server.sparse, sparse_label),
        CPU_VS_A.format("work"),
        rerank_sparse_padding(args, bench),
        "",
        *rerank_sparse_verdict(bench),
    ]


def phase_table(title: str, unit: str, ceiling: Ceiling, phase: Throughput, label: str) -> list[str]:
    """One RPC's table, a warning if the phases got unequal shares of the machine, and the
    client-seen latency."""
    rows = [*ceiling_rows(ceiling), grpc_row(label, phase, ceiling)]
    cores = [ceiling.before.cores_used, ceiling.after.cores_used, phase.cores_used]
    return [
        *table(rows, throughput_header(title, unit)),
        *cores_warning(cores, cpu_column_note=False),
        f"  request latency seen by the clients: p50 {phase.request_ms_p50:.0f} ms, p99 {phase.request_ms_p99:.0f} ms",
    ]


def rerank_sparse_padding(args: argparse.Namespace, bench: RerankSparseBench) -> str:
    """The padding the ceilings got, and the best a server could get."""
    sorted_by = f"windows of {args.baseline_window}" if args.baseline_window else "all of them"
    visible = args.clients * args.request_size
    best = bench.best_visible_padding
    return (
        f"  padding (real / padded tokens): (a) sorts {sorted_by} by length: "
        f"rerank {bench.a1.rerank.padding_efficiency:.1%}, sparse {bench.a1.sparse.padding_efficiency:.1%}; "
        f"a server that sees at most {visible} items at once gets at best "
        f"rerank {best['rerank']:.1%}, sparse {best['sparse']:.1%}"
    )


def rerank_sparse_verdict(bench: RerankSparseBench) -> list[str]:
    """Whether scores and sparse vectors match, and the ratios against the target."""
    diffs, n = bench.diffs, len(bench.workload.texts)
    verdict = "ok" if max(diffs.values()) < VECTOR_TOLERANCE else "MISMATCH"
    ratio_rerank = bench.rerank.ratio(bench.server.rerank.texts_per_s)
    ratio_sparse = bench.sparse.ratio(bench.server.sparse.texts_per_s)
    return [
        f"correctness ({verdict}): rerank max |score - logit| {diffs['rerank']:.1e}; sparse max |weight diff| "
        f"{diffs['sparse']:.1e}, {bench.differing_terms} of {n} texts with a different set of terms "
        f"({bench.terms_per_text:.0f} terms per text)",
        f"ratios: (b)/(a) rerank = {ratio_rerank:.3f}  (c)/(a) sparse = {ratio_sparse:.3f}  "
        f"(target >= {TARGET_RATIO:.2f})",
    ]


# -- bench.rest ----------------------------------------------------------------------------------


def rest_report(args: argparse.Namespace, bench: RestBench) -> list[str]:
    """The report of bench.rest, line by line."""
    phases, bulk = bench.phases, bench.measured.bulk
    grpc_rate = phases["grpc"].texts_per_s
    rows = []
    for label, phase, base, target in (
        ("(g) gRPC Embed, direct", phases["grpc"], grpc_rate, None),
        ("(e) gRPC Embed via Envoy", phases["grpc_envoy"], grpc_rate, None),
        ("(r) REST, OpenAI SDK base64, via Envoy", phases["rest"], grpc_rate, REST_TARGET),
        ("(k) client bulk_embed (EmbedStream)", bulk, bench.ceiling.per_s, None),
    ):
        ratio = phase.texts_per_s / base
        verdict = "" if target is None else (" ok" if ratio >= target else " LOW")
        rows.append((label, f"{phase.texts_per_s:.1f}", f"{ratio:.2f}{verdict}", f"{phase.bench_cpu_s:.1f}",
                     f"{phase.server_cpu_s:.1f}", f"{phase.envoy_cpu_s:.1f}"))  # fmt: skip
    latencies = bench.measured.latencies
    latency_rows = [(name, f"{percentile(v, 50):.1f}", f"{percentile(v, 99):.1f}") for name, v in latencies.items()]
    return [
        f"embedserve REST/bulk bench: {bench.ceiling.items} texts, {args.clients} clients x {args.request_size} texts, "
        f"model {args.model}, {platform.machine()} x {os.cpu_count()} cores",
        f"in-process ceiling (a): {bench.ceiling.per_s:.1f} texts/s (a1/a2 spread {bench.ceiling.spread:.1%})",
        "ratio: (g)/(e)/(r) to (g); (k) to (a)",
        *table(rows, ("phase", "texts/s", "ratio", "bench cpu s", "server cpu s", "envoy cpu s")),
        f"idle latency of Embed({LATENCY_INPUT!r}), {args.idle_calls} calls each:",
        *table(latency_rows, ("path", "p50 ms", "p99 ms")),
        f"max |vector - in-process|: {', '.join(f'{k} {v:.1e}' for k, v in bench.diffs.items())}",
    ]


# -- bench.ort_tuning ----------------------------------------------------------------------------


def ort_table(rates: Mapping[tuple[int, str, str], float], default: tuple[int, str, str]) -> list[str]:
    """texts/s per (threads, graph optimization level, dtype) and its ratio to the default."""
    baseline = rates[default]
    lines = [f"{'threads':>7}  {'graph opt':<9}  {'dtype':<5}  {'texts/s':>8}  {'vs default':>10}"]
    for (threads, level, dtype), rate in rates.items():
        mark = "  <- server default" if (threads, level, dtype) == default else ""
        lines.append(f"{threads:>7}  {level:<9}  {dtype:<5}  {rate:>8.1f}  {rate / baseline:>10.3f}{mark}")
    return lines
