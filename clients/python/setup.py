"""Builds embedserve-client with its gRPC code generated from the checkout's proto/.

The generated code is never committed. build_py runs the project's one generator,
tools/gen_proto.py, into the build output (for an editable install, into
embedserve_client/_pb/ in place, git-ignored). The client cannot ship a top-level `embedserve`
package (the server owns that name), so the code goes under `embedserve_client._pb` and its
absolute `embedserve.v1` imports are rewritten to point there. Everything else about the
distribution is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GENERATOR = ROOT / "tools" / "gen_proto.py"
PB_PACKAGE = "embedserve_client._pb"
IMPORT = re.compile(r"^(\s*)(from|import) embedserve\.v1\b", re.MULTILINE)


def load_generator() -> ModuleType:
    """tools/gen_proto.py of the checkout this client sits in (tools/ is not a package)."""
    if not (ROOT / "proto").is_dir() or not GENERATOR.is_file():
        raise SystemExit(
            f"embedserve-client generates its gRPC code from the embedserve checkout's proto/ "
            f"with tools/gen_proto.py, but {ROOT / 'proto'} or {GENERATOR} is missing: build the "
            "client from a checkout (`pip install clients/python`), not from a copy of clients/python"
        )
    spec = importlib.util.spec_from_file_location("gen_proto", GENERATOR)
    assert spec is not None and spec.loader is not None  # a .py path always has a source loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate(pb_dir: Path) -> None:
    """Regenerates the `embedserve_client._pb` package in pb_dir from proto/."""
    shutil.rmtree(pb_dir, ignore_errors=True)
    pb_dir.mkdir(parents=True)
    # The client speaks only the native service; the REST messages are for Envoy.
    load_generator().generate(pb_dir, ["embedding_service.proto"])
    for path in pb_dir.rglob("*"):
        if path.suffix in (".py", ".pyi"):
            path.write_text(IMPORT.sub(rf"\1\2 {PB_PACKAGE}.embedserve.v1", path.read_text()))
    for package in (pb_dir, pb_dir / "embedserve"):
        (package / "__init__.py").touch()


class BuildPyWithGrpc(build_py):
    """build_py that also writes the generated package, with its .pyi stubs and py.typed."""

    def run(self) -> None:
        super().run()
        # An editable install imports the source tree, where `cd clients/python && mypy` looks too.
        base = HERE if self.editable_mode else Path(self.build_lib)
        generate(base.joinpath(*PB_PACKAGE.split(".")))


setup(cmdclass={"build_py": BuildPyWithGrpc})
