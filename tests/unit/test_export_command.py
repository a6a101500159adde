"""`python -m embedserve.export`, what the image build runs, exports the bundled models where the
server looks for them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from embedserve.backends import splade
from embedserve.backends.config import load_model_config
from embedserve.backends.onnx import export_model
from embedserve.engine.kinds import KINDS
from embedserve.models import BUNDLED, resolve_model_path
from tests.conftest import CACHE_DIR


def test_the_export_command_writes_what_the_server_loads() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embedserve.export", str(CACHE_DIR), "fp32"], capture_output=True, text=True, check=True
    )
    files = [Path(line) for line in done.stdout.split()]
    assert len(files) == len(BUNDLED)
    for name, file in zip(BUNDLED, files, strict=True):
        config = load_model_config(resolve_model_path(name))
        graph = KINDS[config.kind].graph
        assert export_model(config, graph, "fp32", CACHE_DIR) == file and file.is_file()
        assert (file.parent / splade.HEAD_FILE).is_file() == graph.splade


def test_the_export_command_says_how_to_use_it() -> None:
    done = subprocess.run([sys.executable, "-m", "embedserve.export"], capture_output=True, text=True)
    assert done.returncode == 2 and "CACHE_DIR" in done.stderr


def test_help_and_a_wrong_dtype_export_nothing(tmp_path: Path) -> None:
    helped = subprocess.run([sys.executable, "-m", "embedserve.export", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "CACHE_DIR" in helped.stdout and "fp16" in helped.stdout
    assert not Path("--help").exists()  # once taken for the cache folder and exported into
    wrong = subprocess.run(
        [sys.executable, "-m", "embedserve.export", str(tmp_path / "cache"), "fp64"], capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "fp64" in wrong.stderr and "int8" in wrong.stderr
    assert not (tmp_path / "cache").exists()
