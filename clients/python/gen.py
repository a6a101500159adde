"""Generates the client's gRPC code from proto/ with the project's one generator.

Usage: python clients/python/gen.py

tools/gen_proto.py writes an `embedserve/v1/` package; the client cannot ship a top-level
`embedserve` package (the server owns that name), so the code is generated under
`embedserve_client/_pb/` and its absolute imports are rewritten to point there.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT_DIR = HERE / "embedserve_client" / "_pb"
IMPORT = re.compile(r"^(\s*)(from|import) embedserve\.v1\b", re.MULTILINE)


def main() -> None:
    """Regenerates embedserve_client/_pb from proto/."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gen_proto

    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    # The client speaks only the native service; the REST messages are for Envoy.
    gen_proto.generate(OUT_DIR, ["embedding_service.proto"])
    for path in OUT_DIR.rglob("*.py*"):
        if path.suffix in (".py", ".pyi"):
            text = path.read_text()
            path.write_text(IMPORT.sub(r"\1\2 embedserve_client._pb.embedserve.v1", text))
    for package in (OUT_DIR, OUT_DIR / "embedserve"):
        (package / "__init__.py").touch()


if __name__ == "__main__":
    main()
