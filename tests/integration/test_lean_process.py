"""A server on cached exports is lean: neither torch nor transformers is imported to serve."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import CACHE_DIR

# Loads both default models as the server does, answers one request of each kind, and reports
# which heavy modules the process holds.
PROGRAM = """
import asyncio, json, sys
from embedserve.engine.engine import Engine
from embedserve.engine.types import EmbedParams, SparseParams
from embedserve.settings import load_settings

engine = Engine.load(load_settings(["--cache-dir", sys.argv[1]], {}))

async def main():
    engine.start()
    dense = await engine.embed(EmbedParams(inputs=["a short text"]))
    sparse = await engine.sparse_embed(SparseParams(inputs=["a short text"]))
    await engine.close()
    return len(dense.vectors[0]), len(sparse.vectors)

dimension, sparse_rows = asyncio.run(main())
heavy = sorted(m for m in ("torch", "transformers", "optimum", "sentence_transformers") if m in sys.modules)
print(json.dumps({"dimension": dimension, "sparse_rows": sparse_rows, "heavy": heavy}))
"""


def test_serving_cached_exports_imports_neither_torch_nor_transformers() -> None:
    # The exports exist: the session's other tests (and this one's first run) made them.
    subprocess.run([sys.executable, "-c", PROGRAM, str(CACHE_DIR)], check=True, capture_output=True, timeout=600)
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(CACHE_DIR)], check=True, capture_output=True, text=True, timeout=300
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"dimension": 384, "sparse_rows": 1, "heavy": []}, done.stderr[-2000:]
