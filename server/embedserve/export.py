"""Exports the bundled default models to ONNX into a cache folder ahead of time (the image build
does, so that a container's first start loads instead of exporting):

    python -m embedserve.export CACHE_DIR [DTYPE ...]      (default dtype: fp32)

The cache keys are the server's own (`export_model`): a start with the same models, dtypes and
versions finds the exports there.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from embedserve.backends.config import load_model_config
from embedserve.backends.onnx import export_model
from embedserve.engine.kinds import KINDS
from embedserve.models import BUNDLED, resolve_model_path


def export_bundled(cache_dir: Path, dtypes: Sequence[str]) -> list[Path]:
    """Exports every bundled model in every dtype; returns the model files."""
    files = []
    for name in BUNDLED:
        config = load_model_config(resolve_model_path(name))
        for dtype in dtypes:
            files.append(export_model(config, KINDS[config.kind].graph, dtype, cache_dir))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: CACHE_DIR, then the dtypes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for file in export_bundled(Path(args[0]), args[1:] or ["fp32"]):
        print(file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
