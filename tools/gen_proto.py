"""Generates the Python gRPC code (and mypy stubs) from proto/ — the one way to build it.

Usage: python tools/gen_proto.py OUT_DIR [OUT_DIR ...]
Each OUT_DIR gets an `embedserve/v1/` package next to whatever else lives there.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
BIN = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside the interpreter


def generate(out_dir: Path) -> None:
    """Runs protoc for every .proto under proto/ into out_dir."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed for {protos}")
    for package in {Path(p).parent for p in protos}:
        (out_dir / package / "__init__.py").touch()
        (out_dir / package / "py.typed").touch()


if __name__ == "__main__":
    for target in sys.argv[1:] or [str(ROOT / "server")]:
        generate(Path(target))
