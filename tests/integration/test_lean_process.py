"""A server on cached exports is lean: it serves with none of the distributions the image's lean
runtime leaves out (pyproject's `[tool.embedserve] export-only`, and what the model packages
require), which are made unimportable here, as they are absent there."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from tests.conftest import CACHE_DIR
from tools import serving_requirements

# Loads both default models as the server does, answers one request of each kind, and reports
# which heavy modules the process holds. With modules named in argv[2], importing any of them
# fails, as in an environment without their distributions.
PROGRAM = """
import importlib.abc, json, sys

BLOCKED = set(json.loads(sys.argv[2]))

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (absent from the lean runtime)", name=name)
        return None

sys.meta_path.insert(0, Absent())

import asyncio
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
heavy = sorted(m for m in ("torch", "transformers", "optimum", "onnx", "sentence_transformers") if m in sys.modules)
print(json.dumps({"dimension": dimension, "sparse_rows": sparse_rows, "heavy": heavy}))
"""


def _closure(names: set[str]) -> set[str]:
    """These distributions and everything they require, as installed here (extras aside)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo.extend(serving_requirements.distribution(r) for r in requires if "extra ==" not in r)
    return seen


def left_out_modules() -> list[str]:
    """The top-level modules of every distribution the lean runtime does without: the export-only
    ones and the model packages' own requirements (the models are installed without them), less
    whatever the libraries it does install require."""
    libraries, models = serving_requirements.serving_requirements()
    table = tomllib.loads(serving_requirements.PYPROJECT.read_text())["tool"]["embedserve"]
    left_out = {serving_requirements.distribution(d) for d in table["export-only"]}
    for model in models:
        left_out |= _closure({serving_requirements.distribution(model)}) - {serving_requirements.distribution(model)}
    left_out -= _closure({serving_requirements.distribution(d) for d in libraries})
    modules = {
        module
        for module, distributions in metadata.packages_distributions().items()
        if any(serving_requirements.distribution(d) in left_out for d in distributions)
    }
    return sorted(m for m in modules if not m.startswith("_"))


def test_the_lean_runtime_leaves_out_the_exporter_torch_and_what_the_models_require() -> None:
    modules = left_out_modules()
    for module in ("torch", "transformers", "optimum", "onnx", "sentence_transformers", "pyarrow"):
        assert module in modules
    for needed in ("onnxruntime", "tokenizers", "numpy", "grpc", "huggingface_hub"):
        assert needed not in modules  # serving needs these: the lean runtime must keep them


def test_serving_cached_exports_needs_neither_torch_nor_the_exporter() -> None:
    # The exports exist: the session's other tests (and this one's first run) made them.
    subprocess.run([sys.executable, "-c", PROGRAM, str(CACHE_DIR), "[]"], check=True, capture_output=True, timeout=600)
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(CACHE_DIR), json.dumps(left_out_modules())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"dimension": 384, "sparse_rows": 1, "heavy": []}, done.stderr[-2000:]


def test_a_model_with_no_cached_export_says_how_to_get_one_when_the_exporter_is_absent(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path), json.dumps(left_out_modules())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "no cached ONNX export" in done.stderr and "`full` target" in done.stderr, done.stderr[-3000:]
