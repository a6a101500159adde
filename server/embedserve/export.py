"""Exports the bundled default models to ONNX into a cache folder ahead of time (the image build
does, so that a container's first start loads instead of exporting):

    python -m embedserve.export CACHE_DIR [DTYPE ...]      (default dtype: fp32)

The cache keys are the server's own (`export_model`): a start with the same models, dtypes and
versions finds the exports there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from embedserve.backends.config import load_model_config
from embedserve.backends.onnx import export_model
from embedserve.engine.kinds import KINDS
from embedserve.models import BUNDLED, resolve_model_path
from embedserve.settings import Dtype

# What an export can be made in: every DTYPES value but `auto`, which the server resolves at start.
EXPORT_DTYPES = [d for d in get_args(Dtype) if d != "auto"]


def export_bundled(cache_dir: Path, dtypes: Sequence[str]) -> list[Path]:
    """Exports every bundled model in every dtype; returns the model files."""
    files = []
    for name in BUNDLED:
        config = load_model_config(resolve_model_path(name))
        for dtype in dtypes:
            files.append(export_model(config, KINDS[config.kind].graph, dtype, cache_dir))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: CACHE_DIR, then the dtypes; usage errors exit 2."""
    parser = argparse.ArgumentParser(
        prog="python -m embedserve.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cache_dir", metavar="CACHE_DIR", type=Path, help="the server's EMBEDSERVE_CACHE_DIR")
    parser.add_argument(
        "dtypes",
        metavar="DTYPE",
        nargs="*",
        choices=EXPORT_DTYPES,
        help=f"any of {', '.join(EXPORT_DTYPES)} (default fp32)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for file in export_bundled(args.cache_dir, args.dtypes or ["fp32"]):
        print(file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
