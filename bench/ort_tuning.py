"""Measures the ONNX Runtime CPU session settings the server picks (intra-op threads, graph
optimization level) and the int8 dtypes, as throughput ratios to the server's default, in one
run on one corpus.

Usage: .venv/bin/python -m bench.ort_tuning [--texts 600] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from bench.harness import make_corpus
from bench.inprocess import LEVELS, OrtSetting, measure_ort_settings, server_defaults
from bench.report import ort_table


def main(argv: Sequence[str] | None = None) -> int:
    """Prints texts/s per setting and its ratio to the server's default (all cores, ORT_ENABLE_ALL,
    fp32), plus DTYPES=int8 (per-token) and int8-fast (dynamic) at the default settings."""
    parser = argparse.ArgumentParser(prog="python -m bench.ort_tuning", description=__doc__)
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    settings: list[OrtSetting] = [(threads, level, "fp32") for threads in sorted({1, cores}) for level in LEVELS]
    settings += [(cores, "all", "int8"), (cores, "all", "int8-fast")]
    texts = make_corpus(args.texts, args.seed)
    rates = measure_ort_settings(settings, texts, args.batch_size, args.repeats, server_defaults().cache_dir)
    print("\n".join(ort_table(rates, default=(cores, "all", "fp32"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
