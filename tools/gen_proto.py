"""Generates the Python gRPC code (and mypy stubs) and Envoy's descriptor set from proto/ —
the one way to build either.

Usage:
  python tools/gen_proto.py [OUT_DIR ...]        Python code; each OUT_DIR gets `embedserve/v1/`
  python tools/gen_proto.py --descriptor FILE    the descriptor set Envoy's transcoder reads
  python tools/gen_proto.py --googleapis DIR     copies google/api/*.proto there, for buf
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


GOOGLE_API_PROTOS = ("annotations.proto", "http.proto", "httpbody.proto")


def googleapis_root() -> Path:
    """Where google/api/{annotations,http}.proto are: googleapis-common-protos ships them."""
    spec = importlib.util.find_spec("google.api.annotations_pb2")
    if spec is None or spec.origin is None:
        raise SystemExit("googleapis-common-protos is not installed: run `make install`")
    return Path(spec.origin).parent.parent.parent


def include_dirs() -> list[str]:
    """protoc's -I paths: our protos, protobuf's well-known types (from grpcio-tools) and
    googleapis' HTTP annotations."""
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    return [f"-I{PROTO_DIR}", f"-I{well_known}", f"-I{googleapis_root()}"]


def protos(names: list[str] | None = None) -> list[str]:
    """Every .proto under proto/ (or only the named files), relative to proto/."""
    found = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    return [p for p in found if names is None or Path(p).name in names]


def _plugin(name: str) -> str:
    """The path of mypy-protobuf's protoc plugin `name` (protoc-gen-mypy, protoc-gen-mypy_grpc):
    the script installed with the mypy-protobuf that this interpreter imports. In an isolated
    build (pip's, of clients/python) that is the build environment's, not one beside
    sys.executable."""
    try:
        files = importlib.metadata.files("mypy-protobuf") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    scripts = [str(Path(f.locate()).resolve()) for f in files if f.stem == name]
    # A distribution without a RECORD (a distro's package) lists no files: then PATH decides.
    found = scripts[0] if scripts else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: mypy-protobuf is not installed (run `make install`)")
    return found


def _protoc(args: list[str], files: list[str]) -> None:
    if protoc.main(["protoc", *include_dirs(), *args, *files]) != 0:
        raise SystemExit(f"protoc failed for {files}")


def generate(out_dir: Path, names: list[str] | None = None) -> None:
    """Runs protoc for the .proto files under proto/ (default: all) into out_dir."""
    files = protos(names)
    _protoc(
        [
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
        ],
        files,
    )
    for package in {Path(p).parent for p in files}:
        (out_dir / package / "__init__.py").touch()
        (out_dir / package / "py.typed").touch()


def descriptor_set(out_file: Path) -> Path:
    """Writes the self-contained descriptor set (imports and HTTP rules included) that
    Envoy's gRPC-JSON transcoder loads."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _protoc(["--include_imports", "--include_source_info", f"--descriptor_set_out={out_file}"], protos())
    return out_file


def copy_googleapis(out_dir: Path) -> None:
    """Copies the HTTP annotation protos into out_dir/google/api, where buf finds them."""
    target = out_dir / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    for name in GOOGLE_API_PROTOS:
        shutil.copyfile(googleapis_root() / "google" / "api" / name, target / name)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--descriptor"]:
        descriptor_set(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["--googleapis"]:
        copy_googleapis(Path(sys.argv[2]))
    else:
        for target in sys.argv[1:] or [str(ROOT / "server")]:
            generate(Path(target))
