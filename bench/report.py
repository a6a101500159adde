"""The benches' reports: tables and lines rendered from what was measured. Nothing here measures."""

from __future__ import annotations

import argparse
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from bench.ceiling_phases import CODES, NEW, OLD, TARGET, CeilingBench, Profile
from bench.harness import LATENCY_INPUT, TARGET_RATIO, VECTOR_TOLERANCE, Ceiling, InProcessRun, percentile
from bench.inprocess import DEFAULT_SPARSE_MODEL, WireForm
from bench.load import Throughput
from bench.overload_phases import (
    ANSWERED,
    GOODPUT_RATIO,
    GRPC,
    HEALTH_P99_MS,
    PATHS,
    REFUSAL_P99_MS,
    REST,
    SHED,
    CodeRun,
    OverloadBench,
    Phase,
)
from bench.phases import EmbedBench, RerankSparseBench
from bench.shared_phases import (
    BASELINE_RATIO,
    QUERY,
    QUERY_P50_MS,
    QUERY_P99_MS,
    TENANT_KEYS,
    TENANT_RATIO,
    WITH_QUERIES_RATIO,
    SharedBench,
    Spread,
)

if TYPE_CHECKING:
    # Only annotations need them. bench.json_floats imports this module (its phases and entry
    # point are one module). Rendering the other benches does not import the Python client
    # (bench.rest_phases does), whose generated messages may lag behind the server's.
    from bench.json_floats import JsonFloatsBench
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
    lines = [f"{'threads':>7}  {'graph opt':<9}  {'dtype':<9}  {'texts/s':>8}  {'vs default':>10}"]
    for (threads, level, dtype), rate in rates.items():
        mark = "  <- server default" if (threads, level, dtype) == default else ""
        lines.append(f"{threads:>7}  {level:<9}  {dtype:<9}  {rate:>8.1f}  {rate / baseline:>10.3f}{mark}")
    return lines


# -- bench.shared --------------------------------------------------------------------------------


def shared_report(args: argparse.Namespace, bench: SharedBench) -> list[str]:
    """The report of bench.shared, line by line."""
    codes = f"this checkout ({bench.commit})"
    if bench.baseline_commit:
        codes += f" and baseline {bench.baseline_commit}, in the same run; new/old = checkout / baseline"
    heading = (
        f"shared-traffic bench: {args.texts} texts (seed {args.seed}, 8-120 words), {args.model}, "
        f"batch {args.batch_size}, {os.cpu_count()} cores, python {platform.python_version()}; "
        f"{args.rounds} round(s), medians (min-max)"
    )
    return [
        "",
        heading,
        f"  {codes}",
        "",
        *shared_latency(args, bench),
        "",
        *shared_throughput(args, bench),
        "",
        *shared_tenants(bench),
        "",
        *shared_verdict(bench),
    ]


def spread_cell(spread: Spread | None, fmt: Callable[[float], str]) -> str:
    """'median (min-max)', or the median alone when the rounds agree; empty for None."""
    if spread is None:
        return ""
    if spread.low == spread.high:
        return fmt(spread.median)
    return f"{fmt(spread.median)} ({fmt(spread.low)}-{fmt(spread.high)})"


def ms_text(ms: float) -> str:
    """Milliseconds as the issue writes them: one decimal below 10, none above."""
    return f"{ms:.1f}" if ms < 10 else f"{ms:,.0f}"


def ratio_text(ratio: float) -> str:
    """A ratio with two decimals."""
    return f"{ratio:.2f}"


def rate_text(per_s: float) -> str:
    """Texts per second with one decimal."""
    return f"{per_s:,.1f}"


def verdict(ok: bool, bad: str) -> str:
    """'ok', or what is wrong ('HIGH', 'LOW', 'OFF')."""
    return "ok" if ok else bad


def shared_latency_row(bench: SharedBench, label: str, condition: str, loaded: bool) -> Row:
    """One condition's query latency: p50 and p99 per code, new/old, queries sent, and under load
    the targets against this checkout's medians."""
    names = [f"{condition}_p50_ms", f"{condition}_p99_ms"]
    cells = [spread_cell(bench.spread(n), ms_text) for n in names]
    if bench.baseline:
        cells += [spread_cell(bench.spread(n, baseline=True), ms_text) for n in names]
        cells += [spread_cell(bench.versus(n), ratio_text) for n in names]
    target = ""
    if loaded:
        p50, p99 = (bench.spread(n).median for n in names)
        target = (f"p50 <= {QUERY_P50_MS:g} {verdict(p50 <= QUERY_P50_MS, 'HIGH')}, "
                  f"p99 <= {QUERY_P99_MS:g} {verdict(p99 <= QUERY_P99_MS, 'HIGH')}")  # fmt: skip
    queries = spread_cell(bench.spread(f"{condition}_queries"), lambda n: f"{n:.0f}")
    return (label, *cells, queries, target)


def shared_latency(args: argparse.Namespace, bench: SharedBench) -> list[str]:
    """The table of the short query's latency, idle and under each bulk load."""
    header = [f'query "{QUERY}", {args.rate:g}/s open loop', "p50 ms", "p99 ms"]
    if bench.baseline:
        header += ["baseline p50", "baseline p99", "p50 new/old", "p99 new/old"]
    rows = [
        shared_latency_row(bench, "(q) idle", "idle", loaded=False),
        shared_latency_row(bench, f"(u+q) under {args.clients} unary clients x {args.request_size}", "unary", True),
        shared_latency_row(bench, "(s+q) under one EmbedStream", "stream", loaded=True),
    ]
    return table(rows, [*header, "queries", "target"])


def shared_throughput_row(bench: SharedBench, label: str, name: str, target: str) -> Row:
    """One bulk figure per code and new/old, with `target` ('alone' or 'ratio') judged: new/old
    of bulk alone against BASELINE_RATIO, with/alone against WITH_QUERIES_RATIO."""
    is_ratio = target == "ratio"
    fmt = ratio_text if is_ratio else rate_text
    cells = [spread_cell(bench.spread(name), fmt)]
    versus = bench.versus(name)
    if bench.baseline:
        cells += [spread_cell(bench.spread(name, baseline=True), fmt), spread_cell(versus, ratio_text)]
    judged = ""
    if is_ratio:
        median = bench.spread(name).median
        judged = f"with / alone >= {WITH_QUERIES_RATIO:.2f} {verdict(median >= WITH_QUERIES_RATIO, 'LOW')}"
    elif target == "alone" and versus is not None:
        judged = f"new/old >= {BASELINE_RATIO:.2f} {verdict(versus.median >= BASELINE_RATIO, 'LOW')}"
    return (label, *cells, judged)


def shared_throughput(args: argparse.Namespace, bench: SharedBench) -> list[str]:
    """The table of bulk throughput, alone and with the queries, per load."""
    header = ["bulk", "texts/s"] + (["baseline texts/s", "new/old"] if bench.baseline else [])
    unary = f"{args.clients} unary clients x {args.request_size}"
    stream = f"one EmbedStream, {args.stream_in_flight} in flight"
    rows = [
        shared_throughput_row(bench, f"(u) {unary}, alone", "unary_alone_texts_per_s", "alone"),
        shared_throughput_row(bench, "(u+q) the same, with queries", "unary_loaded_texts_per_s", ""),
        shared_throughput_row(bench, "    (u+q) / (u)", "unary_ratio", "ratio"),
        shared_throughput_row(bench, f"(s) {stream}, alone", "stream_alone_texts_per_s", "alone"),
        shared_throughput_row(bench, "(s+q) the same, with queries", "stream_loaded_texts_per_s", ""),
        shared_throughput_row(bench, "    (s+q) / (s)", "stream_ratio", "ratio"),
    ]
    return table(rows, [*header, "target"])


def shared_tenants(bench: SharedBench) -> list[str]:
    """The table of the two tenants' streams: each one's texts/s while both ran, and the ratio."""
    first, second = TENANT_KEYS
    low, high = TENANT_RATIO
    rows = []
    for label, name in ((f"{first} texts/s", "tenant_k1_texts_per_s"), (f"{second} texts/s", "tenant_k2_texts_per_s")):
        cells = [spread_cell(bench.spread(name), rate_text)]
        if bench.baseline:
            cells.append(spread_cell(bench.spread(name, baseline=True), rate_text))
        rows.append((label, *cells, ""))
    ratios = [bench.spread("tenant_ratio")] + ([bench.spread("tenant_ratio", baseline=True)] if bench.baseline else [])
    median = ratios[0].median
    target = f"{low:g}..{high:g} {verdict(low <= median <= high, 'OFF')}"
    rows.append((f"{first} / {second}", *(spread_cell(r, ratio_text) for r in ratios), target))
    header = ["(t) two tenants, one EmbedStream each, while both run", "checkout"]
    return table(rows, [*header, *(["baseline"] if bench.baseline else []), "target"])


def shared_verdict(bench: SharedBench) -> list[str]:
    """Whether every input got the same vectors each time, and whether any bulk job was cut short."""
    worst = max(bench.diffs.values())
    each = ", ".join(f"{k} {v:.1e}" for k, v in bench.diffs.items())
    lines = [
        f"vectors: max |diff| from the first answer to the same input {worst:.1e} "
        f"({verdict(worst < VECTOR_TOLERANCE, 'MISMATCH')}: {each})"
    ]
    rounds = [*bench.checkout, *bench.baseline]
    cores = [run.cores_used for r in rounds for run in r.runs]
    lines.append(
        f"cores used (bench + server CPU seconds per wall second) by the bulk jobs: {min(cores):.2f}-{max(cores):.2f}"
    )
    lines += cores_warning(cores, cpu_column_note=False)
    if not all(r.complete for r in rounds):
        lines.append(
            "  WARNING: some bulk jobs reached --max-seconds before the end of the corpus; "
            "their texts/s count what was answered by then"
        )
    return lines


# -- bench.ceiling -------------------------------------------------------------------------------


def ceiling_report(args: argparse.Namespace, bench: CeilingBench) -> list[str]:
    """The report of bench.ceiling, line by line."""
    f = bench.forward[NEW]
    n = f.texts
    heading = (
        f"request-path ceiling: {n} texts (seed {args.seed}, 8-16 words, {f.tokens / n:.1f} tokens per text), "
        f"{bench.model.name} (2 layers, hidden {args.hidden_size}), batch {args.batch_size}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}"
    )
    codes = f"new = this checkout ({bench.commit}), old = {bench.baseline_commit}; {args.rounds} round(s), medians"
    return [
        "",
        heading,
        codes,
        "",
        *ceiling_throughput(bench),
        "",
        *ceiling_cpu(args, bench),
        "",
        *[line for code in CODES if code in bench.profiles for line in profile_lines(code, bench.profiles[code])],
        *ceiling_verdict(bench),
    ]


def ceiling_throughput(bench: CeilingBench) -> list[str]:
    """texts/s per phase and code, and new over old against the target."""
    rows = []
    for phase in bench.phases:
        new, old, ratio = bench.rate(phase.key, NEW), bench.rate(phase.key, OLD), bench.ratio(phase.key)
        verdict = "ok" if ratio.median >= TARGET else "LOW"
        rows.append((phase.label, f"{new.median:,.0f} ({new.low:,.0f}-{new.high:,.0f})",
                     f"{old.median:,.0f} ({old.low:,.0f}-{old.high:,.0f})",
                     f"{ratio.median:.2f} ({ratio.low:.2f}-{ratio.high:.2f}) {verdict}"))  # fmt: skip
    idle = bench.idle_share()
    note = f"  the unloaded server used at most {idle:.1%} of the loaded one's CPU meanwhile"
    return [*table(rows, ("texts/s (min-max)", NEW, OLD, f"{NEW}/{OLD} (target >= {TARGET:.1f})")), note]


def ceiling_cpu(args: argparse.Namespace, bench: CeilingBench) -> list[str]:
    """Server CPU ms per 1,000 texts, split into the forward pass and the rest; the bench's own."""
    forward = {code: bench.forward[code].cpu_ms_per_1000() for code in CODES}
    rows = []
    for phase in bench.phases:
        server = {code: bench.cpu_ms_per_1000(phase.key, code) for code in CODES}
        client = {code: bench.cpu_ms_per_1000(phase.key, code, client=True) for code in CODES}
        rest = {code: server[code] - forward[code] for code in CODES}
        rows.append((phase.label, *(f"{server[c]:.1f}" for c in CODES), *(f"{rest[c]:.1f}" for c in CODES),
                     *(f"{client[c]:.1f}" for c in CODES)))  # fmt: skip
    header = ("CPU ms per 1,000 texts", f"server {NEW}", f"server {OLD}", f"rest {NEW}", f"rest {OLD}",
              f"bench {NEW}", f"bench {OLD}")  # fmt: skip
    f = bench.forward[NEW]
    lines = [
        *table(rows, header),
        f"  forward pass, measured in process (f) on the same corpus: {f.batches} batches of {args.batch_size}, "
        f"padding efficiency {f.tokens / f.padded_tokens:.0%}, least of {args.forward_repeats}:",
    ]
    for code in CODES:
        cost = bench.forward[code]
        spinning = "spinning" if cost.spinning else "not spinning"
        lines.append(
            f"    {code}: {forward[code]:.1f} CPU ms per 1,000 texts ({cost.threads} intra-op thread(s), pool "
            f"{spinning}, as its server runs them); {cost.texts / cost.seconds:,.0f} texts/s of forward passes alone"
        )
    lines.append("  rest = server - forward: tokenizing, queueing, batching, pooling, protobuf, gRPC and asyncio")
    return lines


def profile_lines(code: str, profile: Profile) -> list[str]:
    """One server under the profile's load: CPU per thread, then where the GIL holder was."""
    if profile.error:
        return [f"profile of the {code} server: none ({profile.error})", ""]
    cpu = ", ".join(f"{name} {ms:.0f}" for name, ms in profile.thread_cpu_ms)
    threads = ", ".join(f"{name} {share:.0%}" for name, share in profile.threads)
    rows = [(name, f"{share:.1%}") for name, share in profile.functions]
    inclusive = [(name, f"{share:.1%}") for name, share in profile.inclusive]
    return [
        f"profile of the {code} server, {profile.seconds:g} s, {profile.texts:,} texts: server CPU ms per 1,000 texts "
        f"by thread: {cpu}",
        f"  py-spy --gil: {profile.samples} samples, the GIL held {profile.gil_share:.0%} of the time; by thread: "
        f"{threads}",
        *table(rows, ("  GIL holder: innermost function (self)", "samples")),
        *table(inclusive, ("  GIL holder: function on the stack (inclusive)", "samples")),
        "",
    ]


def ceiling_verdict(bench: CeilingBench) -> list[str]:
    """Whether the vectors match the in-process ones, and each other."""
    worst = max(bench.diffs.values())
    each = ", ".join(f"{k} {v:.1e}" for k, v in bench.diffs.items())
    verdict = "ok" if worst < VECTOR_TOLERANCE else "MISMATCH"
    same = "bit-identical" if bench.diffs["new_vs_old"] == 0 else "NOT bit-identical"
    return [f"vectors: max |diff| {worst:.1e} ({verdict}: {each}); new and old are {same}"]


# -- bench.overload ------------------------------------------------------------------------------

# Cores the rest of the machine may use during a phase before the report warns.
OTHER_CORES = 0.15
# What the baseline's queue was, for the heading (it logs nothing of it).
BASELINE_QUEUE = "QUEUE_SIZE 16,384 inputs, refused only after tokenizing"


def overload_report(args: argparse.Namespace, bench: OverloadBench) -> list[str]:
    """The report of bench.overload, line by line."""
    runs = bench.runs
    sizes = f"{max(1, args.request_size // 2)}-{args.request_size}"
    heading = (
        f"overload: {args.model}, requests of {sizes} texts of 8-16 words, {args.factor:g}x the capacity for "
        f"{args.seconds:g} s a phase, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    codes = [f"{name} = {run.commit}: {run.queue or BASELINE_QUEUE}" for name, run in runs.items()]
    capacity = ", ".join(f"{name} {rate_text(run.capacity_per_s)}" for name, run in runs.items())
    lines = ["", heading, *codes, f"(c) capacity, {args.clients} gRPC clients, closed loop: texts/s {capacity}"]
    first = next(iter(runs.values()))
    for index, phase in enumerate(first.overloads):
        lines += ["", *overload_table(runs, index, f"({'ko'[index % 2]}) {phase.shape.label}")]
    return [*lines, "", *overload_verdict(bench)]


def fraction_text(ratio: float) -> str:
    """A ratio below 1 as '1/N' (a refusal's wait against an answer's), else with two decimals."""
    return f"1/{1 / ratio:,.0f}" if 0 < ratio < 1 else ratio_text(ratio)


def counts_text(phase: Phase, path: str) -> str:
    """'answered / refused / other' requests of one path."""
    statuses = phase.statuses(path)
    answered, shed = statuses[ANSWERED[path]], statuses[SHED[path]]
    return f"{answered:,} / {shed:,} / {statuses.total() - answered - shed:,}"


def hinted_text(phase: Phase, path: str) -> str:
    """'k of n' refusals with a retry hint (and over REST an OpenAI JSON body)."""
    good, shed = phase.hinted(path)
    return f"{good:,} of {shed:,}" if shed else "none refused"


def overload_table(runs: Mapping[str, CodeRun], index: int, title: str) -> list[str]:
    """One overload phase: a row per figure, a column per code, and the issue's targets against
    this checkout's figures."""
    phases = {name: run.overloads[index] for name, run in runs.items()}
    figures = {name: run.figures(phases[name]) for name, run in runs.items()}
    new = figures["checkout"]

    def row(label: str, cell: Callable[[str], str], target: str = "") -> Row:
        return (label, *(cell(name) for name in runs), target)

    def value(name: str, fmt: Callable[[float], str]) -> Callable[[str], str]:
        return lambda code: fmt(figures[code][name])

    def pair(name: str) -> Callable[[str], str]:
        def cell(code: str) -> str:
            p50, p99 = figures[code][f"{name}_p50_ms"], figures[code][f"{name}_p99_ms"]
            return "none" if math.isnan(p50) else f"{ms_text(p50)} / {ms_text(p99)}"

        return cell

    def checks(code: str) -> str:
        return f"{figures[code]['health_checks']:.0f} ({ms_text(figures[code]['health_p100_ms'])})"

    def cores(code: str) -> str:
        keys = ("bench_cores", "server_cores", "envoy_cores", "other_cores")
        return " / ".join(f"{figures[code][k]:.2f}" for k in keys)

    shed_p99 = max(new[f"{path}_shed_p99_ms"] for path in PATHS)
    rows = [
        row("offered texts/s (sent)", value("offered_texts_per_s", rate_text)),
        row("    offered / capacity", value("offered_ratio", ratio_text)),
        row("goodput texts/s (answered)", value("goodput_texts_per_s", rate_text)),
        row("    goodput / capacity", value("goodput_ratio", ratio_text),
            f">= {GOODPUT_RATIO:.2f} {verdict(new['goodput_ratio'] >= GOODPUT_RATIO, 'LOW')}"),
        row("gRPC requests: OK / RESOURCE_EXHAUSTED / other", lambda c: counts_text(phases[c], GRPC)),
        row("REST requests: 200 / 429 / other", lambda c: counts_text(phases[c], REST)),
        row("gRPC answered, p50 / p99 ms", pair("grpc_answered")),
        row("REST answered, p50 / p99 ms", pair("rest_answered")),
        row("gRPC refused, p50 / p99 ms", pair("grpc_shed"),
            f"p99 < {REFUSAL_P99_MS:g} {verdict(shed_p99 < REFUSAL_P99_MS, 'HIGH')} (both paths)"),
        row("REST refused, p50 / p99 ms", pair("rest_shed")),
        row("wait for a refusal / for an answer (p50)", value("shed_over_answered_p50", fraction_text)),
        row("health Check, p50 / p99 ms", pair("health"),
            f"p99 < {HEALTH_P99_MS:g} {verdict(new['health_p99_ms'] < HEALTH_P99_MS, 'HIGH')}"),
        row("health checks (slowest ms)", checks),
        row("RESOURCE_EXHAUSTED with retry-after", lambda c: hinted_text(phases[c], GRPC)),
        row("429 with Retry-After and OpenAI JSON", lambda c: hinted_text(phases[c], REST)),
        row("cores used: bench / server / Envoy / others", cores),
    ]  # fmt: skip
    period = " / ".join(f"{figures[code]['period_s']:.2f}" for code in runs)
    return [*table(rows, (title, *runs, "target (checkout)")), f"  one request per {period} s per client"]


def overload_verdict(bench: OverloadBench) -> list[str]:
    """Statuses other than answered or refused, health that was not SERVING, and the vector check."""
    lines = []
    for name, run in bench.runs.items():
        lines += [f"  {name} server logged: {line[:200]}" for line in run.problems]
        for phase in run.overloads:
            if other := phase.unexpected():
                lines.append(f"  {name}, {phase.shape.label}: requests that ended otherwise: {dict(other)}")
                for status in other:
                    first = phase.first(status)
                    waits = [o.seconds for o in phase.outcomes if f"{o.path} {o.status}" == status]
                    lines.append(
                        f"    the first {status}: {first.detail!r}, after {first.seconds:.1f} s "
                        f"(all of them after {min(waits):.1f}-{max(waits):.1f} s)"
                    )
            if not_serving := {s: n for s, n in phase.health.items() if s != "SERVING"}:
                lines.append(f"  {name}, {phase.shape.label}: health checks not SERVING: {not_serving}")
    others = max(phase.other_cores for run in bench.runs.values() for phase in [run.capacity, *run.overloads])
    lines += others_warning(others)
    worst = max(bench.diffs.values())
    each = ", ".join(f"{k} {v:.1e}" for k, v in bench.diffs.items())
    lines.append(
        f"vectors: max |diff| from the first answer to the same request {worst:.1e} "
        f"({verdict(worst < VECTOR_TOLERANCE, 'MISMATCH')}: {each})"
    )
    return lines


# -- bench.json_floats ---------------------------------------------------------------------------


def fixed(decimals: int) -> Callable[[float], str]:
    """A number with `decimals` decimals and thousands separators."""
    return lambda value: f"{value:,.{decimals}f}"


# The rows of bench.json_floats' table: a figure of Pass.figures, its label, how it prints.
JSON_FLOATS_ROWS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("bytes_per_float", "JSON body bytes per float", fixed(2)),
    ("texts_per_s", "texts/s answered (wall)", rate_text),
    ("floats_per_s", "floats/s answered (wall)", fixed(0)),
    ("parse_s_per_mb", "json.loads CPU s per MB of body", fixed(4)),
    ("parse_ns_per_float", "json.loads CPU ns per float", fixed(0)),
    ("server_envoy_cpu_ms_per_text", "server + Envoy CPU ms per text", fixed(3)),
    ("server_cpu_ms_per_text", "  server", fixed(3)),
    ("envoy_cpu_ms_per_text", "  Envoy", fixed(3)),
    ("bench_cpu_ms_per_text", "bench (client) CPU ms per text", fixed(3)),
    ("cores_used", "cores used: bench + server + Envoy", ratio_text),
    ("idle_code_cores", "cores used by the other code's server + Envoy", ratio_text),
    ("other_cores", "cores used by the rest of the machine", ratio_text),
)
# Rows whose new/old means nothing: shares of the machine near 0, which say how quiet it was.
JSON_FLOATS_UNRATIOED = frozenset({"idle_code_cores", "other_cores"})


def json_floats_report(args: argparse.Namespace, bench: JsonFloatsBench) -> list[str]:
    """The report of bench.json_floats, line by line."""
    low, high = bench.words
    heading = (
        f'JSON floats bench: POST /v1/embeddings, "encoding_format": "float", through Envoy; {args.texts} texts '
        f"(seed {args.seed}, {low}-{high} words), {args.clients} clients x {args.request_size} texts, {args.model} "
        f"({bench.dimension} floats a text), {os.cpu_count()} cores; {args.rounds} round(s), medians (min-max)"
    )
    rows = [
        (label, spread_cell(bench.spread(name, NEW), fmt), spread_cell(bench.spread(name, OLD), fmt),
         "" if name in JSON_FLOATS_UNRATIOED else spread_cell(bench.ratio(name), ratio_text))
        for name, label, fmt in JSON_FLOATS_ROWS
    ]  # fmt: skip
    header = ("per pass of the corpus", f"new {bench.commits[NEW]}", f"old {bench.commits[OLD]}", "new/old")
    cores = [p.figures()["cores_used"] for p in bench.passes]
    return [
        "",
        heading,
        "  new/old ratios are taken round by round; only ratios within one run compare (the machine is shared)",
        "",
        *table(rows, header),
        "",
        *json_floats_verdict(bench),
        *cores_warning(cores, cpu_column_note=False),
        *others_warning(max(p.figures()["other_cores"] for p in bench.passes)),
    ]


def others_warning(others: float) -> list[str]:
    """A warning when processes other than those measured used more than OTHER_CORES cores."""
    if others <= OTHER_CORES:
        return []
    return [
        f"  WARNING: other processes used up to {others:.2f} cores during a phase: a neighbour took CPU, and "
        "the two codes' figures compare no better than that: rerun on a quiet machine"
    ]


def json_floats_verdict(bench: JsonFloatsBench) -> list[str]:
    """Whether every float the new code answered, cast to float32, is the old code's."""
    c = bench.check
    return [
        f"vectors: the new code's floats, cast to float32, against the old code's for the same texts: {c.differing:,} "
        f"of {c.floats:,} differ (max |diff| {c.max_abs_diff:.1e}): {verdict(c.differing == 0, 'MISMATCH')}"
    ]
