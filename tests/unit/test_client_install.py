"""clients/python builds from a checkout, its gRPC code generated from proto/ at build time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "clients/python"
PB = "embedserve_client/_pb/embedserve/v1/"
# A fresh clone has none of these: earlier builds' outputs and generated code stay behind.
NOT_IN_A_CLONE = shutil.ignore_patterns("_pb", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def clone(tmp_path: Path, *folders: str) -> Path:
    """The client's folder in a copy of the checkout that holds only `folders` (and no leftovers)."""
    for folder in folders:
        shutil.copytree(ROOT / folder, tmp_path / "checkout" / folder, ignore=NOT_IN_A_CLONE)
    return tmp_path / "checkout" / CLIENT


def pip_wheel(project: Path, out_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out_dir), *options, str(project)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_wheel_ships_the_grpc_code_and_stubs_generated_from_proto(tmp_path: Path) -> None:
    # With build isolation, as a plain `pip install clients/python` builds it (fetches the build
    # requirements from the package index).
    result = pip_wheel(clone(tmp_path, CLIENT, "proto", "tools"), tmp_path / "dist")
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("embedserve_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        grpc_code = archive.read(PB + "embedding_service_pb2_grpc.py").decode()
    generated = ["embedding_service_pb2.py", "embedding_service_pb2_grpc.py", "__init__.py", "py.typed"]
    stubs = ["embedding_service_pb2.pyi", "embedding_service_pb2_grpc.pyi"]
    assert {PB + name for name in generated + stubs} | {"embedserve_client/py.typed"} <= names
    assert not [name for name in names if name.startswith("embedserve/")]  # the server's package
    assert "from embedserve_client._pb.embedserve.v1 import embedding_service_pb2" in grpc_code


def test_build_without_the_checkouts_proto_fails_naming_proto(tmp_path: Path) -> None:
    result = pip_wheel(clone(tmp_path, CLIENT), tmp_path / "dist", "--no-build-isolation")
    assert result.returncode != 0
    assert "embedserve checkout's proto/" in result.stdout + result.stderr
