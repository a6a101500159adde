"""Prints what a process that serves cached ONNX exports needs, from pyproject.toml: the project's
dependencies less its `[tool.embedserve] export-only` ones (the exporter, torch), in two lists,
since the model packages (`files-only`) require torch and are installed without dependencies.

Usage: python tools/serving_requirements.py libraries|models

The image's lean runtime stage (Dockerfile) installs `libraries` with their dependencies, then
`models` and the project itself with --no-deps; tests/unit/test_serving_requirements.py keeps
the lists honest against pyproject.toml.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def distribution(requirement: str) -> str:
    """The normalized distribution name a requirement line names (PEP 503)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def serving_requirements(pyproject: Path = PYPROJECT) -> tuple[list[str], list[str]]:
    """(libraries, models): the requirement lines of the project's dependencies that serving
    needs, the model packages apart; raises ValueError when the tool table names a distribution
    the dependencies do not have (a rename would otherwise slip through)."""
    data = tomllib.loads(pyproject.read_text())
    dependencies: list[str] = data["project"]["dependencies"]
    table = data["tool"]["embedserve"]
    export_only = {distribution(d) for d in table["export-only"]}
    files_only = {distribution(d) for d in table["files-only"]}
    named = {distribution(d) for d in dependencies}
    unknown = (export_only | files_only) - named
    if unknown:
        raise ValueError(f"[tool.embedserve] names {sorted(unknown)}, which are not in [project] dependencies")
    libraries = [d for d in dependencies if distribution(d) not in export_only | files_only]
    models = [d for d in dependencies if distribution(d) in files_only]
    return libraries, models


def main(argv: Sequence[str] | None = None) -> int:
    """Prints one list, a requirement a line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in (["libraries"], ["models"]):
        print(__doc__, file=sys.stderr)
        return 2
    libraries, models = serving_requirements()
    print("\n".join(libraries if args == ["libraries"] else models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
