"""The fastest graph for the CPU at hand (issue 12): the default dense model's fp32 export as the
server loads it (ORT_ENABLE_ALL), against the same export at other session graph levels and
against graphs rewritten by ONNX Runtime's transformer optimizer (`optimize_model`, model type
"bert", heads and hidden size from the model's config.json) with each of its opt levels and
fusion options. Throughput over the same length-sorted batches with the server's threads, rounds
alternating the order, each ratio to that round's default pass; cosine of every vector to the
default's on a separate seeded corpus.

Usage: flock /tmp/embedserve-bench.lock .venv/bin/python -m bench.graph [--texts 512] [--rounds 3]

Built graphs are kept under --cache-dir/bench-models/graph/ (named after the fp32 export and
RECIPES_VERSION).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.harness import make_corpus, print_summary, step
from bench.inprocess import DEFAULT_DENSE_MODEL, cpu_session, dense_model_files, server_defaults, server_forward_setup
from bench.int8 import Batch, Measured, Texts, built, cpu_flags, measure_accuracy
from bench.report import table
from embedserve.models import resolve_model_path

RECIPES_VERSION = 1  # bump when a recipe changes, so that its cached file is rebuilt
Build = Callable[[Path, Path], None]
BASELINE = "fp32"


def fuse_transformer(
    source: Path, target: Path, num_heads: int, hidden_size: int, opt_level: int, **options: bool
) -> None:
    """Rewrites a BERT-like export with ONNX Runtime's transformer optimizer (model type "bert"):
    its fused Attention, SkipLayerNormalization, BiasGelu and EmbedLayerNormalization contrib ops.
    `mask_index` False gives Attention the raw 2-D mask instead of the optimizer's default for
    BERT (one length per row, right padding, as TextTokenizer.collate pads); the other `options`
    set FusionOptions attributes."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusion = FusionOptions("bert")
    fusion.use_raw_attention_mask(not options.pop("mask_index", True))
    for name, value in options.items():
        if not hasattr(fusion, name):
            raise TypeError(f"FusionOptions has no attribute {name!r}")
        setattr(fusion, name, value)
    model = optimize_model(str(source), "bert", num_heads, hidden_size, fusion, opt_level=opt_level, use_gpu=False)
    model.save_model_to_file(str(target))


def fused(opt_level: int, **options: Any) -> Build:
    """The transformer optimizer at `opt_level` with these FusionOptions attributes changed."""
    hf = json.loads((resolve_model_path(DEFAULT_DENSE_MODEL) / "config.json").read_text())

    def build(source: Path, target: Path) -> None:
        fuse_transformer(source, target, hf["num_attention_heads"], hf["hidden_size"], opt_level, **options)

    return build


# name -> (what it is, how it is built (None: the export itself), session graph level)
Variant = tuple[str, Build | None, str]
VARIANTS: dict[str, Variant] = {
    "fp32@extended": ("the export, ORT_ENABLE_EXTENDED", None, "extended"),
    "fp32@basic": ("the export, ORT_ENABLE_BASIC", None, "basic"),
    "o0": ("optimize_model opt_level 0 (fusions only), every bert fusion", fused(0), "all"),
    "o1": ("optimize_model opt_level 1 (ORT basic, then fusions)", fused(1), "all"),
    "o2": ("optimize_model opt_level 2 (ORT extended, then fusions)", fused(2), "all"),
    "o99": ("optimize_model opt_level 99 (ORT all, hardware-specific)", fused(99), "all"),
    "o0@basic": ("o0, session ORT_ENABLE_BASIC", fused(0), "basic"),
    "o0-rawmask": ("o0, Attention on the raw 2-D mask (not MaskIndexEnd)", fused(0, mask_index=False), "all"),
    "o0-noembed": ("o0 without EmbedLayerNormalization", fused(0, enable_embed_layer_norm=False), "all"),
    "o0-noattn": ("o0 without Attention fusion", fused(0, enable_attention=False), "all"),
    "o0-noskip": (
        "o0 without SkipLayerNormalization",
        fused(0, enable_skip_layer_norm=False, enable_bias_skip_layer_norm=False),
        "all",
    ),
    "o0-mha": ("o0 with MultiHeadAttention (unpacked QKV)", fused(0, use_multi_head_attention=True), "all"),
    "o0-fastgelu": ("o0 with GELU approximated (FastGelu, tanh)", fused(0, enable_gelu_approximation=True), "all"),
}


def measure_speed(
    sessions: dict[str, ort.InferenceSession], batches: list[Batch], rounds: int, results: dict[str, Measured]
) -> None:
    """Each round runs every batch on every session before the next batch, the sessions' order
    rotating from batch to batch and reversed in odd rounds, so that a neighbour's load or a
    clock change hits all alike (whole passes one after another drifted by +-15% on the shared
    2-core machine). A variant's ratio is the default's summed seconds over its own, per round."""
    names = list(sessions)
    texts = sum(len(ids) for ids, _, _ in batches)
    for session in sessions.values():
        session.run(None, dict(zip(("input_ids", "attention_mask", "token_type_ids"), batches[-1], strict=True)))
    for r in range(rounds):
        step(f"throughput round {r + 1}/{rounds}")
        seconds = dict.fromkeys(names, 0.0)
        for i, (ids, mask, types) in enumerate(batches):
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            turn = names[i % len(names) :] + names[: i % len(names)]
            for name in turn if r % 2 == 0 else turn[::-1]:
                start = time.perf_counter()
                sessions[name].run(None, feed)
                seconds[name] += time.perf_counter() - start
        for name in names:
            results[name].rates.append(texts / seconds[name])
            results[name].ratios.append(seconds[BASELINE] / seconds[name])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    defaults = server_defaults()
    p = argparse.ArgumentParser(
        prog="python -m bench.graph", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--texts", type=int, default=512, help="throughput corpus (default 512)")
    p.add_argument("--accuracy-texts", type=int, default=500, help="accuracy corpus (default 500)")
    p.add_argument("--max-words", type=int, default=120, help="longest text, in words (default 120; 8 the shortest)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    p.add_argument("--seed", type=int, default=12, help="corpus seed; accuracy uses seed + 1000 (default 12)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"(default {defaults.batch_size})")
    p.add_argument(
        "--intra-op-threads", type=int, default=defaults.intra_op_threads, help="as the server's (0: its default)"
    )
    p.add_argument("--cache-dir", type=Path, default=defaults.cache_dir, help=f"(default {defaults.cache_dir})")
    p.add_argument("--variants", help=f"comma-separated names to run (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--json-out", type=Path, help="also write the results to this file")
    return p.parse_args(argv)


def report_rows(results: dict[str, Measured]) -> list[list[str]]:
    """One row per variant: texts/s, its ratio to the default (median and range over rounds), and
    the mean / min cosine to the default's vectors."""
    rows = []
    for name, m in results.items():
        cos = m.cosines["corpus"]
        rows.append(
            [
                name,
                f"{np.median(m.rates):.0f}",
                f"{np.median(m.ratios):.3f}",
                f"{min(m.ratios):.3f}-{max(m.ratios):.3f}",
                f"{cos.mean():.7f} / {cos.min():.7f}",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Builds the variants, measures them, prints the table and one JSON line."""
    args = parse_args(argv)
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in chosen if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    fp32 = dense_model_files(["fp32"], args.cache_dir)["fp32"]
    threads, spinning = server_forward_setup(args.intra_op_threads)
    sessions = {BASELINE: cpu_session(fp32, threads, spinning)}
    for name in chosen:
        _, build, level = VARIANTS[name]
        file = fp32 if build is None else built(name, build, fp32, args.cache_dir, "graph", RECIPES_VERSION)
        sessions[name] = cpu_session(file, threads, spinning, level)
    results = {BASELINE: Measured("the fp32 export as the server loads it (ORT_ENABLE_ALL)")}
    results |= {n: Measured(VARIANTS[n][0]) for n in chosen}
    texts = Texts()
    batches = texts.batches(make_corpus(args.texts, args.seed, max_words=args.max_words), args.batch_size)
    measure_speed(sessions, batches, args.rounds, results)
    accuracy = texts.batches(
        make_corpus(args.accuracy_texts, args.seed + 1000, max_words=args.max_words), args.batch_size
    )
    measure_accuracy(sessions, {"corpus": accuracy}, texts, results)  # cosine to BASELINE's ("fp32") vectors
    report = [
        f"CPU: {cpu_flags()}; {threads} intra-op thread(s) per session, batches of {args.batch_size}",
        f"throughput: {args.texts} texts of 8-{args.max_words} words, {args.rounds} rounds alternating order; "
        f"cosine: {args.accuracy_texts} texts",
        *table(report_rows(results), ["variant", "texts/s", "x default", "range", "cosine mean / min"]),
        *(f"  {name}: {m.what}" for name, m in results.items()),
    ]
    summary = {
        n: {"ratios": m.ratios, "cosine": [float(m.cosines["corpus"].mean()), float(m.cosines["corpus"].min())]}
        for n, m in results.items()
    }
    print_summary(report, summary, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
