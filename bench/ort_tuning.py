"""Measures the ONNX Runtime CPU session settings the server picks (intra-op threads, graph
optimization level) and int8 quantization, as throughput ratios to the server's default, in one
run on one corpus.

Usage: .venv/bin/python bench/ort_tuning.py [--texts 600] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_bench import make_corpus

from embedserve.backends.config import load_model_config
from embedserve.backends.onnx import export_model
from embedserve.engine.tokenizer import TextTokenizer
from embedserve.models import resolve_model_path
from embedserve.settings import DEFAULT_DENSE_MODEL, Settings

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def main() -> int:
    """Prints texts/s per setting and its ratio to the server's default (all cores, ORT_ENABLE_ALL,
    fp32), plus int8 dynamic quantization (DTYPES=int8) at the default settings."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    path = resolve_model_path(DEFAULT_DENSE_MODEL)
    config = load_model_config(path)
    cache_dir = Settings().cache_dir
    model_files = {dtype: export_model(config, dtype, cache_dir) for dtype in ("fp32", "int8")}
    tokenizer = TextTokenizer(path, config.max_input_tokens)
    encodings = tokenizer.encode(make_corpus(args.texts, args.seed)).encodings
    encodings.sort(key=lambda e: len(e.ids))
    batches = [tokenizer.collate(encodings[i : i + args.batch_size]) for i in range(0, len(encodings), args.batch_size)]
    cores = os.cpu_count() or 1
    settings = [(threads, level, "fp32") for threads in sorted({1, cores}) for level in LEVELS]
    settings.append((cores, "all", "int8"))
    default = (cores, "all", "fp32")
    results: dict[tuple[int, str, str], list[float]] = {s: [] for s in settings}
    sessions = {}
    for threads, level, dtype in settings:
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[level]
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions[(threads, level, dtype)] = ort.InferenceSession(
            str(model_files[dtype]), options, providers=["CPUExecutionProvider"]
        )
    # Interleave settings across repeats so drift on a shared machine hits them all alike.
    for _ in range(args.repeats):
        for key, session in sessions.items():
            started = time.perf_counter()
            for ids, mask, types in batches:
                session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
            results[key].append(len(encodings) / (time.perf_counter() - started))
    baseline = float(np.median(results[default]))
    print(f"{'threads':>7}  {'graph opt':<9}  {'dtype':<5}  {'texts/s':>8}  {'vs default':>10}")
    for (threads, level, dtype), rates in results.items():
        rate = float(np.median(rates))
        mark = "  <- server default" if (threads, level, dtype) == default else ""
        print(f"{threads:>7}  {level:<9}  {dtype:<5}  {rate:>8.1f}  {rate / baseline:>10.3f}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
